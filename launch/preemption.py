"""How a run stops on purpose: preemption and time-limit signals, a rank that dies or hangs, and
steps whose loss or gradient norm is not finite.

- `StopRequest`: SIGUSR1, SIGTERM and SIGINT, or the flag file `$PRISM_STOP_FILE` (what the batch
  shell of slurm/train.sbatch creates when Slurm signals it: torchrun forwards no SIGUSR1), only
  set a flag; `requested()` all-reduces it so that every rank stops at the same step.
- `Watchdog`: a rank that sees no progress for `training.fault_timeout` seconds (a peer died or
  hangs inside a collective) exits the process, so the job ends instead of waiting forever.
- `NonFiniteSteps`: `training.nonfinite: skip | stop` for steps with a non-finite loss or
  gradient norm; DeepSpeed skips their update (checked, never assumed); `nonfinite_patience` of
  them in a row end the run under either mode.
- `write_status`: torchrun turns every failing exit code of its workers into 1, so rank 0 also
  writes its exit code and reason to `$PRISM_STATUS_FILE`, which the batch script reads to decide
  between requeueing and stopping.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from prism_megatron.files import write_atomic
from prism_megatron.launch.config import NONFINITE_PATIENCE

log = logging.getLogger("prism-train")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
STOP_FILE_ENV = "PRISM_STOP_FILE"
STATUS_FILE_ENV = "PRISM_STATUS_FILE"

# Exit codes (sysexits.h): saved and stopped, run me again | stopped on diverged training |
# the watchdog gave up on a dead or hung peer | the storage refused a write (full, over quota, failing).
REQUEUE_EXIT = 75
NONFINITE_EXIT = 65
FAULT_EXIT = 70
DISK_EXIT = 74


class RunStopped(Exception):
    """The run ended before `training.train_steps` on purpose; `exit_code` says why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """A stop asked for by a signal or by the flag file, agreed on by all ranks."""

    def __init__(self):
        self.signal_name: str | None = None
        stop_file = os.environ.get(STOP_FILE_ENV)
        self.stop_file = Path(stop_file) if stop_file else None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        # A second Ctrl-C is for a user who will not wait for the save.
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt
        # Only a flag: the step in flight finishes, then all ranks agree and save.
        self.signal_name = signal.Signals(signum).name

    def local_reason(self) -> str | None:
        if self.signal_name:
            return self.signal_name
        if self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        return None

    def requested(self, device) -> bool:
        """True on every rank once any rank has seen a signal or the flag file."""
        flag = torch.tensor([1.0 if self.local_reason() else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def reason(self) -> str:
        return self.local_reason() or "another rank's stop request"


class Watchdog:
    """Exit this process when `beat` has not been called for `timeout` seconds."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.last_beat = time.monotonic()
        self.what = "start-up"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="prism-watchdog", daemon=True)
        self._thread.start()

    def beat(self, what: str) -> None:
        self.last_beat, self.what = time.monotonic(), what

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self.last_beat
            if idle > self.timeout:
                rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
                log.error(f"prism-train: rank {rank}: no progress for {idle:.0f} s after {self.what} "
                          f"(training.fault_timeout={self.timeout:g}): a rank died or hangs; exiting "
                          f"with code {FAULT_EXIT}")
                logging.shutdown()
                os._exit(FAULT_EXIT)


class NonFiniteSteps:
    """Counts steps whose loss or gradient norm is not finite and applies `training.nonfinite`
    and `nonfinite_patience` (None: the mode's NONFINITE_PATIENCE)."""

    def __init__(self, mode: str, patience: int | None):
        self.mode = mode
        self.patience = NONFINITE_PATIENCE[mode] if patience is None else patience
        self.skipped = 0
        self.in_a_row = 0

    def check(self, step: int, loss: float, grad_norm: float, update_skipped: bool) -> str | None:
        """A log line for a non-finite step (None for a finite one); raise RunStopped after
        `patience` of them in a row."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return None
        if not update_skipped:
            raise RunStopped(f"step {step}: loss {loss} / grad norm {grad_norm} are not finite and "
                             "DeepSpeed applied the update anyway; the weights are no longer "
                             "trustworthy, stopping without a checkpoint", NONFINITE_EXIT)
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.patience:
            diverged = "; the run has diverged" if self.mode == "skip" else ""
            raise RunStopped(f"training.nonfinite={self.mode}: {self.in_a_row} steps in a row up to step {step} "
                             f"had a non-finite loss or gradient norm (loss {loss}, grad norm {grad_norm})"
                             f"{diverged}; stopped without saving (training.nonfinite_patience="
                             f"{self.patience})", NONFINITE_EXIT)
        return (f"step {step}: loss {loss} / grad norm {grad_norm} not finite: update skipped "
                f"({self.skipped} skipped in all, {self.in_a_row} in a row)")


def weights_finite(model: torch.nn.Module, device) -> bool:
    """Whether every rank's parameters are all finite (what a checkpoint may be written from)."""
    bad = torch.zeros(1, device=device)
    for param in model.parameters():
        # ZeRO-3 keeps each rank's partition in ds_tensor and leaves the parameter itself empty.
        data = getattr(param, "ds_tensor", param).detach()
        if data.numel() and not torch.isfinite(data).all():
            bad.fill_(1.0)
            break
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


def write_status(exit_code: int, message: str) -> None:
    """Rank 0 records how the run ended for the batch script (when it asks, via the environment).
    Where that fails too (the same full disk), the script counts the run as a failure."""
    path = os.environ.get(STATUS_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        try:
            write_atomic(path, f"{exit_code} {message}\n")
        except OSError as e:
            log.error(f"prism-train: cannot record the exit code in {path}: {e}")
