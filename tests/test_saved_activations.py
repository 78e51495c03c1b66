"""benchmarks/saved_activations.py: what a layer keeps for the backward, counted on the CPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from saved_activations import saved_per_token  # noqa: E402

TINY = ROOT / "launch/configs/tiny.yaml"


@pytest.fixture(autouse=True)
def restore_environment():
    """saved_per_token starts torch.distributed as rank 0 of 1, which sets the rendezvous variables
    (RANK, MASTER_PORT, ...); left set, they would send later tests' processes to its port."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def kept(recompute: str) -> float:
    per_module = saved_per_token(TINY, ["model.kernel_backend=torch", f"model.recompute={recompute}"], 64)
    return sum(per_token for rows in per_module.values() for *_, per_token in rows)


def test_a_layer_keeps_less_with_more_recomputation():
    # full: the block is checkpointed from outside it, so nothing inside it is saved.
    assert kept("full") == 0 < kept("selective") < kept("none")


def test_the_convolutions_output_is_not_kept():
    """The mixer forms the convolution's output (q, k, v and the anchor u: 4 x 4 heads x 64 channels of
    tiny.yaml, bf16) again in the backward: no bf16 storage of that width is kept."""
    per_module = saved_per_token(TINY, ["model.kernel_backend=torch"], 64)
    conv_bytes = 4 * 4 * 64 * 2
    assert per_module["mixer"]
    assert not [row for row in per_module["mixer"] if row[1:] == ("bfloat16", conv_bytes)], per_module["mixer"]


def test_the_command_prints_the_table():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/saved_activations.py"), "--config", str(TINY),
                             "--tokens", "64", "--set", "model.kernel_backend=torch"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "one layer keeps" in result.stdout and "mixer" in result.stdout and "mlp" in result.stdout


def test_a_bad_setting_is_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/saved_activations.py"), "--config", str(TINY),
                             "--set", "model.solver=maybe"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "model.solver" in result.stderr
