"""Faults a cluster throws, met as a user meets them (the command, its exit code, its one line): a
disk that fills up under a save, the metrics or prism-prep; two runs in one checkpoint folder; a run
that has diverged for good; a checkpoint that vanishes while a resume reads it. The full disks are
small tmpfs mounts (root only: skipped elsewhere, failed under CI)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import get_context
from pathlib import Path

import pytest

from prism_megatron.files import DiskError, disk_error_reason, folder_bytes, write_atomic
from prism_megatron.launch.checkpoint import format as checkpoint_format
from prism_megatron.launch.checkpoint.format import COMPLETE, committed, newest, read_layout, verify
from prism_megatron.launch.preemption import DISK_EXIT, NONFINITE_EXIT
from prism_megatron.launch.run_lock import LOCK_FILE, RunLock, RunLockError
from test_train import BIN, losses, prism_train, store, write_config  # noqa: F401  (store is a fixture)

DIVERGE = ["--set", "optim.lr=1.0e+6"]


def prism_train_patched(patch: str, *args):
    """prism-train's own main, run after the Python `patch` in the same process: a fault the test
    cannot cause from outside, injected."""
    code = f"{patch}\nimport sys\nfrom prism_megatron.launch.train import main\nmain(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def one_error_line(result, prefix: str = "prism-train: error:") -> str:
    """The refusal as a user sees it: no traceback, one error line (returned)."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


class SmallDisks:
    """Folders on tmpfs mounts of a given size: file systems that fill up (root only)."""

    def __init__(self, root: Path):
        self.root, self.mounted = root, []

    def mount(self, name: str, size: int) -> Path:
        folder = self.root / name
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode:
            if os.environ.get("CI") == "true":
                pytest.fail(f"cannot mount a tmpfs: {result.stderr.strip()}")
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        self.mounted.append(folder)
        return folder

    def resize(self, folder: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


@pytest.fixture
def small_disks(tmp_path):
    disks = SmallDisks(tmp_path)
    yield disks
    for folder in disks.mounted:
        subprocess.run(["umount", str(folder)], check=True)


# ----------------------------------------------------------------------------------------------
# A full disk


def test_a_save_into_a_full_disk_keeps_the_last_checkpoint_and_stops(tmp_path, store, small_disks, monkeypatch):
    """The save of step 6 meets a full checkpoint.dir (the pre-save check switched off, as if another
    writer filled the disk after it): its partial folder goes, step 3 stays whole, one line, exit
    74. A resume on the still full disk stops with the same line before training, on one rank as on
    two; once space is freed it trains."""
    disk = small_disks.mount("disk", 64 << 20)
    config = write_config(tmp_path, store, checkpoint={"dir": str(disk / "ckpt"), "save_interval": 3})
    prism_train("--config", config, "--set", "training.train_steps=3")
    step3 = disk / "ckpt" / "step_00000003"
    size = folder_bytes(step3)
    used = folder_bytes(disk)
    small_disks.resize(disk, used + size // 2)

    result = prism_train_patched("from prism_megatron.launch.checkpoint import disk_space\n"
                                 "disk_space.require_room = lambda *args: None",
                                 "--config", config, "--resume")
    assert result.returncode == DISK_EXIT, result.stdout[-3000:] + result.stderr[-3000:]
    line = one_error_line(result)
    for words in (f"checkpoint.dir {disk / 'ckpt'}", "the save of step 6 failed (No space left on device)",
                  "step_00000006 is removed", "the newest checkpoint is step_00000003", "a save needs", "free"):
        assert words in line, line
    assert [p.name for p in (disk / "ckpt").iterdir() if p.name.startswith("step_")] == ["step_00000003"]
    assert not list((disk / "ckpt").glob("*.tmp")) and not (disk / "ckpt" / LOCK_FILE).exists()
    assert (disk / "ckpt" / "latest").read_text() == "step_00000003"
    verify(step3)

    result = prism_train("--config", config, "--resume", check=False)
    assert result.returncode == DISK_EXIT
    line = one_error_line(result)
    assert f"checkpoint.dir {disk / 'ckpt'}: not enough free space for a checkpoint" in line
    assert "the size of step_00000003" in line and "run again with --resume" in line
    assert "| loss" not in result.stdout  # stopped before training
    # Two ranks: rank 0 decides for both, and records the exit code for the batch script.
    monkeypatch.setenv("PRISM_STATUS_FILE", str(tmp_path / "status"))
    result = prism_train("--config", config, "--resume", nproc=2, check=False)
    assert result.returncode != 0 and result.stderr.count(line) == 2, result.stderr[-3000:]
    assert (tmp_path / "status").read_text() == f"{DISK_EXIT} {line.removeprefix('prism-train: error: ')}\n"

    small_disks.resize(disk, 64 << 20)
    result = prism_train("--config", config, "--resume")
    assert "resumed from" in result.stdout and "step_00000003 at step 3" in result.stdout
    assert sorted(losses(tmp_path))[-3:] == [4, 5, 6]
    verify(disk / "ckpt" / "step_00000006")


def test_a_full_metrics_folder_is_one_line(tmp_path, store, small_disks):
    """TensorBoard's events and metrics.jsonl on a disk of one page, full after the first write."""
    tb = small_disks.mount("tb", 4 << 10)
    config = write_config(tmp_path, store, logging={"tensorboard_dir": str(tb)})
    result = prism_train("--config", config, check=False)
    assert result.returncode == DISK_EXIT, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"logging.tensorboard_dir {tb}: No space left on device" in one_error_line(result)


def test_prism_prep_into_a_full_folder_is_one_line(tmp_path, store, small_disks):
    data = Path(store).parent
    out = small_disks.mount("out", 64 << 10)
    result = subprocess.run([str(BIN / "prism-prep"), "tokenize", str(data / "corpus.jsonl"), "--tokenizer",
                             str(data / "tok.model"), "--output", str(out / "store"), "--workers", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    line = one_error_line(result, "prism-prep tokenize: error:")
    assert "No space left on device" in line and str(out / "store") in line


def test_disk_errors_are_recognised_and_named(tmp_path, small_disks):
    """torch.save reports a full disk as a RuntimeError carrying only the system's words; a failed
    atomic write leaves no temporary file."""
    assert disk_error_reason(RuntimeError("write(): fd 3 failed with No space left on device")) == \
        "No space left on device"
    assert disk_error_reason(OSError(122, "Disk quota exceeded")) == "Disk quota exceeded"
    assert disk_error_reason(ValueError("bad value")) is None
    disk = small_disks.mount("disk", 8 << 10)
    with pytest.raises(DiskError, match=f"{disk / 'big'}: No space left on device"):
        write_atomic(disk / "big", b"x" * (64 << 10))
    assert list(disk.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# One run per folder


def test_a_second_run_in_the_folder_is_refused_and_a_killed_ones_lock_taken_over(tmp_path, store):
    config = write_config(tmp_path, store, training={"train_steps": 1000}, checkpoint={"save_interval": 2})
    first = subprocess.Popen([str(BIN / "prism-train"), "--config", str(config)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not committed(tmp_path / "ckpt"):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = prism_train("--config", config, "--resume", check=False)
        assert second.returncode == 1
        line = one_error_line(second)
        assert f"checkpoint.dir {tmp_path / 'ckpt'} is in use by another run" in line
        assert f"pid {first.pid}" in line and "last heartbeat" in line
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate()
    resumed_from = newest(tmp_path / "ckpt")
    assert resumed_from is not None
    step = int(resumed_from.name.removeprefix("step_"))
    third = prism_train("--config", config, "--resume", "--set", f"training.train_steps={step + 2}")
    assert f"took over the lock of a run that is gone (host {socket.gethostname()}, pid {first.pid}" in third.stdout
    assert f"pid {first.pid} no longer exists" in third.stdout
    assert f"resumed from {resumed_from} at step {step}" in third.stdout
    assert not (tmp_path / "ckpt" / LOCK_FILE).exists()


def stale_lock(folder: Path, host: str = "elsewhere", age: float = 3600.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": 1, "job": "77", "started": time.time() - age, "token": "old"}))
    os.utime(path, (time.time() - age, time.time() - age))


def _hold_from_elsewhere(folder, stale_after, held, seconds=600.0):
    socket.gethostname = lambda: "elsewhere"  # so that only the heartbeat says it is alive
    lock = RunLock(folder, stale_after)
    lock.acquire()
    held.set()
    time.sleep(seconds)
    lock.release()


def test_run_lock_refuses_a_live_holder_and_takes_over_a_silent_one(tmp_path):
    context = get_context("fork")
    held = context.Event()
    holder = context.Process(target=_hold_from_elsewhere, args=(tmp_path, 0.4, held))  # beats every 0.1 s
    holder.start()
    assert held.wait(60)
    time.sleep(1.0)  # several stale_after periods: only the heartbeat keeps the lock fresh
    with pytest.raises(RunLockError, match=f"in use by another run \\(host elsewhere, pid {holder.pid}"):
        RunLock(tmp_path, stale_after=0.4).acquire()
    holder.kill()
    holder.join()
    time.sleep(0.5)
    lock = RunLock(tmp_path, stale_after=0.4)
    assert "longer than training.fault_timeout=0.4" in (lock.acquire() or "")
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()

    stale_lock(tmp_path, age=60)
    with pytest.raises(RunLockError, match="host elsewhere, pid 1, Slurm job 77"):
        RunLock(tmp_path, stale_after=120).acquire()
    lock = RunLock(tmp_path, stale_after=30)
    assert "no heartbeat for 60 s, longer than training.fault_timeout=30" in (lock.acquire() or "")
    lock.check()
    lock.release()

    # Taken over behind its back (it looked gone), a holder learns so at its next heartbeat, and
    # leaves the lock that is no longer its own alone.
    lock = RunLock(tmp_path, stale_after=0.4)
    lock.acquire()
    stale_lock(tmp_path, age=0)
    time.sleep(0.5)
    with pytest.raises(RunLockError, match="another run has taken this folder over"):
        lock.check()
    lock.release()
    assert (tmp_path / LOCK_FILE).exists()


def test_a_requeued_run_waits_for_its_own_jobs_earlier_run_and_for_no_other(tmp_path, monkeypatch, caplog):
    context = get_context("fork")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    held = context.Event()
    holder = context.Process(target=_hold_from_elsewhere, args=(tmp_path, 0.4, held, 2.0))
    holder.start()
    assert held.wait(60)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(tmp_path, stale_after=0.4)
    assert lock.acquire(patience=60) is None  # the earlier run released it after 2 s
    assert f"still held by this job's previous run (host elsewhere, pid {holder.pid}, Slurm job 77" in caplog.text
    assert "waiting up to 60 s for it to end" in caplog.text
    lock.release()
    holder.join()

    # One that goes silent while waited for is taken over.
    held = context.Event()
    holder = context.Process(target=_hold_from_elsewhere, args=(tmp_path, 0.4, held))
    holder.start()
    assert held.wait(60)
    threading.Timer(1.0, holder.kill).start()
    lock = RunLock(tmp_path, stale_after=0.4)
    assert "longer than training.fault_timeout=0.4" in (lock.acquire(patience=60) or "")
    lock.release()
    holder.join()

    held = context.Event()
    holder = context.Process(target=_hold_from_elsewhere, args=(tmp_path, 0.4, held))
    holder.start()
    assert held.wait(60)
    try:
        started = time.monotonic()
        with pytest.raises(RunLockError, match=f"in use by another run \\(host elsewhere, pid {holder.pid}, "
                                               "Slurm job 77.*; still alive after 1 s of waiting"):
            RunLock(tmp_path, stale_after=0.4).acquire(patience=1.0)
        assert time.monotonic() - started >= 1.0
        # Another job's run, or a first start of this one, is refused at once.
        for job, restarts in (("78", "1"), ("77", "0")):
            monkeypatch.setenv("SLURM_JOB_ID", job)
            monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
            started = time.monotonic()
            with pytest.raises(RunLockError, match="in use by another run") as refused:
                RunLock(tmp_path, stale_after=0.4).acquire(patience=60)
            assert time.monotonic() - started < 10 and "waiting" not in str(refused.value)
    finally:
        holder.kill()
        holder.join()


def _take_over(folder, start, results):
    start.wait()
    try:
        RunLock(folder, stale_after=30).acquire()
        results.put("won")
        time.sleep(2)  # hold it while the others try
    except RunLockError:
        results.put("refused")


def test_runs_taking_over_one_stale_lock_at_once_leave_exactly_one_holder(tmp_path):
    context = get_context("fork")
    for _ in range(3):
        stale_lock(tmp_path)
        start, results = context.Event(), context.Queue()
        runs = [context.Process(target=_take_over, args=(tmp_path, start, results)) for _ in range(6)]
        for run in runs:
            run.start()
        start.set()
        outcomes = sorted(results.get(timeout=60) for _ in runs)
        for run in runs:
            run.join()
        assert outcomes == ["refused"] * 5 + ["won"]
        assert not list(tmp_path.glob(f"{LOCK_FILE}.*"))



def test_a_takeover_left_half_done_is_finished_and_one_under_way_is_waited_for(tmp_path, caplog):
    # A run that claimed the stale lock and died before replacing it.
    stale_lock(tmp_path)
    claim = tmp_path / f"{LOCK_FILE}.next.old"
    claim.write_text(json.dumps({"host": "elsewhere", "pid": 2, "job": "77", "started": 0, "token": "dead"}))
    os.utime(claim, (time.time() - 60, time.time() - 60))
    lock = RunLock(tmp_path, stale_after=30)
    assert "no heartbeat for 3600 s" in (lock.acquire() or "")
    assert [path.name for path in tmp_path.iterdir()] == [LOCK_FILE]
    lock.release()

    # A live run claimed it and is replacing it: wait, then find that run holding the lock.
    stale_lock(tmp_path)
    claim.write_text(json.dumps({"host": "elsewhere", "pid": 2, "job": "77", "started": 0, "token": "live"}))

    def finish_taking_over():
        (tmp_path / "new").write_text(json.dumps({"host": "elsewhere", "pid": 2, "job": "77",
                                                  "started": time.time(), "token": "live"}))
        os.rename(tmp_path / "new", tmp_path / LOCK_FILE)
        claim.unlink()

    threading.Timer(1.5, finish_taking_over).start()
    with pytest.raises(RunLockError, match="in use by another run \\(host elsewhere, pid 2"):
        RunLock(tmp_path, stale_after=30).acquire()
    assert "another run (host elsewhere, pid 2, Slurm job 77" in caplog.text
    assert f"is taking over the lock of a run that is gone ({claim}): waiting" in caplog.text
    assert [path.name for path in tmp_path.iterdir()] == [LOCK_FILE]

# ----------------------------------------------------------------------------------------------
# A diverged run


@pytest.mark.parametrize("mode, patience", [("skip", 10), ("stop", 3)])
def test_a_diverged_run_stops_with_exit_65(tmp_path, store, mode, patience):
    config = write_config(tmp_path, store, training={"nonfinite": mode, "train_steps": 20})
    result = prism_train("--config", config, *DIVERGE, check=False)
    assert result.returncode == NONFINITE_EXIT, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("prism-train:")]
    assert f"training.nonfinite={mode}: {patience} steps in a row" in line and "stopped without saving" in line
    assert ("the run has diverged" in line) == (mode == "skip")


def test_one_nan_step_under_skip_is_skipped_and_the_run_finishes(tmp_path, store):
    config = write_config(tmp_path, store, training={"nonfinite": "skip"})
    # The loss of step 2's first micro batch is NaN, so are its gradients: that update is skipped.
    result = prism_train_patched(
        "from prism_megatron.launch import trainer\n"
        "forward, calls = trainer.forward, []\n"
        "def nan_once(engine, batch):\n"
        "    loss = forward(engine, batch)\n"
        "    calls.extend([None] if engine.module.training else [])\n"
        "    return loss * float('nan') if engine.module.training and len(calls) == 3 else loss\n"
        "trainer.forward = nan_once",
        "--config", config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step 2: loss nan" in result.stdout and "(1 skipped in all, 1 in a row)" in result.stdout
    assert sorted(losses(tmp_path)) == list(range(1, 7))
    verify(tmp_path / "ckpt" / "step_00000006")


# ----------------------------------------------------------------------------------------------
# A checkpoint that vanishes while it is read


def fake_checkpoint(ckpt_dir: Path, step: int) -> Path:
    path = ckpt_dir / checkpoint_format.tag_for(step)
    path.mkdir(parents=True)
    for name in ("a.pt", "b.pt", "layout.json"):
        (path / name).write_text(json.dumps({"tensor_parallel": 1, "data_parallel": 1, "zero_stage": 1, "n": name}))
    files = {f.name: checkpoint_format.file_record(f) for f in path.iterdir()}
    (path / COMPLETE).write_text(json.dumps({"step": step, "files": files}))
    return path


def test_a_checkpoint_pruned_while_read_is_named_so_and_the_next_one_taken(tmp_path, monkeypatch, caplog):
    older, newer = fake_checkpoint(tmp_path, 3), fake_checkpoint(tmp_path, 6)
    record = checkpoint_format.file_record

    def pruned_by_another_run(f):
        if f.parent == newer and newer.exists():
            (newer / COMPLETE).unlink()
            for other in newer.iterdir():
                other.unlink()
            newer.rmdir()
        return record(f)

    monkeypatch.setattr(checkpoint_format, "file_record", pruned_by_another_run)
    assert newest(tmp_path) == older
    assert f"checkpoint {newer} vanished or changed while being read: another run may be writing {tmp_path}" \
        in caplog.text
    assert "layout" not in caplog.text

    shutil.rmtree(older)
    with pytest.raises(checkpoint_format.CheckpointError, match="vanished or changed while being read"):
        read_layout(older)
