"""benchmarks/training_curve.py, the training-curve guard: the pinned runs of the three solvers train
to the golden curves on the CPU (as a user runs the check), a curve that moved is named by solver,
quantity and step, golden against got, and the data are the same everywhere."""
import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GUARD = ROOT / "benchmarks" / "training_curve.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

from training_curve import TOLERANCE, compare, golden_path, recall_documents  # noqa: E402


def guard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GUARD), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_cpu_curves_match_the_golden_file():
    result = guard("check", "--device", "cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("prism, split, none: every step within its relative tolerance (loss 1e-06, grad_norm 1e-06, "
            "val_loss 1e-06) of") in result.stdout


@pytest.mark.gpu
def test_the_gpu_curves_match_the_golden_file():
    result = guard("check", "--device", "gpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_what_cannot_be_checked_is_one_line():
    if not torch.cuda.is_available():
        result = guard("check", "--device", "gpu")
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip() == "training_curve: error: --device gpu: no CUDA device here (use --device cpu)"
    result = guard("update", "--device", "cpu", "--set", "training.micro_batch_size=2")
    assert result.returncode == 2 and "--set applies to run only" in result.stderr.splitlines()[-1]


def test_a_moved_curve_is_named_by_solver_quantity_and_step():
    golden = json.loads(golden_path("cpu").read_text())
    assert compare(golden, golden, TOLERANCE["cpu"]) == []
    got = copy.deepcopy(golden)
    loss, val = golden["curves"]["prism"]["loss"][6], golden["curves"]["none"]["val_loss"]["20"]
    got["curves"]["prism"]["loss"][6] = loss * (1 + 1e-4)
    got["curves"]["prism"]["loss"][9] *= 1 - 1e-3
    got["curves"]["none"]["val_loss"]["20"] = val + 0.01
    got["curves"]["split"]["grad_norm"][3] *= 1 + 5e-7  # within the tolerance
    assert compare(golden, got, TOLERANCE["cpu"]) == [
        f"prism: loss at step 7: golden {loss:.6f}, got {loss * (1 + 1e-4):.6f} (relative difference 1.0e-04); "
        "2 of 30 steps outside rel 1e-06",
        f"none: val_loss at step 20: golden {val:.6f}, got {val + 0.01:.6f} (relative difference {0.01 / val:.1e}); "
        "1 of 4 steps outside rel 1e-06"]
    del got["curves"]["split"]
    got["config_sha256"] = "0" * 64
    problems = compare(golden, got, TOLERANCE["cpu"])
    assert problems[0] == "curves.yaml changed since the golden curves were written: run update"
    assert "split: no curve trained" in problems


def test_the_data_are_the_same_everywhere():
    """The recall data come from random.Random(seed).random() alone, whose sequence Python keeps
    across versions and platforms: the documents the golden files were trained on."""
    documents = recall_documents(1500, 20261206)
    assert sum(map(len, documents)) == 106_704 and all(4 <= t < 256 for d in documents for t in d)
    assert hashlib.sha256(json.dumps(documents).encode()).hexdigest() == (
        "cfd6eaf9efae9507941ccc17fbef6d07b1afc06875ce4d462c9ee828c84c3f21")
