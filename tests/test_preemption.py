"""`prism-train` stopping on purpose, without Slurm: `training.nonfinite` skip and stop (in fp32
and bf16: the same skipped updates in both), and SIGTERM to the whole process group (as Ctrl-C or
a node drain sends it, loader workers included): save, exit 75, resume step for step; a hung rank
ends the run within training.fault_timeout."""
import os
import re
import signal
import subprocess
import time

import psutil
import pytest
import torch

from prism_megatron.launch.checkpoint import committed
from prism_megatron.launch.preemption import NONFINITE_EXIT, REQUEUE_EXIT
from prism_megatron.launch.metrics import read_metrics
from test_train import BIN, losses, prism_train, store, write_config  # noqa: F401  (store is a fixture)

DIVERGE = ["--set", "optim.lr=1.0e+6"]


def assert_finite_checkpoints(folder):
    for path in committed(folder / "ckpt"):
        states = torch.load(next(path.glob("*model_states.pt")), weights_only=False)["module"]
        assert all(torch.isfinite(v).all() for v in states.values() if torch.is_tensor(v)), path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_skip_counts_and_never_applies(tmp_path, store, precision):
    config = write_config(tmp_path, store, training={"precision": precision, "nonfinite": "skip"})
    result = prism_train("--config", config, *DIVERGE)
    records = read_metrics(tmp_path / "tb")
    bad = [r["step"] for r in records if "loss" in r and not (abs(r["loss"]) < float("inf"))]
    assert bad, "a learning rate of 1e6 should diverge"
    skipped = max(r["skipped_steps"] for r in records if "skipped_steps" in r)
    assert skipped == len(bad) and f"({skipped} skipped in all" in result.stdout
    assert "update skipped" in result.stdout
    assert_finite_checkpoints(tmp_path)


def test_nonfinite_stop_exits_and_keeps_the_last_good_checkpoint(tmp_path, store):
    config = write_config(tmp_path, store, training={"nonfinite": "stop", "nonfinite_patience": 2},
                          checkpoint={"save_interval": 1})
    result = prism_train("--config", config, *DIVERGE, check=False)
    assert result.returncode == NONFINITE_EXIT, result.stderr[-2000:]
    assert "training.nonfinite=stop: 2 steps in a row" in result.stderr
    assert "Traceback" not in result.stderr
    kept = committed(tmp_path / "ckpt")
    assert kept, "the good checkpoints before the divergence are kept"
    # Checkpoints of skipped steps hold the last good weights; the stopping step writes none.
    stopped_at = int(re.search(r"in a row up to step (\d+)", result.stderr).group(1))
    assert int(kept[-1].name.split("_")[1]) < stopped_at
    assert_finite_checkpoints(tmp_path)


def test_sigterm_to_the_process_group_saves_and_resumes(tmp_path, store):
    steps = 40
    reference = tmp_path / "reference"
    prism_train("--config", write_config(reference, store, training={"train_steps": steps}))
    run = tmp_path / "run"
    config = write_config(run, store, training={"train_steps": steps}, data={"num_workers": 1},
                          checkpoint={"save_interval": 1000})
    proc = subprocess.Popen([str(BIN / "prism-train"), "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run / "tb" / "metrics.jsonl").exists() or '"step": 3,' not in (run / "tb" / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT, err[-3000:]
    assert "stop requested (SIGTERM)" in out and "exit code 75" in err
    stopped_at = int(committed(run / "ckpt")[-1].name.split("_")[1])
    assert 3 <= stopped_at < steps
    prism_train("--config", config, "--resume")
    assert losses(run) == losses(reference)


def test_a_hung_rank_ends_the_run_within_the_fault_timeout(tmp_path, store):
    """Rank 1 frozen (SIGSTOP) mid-run: rank 0 gives up after training.fault_timeout, and torchrun
    exits non-zero instead of waiting for the default collective timeout."""
    fault_timeout = 15
    config = write_config(tmp_path, store, training={"train_steps": 200, "fault_timeout": fault_timeout})
    proc = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(BIN / "prism-train"),
                             "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "tb" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.exists() or '"step": 2,' not in metrics.read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children() if "prism-train" in " ".join(p.cmdline())}
    ranks["1"].send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    ranks["0"].wait(timeout=fault_timeout + 60)
    gave_up = time.monotonic() - frozen
    ranks["1"].kill()  # torchrun would wait 30 s for a stopped process to take its SIGTERM
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    assert "rank 0: no progress for" in out or "Timed out" in out or "timed out" in out, out[-3000:]
    # The bound the configuration promises, not a performance figure.
    assert gave_up < fault_timeout + 30
