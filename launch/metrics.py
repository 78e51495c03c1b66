"""A run's record of its numbers: TensorBoard scalars and the same numbers in `metrics.jsonl`,
written by rank 0 (`MetricsLog`) and read back by the tests, the quality harness and the Slurm
tests (`read_metrics`)."""
from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

from prism_megatron.files import disk_error_reason, disk_errors_named

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Rank 0's record of a run: TensorBoard scalars, and the same numbers as JSON lines.

    The JSON file (`metrics.jsonl` next to the event files) is appended to, so a resumed run
    continues it; where a step appears twice (work redone after a crash), the last line counts.
    """

    _SCALARS = {"loss": "train/loss", "val_loss": "val/loss", "lr": "lr", "grad_norm": "grad_norm",
                "tokens_per_sec": "tokens_per_sec", "mfu": "mfu", "peak_memory_gb": "peak_memory_gb",
                "num_parameters": "num_parameters"}

    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        # A full disk is one line naming the folder (DiskError), never a traceback. TensorBoard
        # writes from a thread of its own, whose disk error the next record() raises.
        self.where = f"logging.tensorboard_dir {folder}"
        threading.excepthook = functools.partial(_quiet_disk_errors, threading.excepthook)
        with disk_errors_named(self.where):
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(folder)
            self.jsonl = open(Path(folder) / METRICS_FILE, "a")

    def record(self, values: dict) -> None:
        with disk_errors_named(self.where):
            for key, value in values.items():
                if key in self._SCALARS:
                    self.writer.add_scalar(self._SCALARS[key], value, values["step"])
            self.jsonl.write(json.dumps(values) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        with disk_errors_named(self.where):
            self.writer.close()
            self.jsonl.close()


def read_metrics(folder: str | Path) -> list[dict]:
    """The records of metrics.jsonl, a later line for the same step and keys replacing an earlier one."""
    latest: dict[tuple, dict] = {}
    for line in (Path(folder) / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        latest[(record["step"], tuple(sorted(record)))] = record
    return sorted(latest.values(), key=lambda r: r["step"])


def _quiet_disk_errors(hook, args) -> None:
    if disk_error_reason(args.exc_value) is None:
        hook(args)
