"""A run's record of its numbers: TensorBoard scalars and the same numbers in `metrics.jsonl`,
written by rank 0 (`MetricsLog`) and read back by the tests, the quality harness and the Slurm
tests (`read_metrics`)."""
from __future__ import annotations

import json
from pathlib import Path

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

        Path(folder).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(folder)
        self.jsonl = open(Path(folder) / METRICS_FILE, "a")

    def record(self, values: dict) -> None:
        for key, value in values.items():
            if key in self._SCALARS:
                self.writer.add_scalar(self._SCALARS[key], value, values["step"])
        self.jsonl.write(json.dumps(values) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()


def read_metrics(folder: str | Path) -> list[dict]:
    """The records of metrics.jsonl, a later line for the same step and keys replacing an earlier one."""
    latest: dict[tuple, dict] = {}
    for line in (Path(folder) / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        latest[(record["step"], tuple(sorted(record)))] = record
    return sorted(latest.values(), key=lambda r: r["step"])
