"""benchmarks/scaling.py run as a user runs it, on the CPU (gloo): torchrun with 2 ranks over TP=2 (+SP),
CP=2 and a layout that does not fit, weak and strong, with full recomputation, writes its JSON, table
and plot; a bare process is one rank (selective recomputation there); bad options are one-line
errors. About a minute on 2 cores. (slurm/scaling.sbatch: tests/test_slurm.py.)"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
HARNESS = REPO / "benchmarks" / "scaling.py"
# The tiny preset, smaller still: the cases take milliseconds, the run is start-up and bookkeeping.
TINY = ["--config", str(REPO / "launch/configs/tiny.yaml"), "--warmup", "1", "--steps", "2",
        *[arg for item in ("model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.head_k_dim=8",
                           "model.head_v_dim=8", "model.ffn_hidden_size=64", "model.vocab_size=256")
          for arg in ("--set", item)]]


def harness(*args, nproc=1, check=True):
    command = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    result = subprocess.run([*command, str(HARNESS), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"the harness failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def progress_lines(output: str) -> list[str]:
    return re.findall(r"^\[\d+/\d+\] .*$", output, re.MULTILINE)


def check_reports(out: Path, rows: int) -> dict:
    """results.json, scaling.md and scaling.png as the harness leaves them; the results."""
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == rows
    table = (out / "scaling.md").read_text()
    assert "CPU" in table and "not performance" in table
    assert len([line for line in table.splitlines() if line.startswith("| ") and "---" not in line]) == rows + 1
    with Image.open(out / "scaling.png") as image:
        assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 300
        image.verify()
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling") / "out"
    result = harness(out, *TINY, "--layouts", "tp2sp", "cp2", "tp4", "--scaling", "weak", "strong",
                     "--seq-lengths", "32", "--recompute", "full", nproc=2)
    return out, result.stdout


def test_two_ranks_measure_every_case_and_write_the_reports(two_ranks):
    out, log = two_ranks
    # Per layout: the kernel, the layer and the model, weak and strong.
    results = check_reports(out, rows=3 * 3 * 2)
    assert len(progress_lines(log)) == 18
    assert results["gpus"] == 2 and results["device_type"] == "cpu" and results["dtype"] == "float32"
    measured = [row for row in results["rows"] if row["tp"] * row["cp"] <= 2]
    assert len(measured) == 12 and not any("error" in row for row in measured)
    for row in measured:
        assert row["step_time_s"] > 0 and 0 <= row["comm_share"] <= 1 and row["peak_memory_gb"] is None
        assert row["tokens_per_s_per_gpu"] == pytest.approx(row["step_tokens"] / row["step_time_s"] / 2)
        assert row["dp"] == 1 and row["samples"] == 1
        # Weak: every GPU's share is T (the sample spans the TP or CP pair); strong: the step is T.
        assert row["sample_tokens"] == (64 if row["scaling"] == "weak" else 32)
        # The CP exchange and the TP/SP collectives are gloo operations the profiler sees; the
        # recurrence alone needs none under TP (each rank runs its own heads).
        assert (row["comm_share"] > 0) == (row["case"] != "kernel" or row["cp"] == 2)
    assert {(row["layout"], row["case"], row["recompute"]) for row in measured} == {
        (layout, case, recompute) for layout in ("tp2cp1dp1sp", "tp1cp2dp1")
        for case, recompute in (("kernel", None), ("layer", "full"), ("model", "full"))}


def test_a_layout_that_does_not_fit_is_rows_with_its_error(two_ranks):
    out, log = two_ranks
    failed = [row for row in json.loads((out / "results.json").read_text())["rows"] if row["tp"] == 4]
    assert len(failed) == 6
    assert all(row["error"] == "ValueError: TP x CP = 4 x 1 does not divide the world size 2" for row in failed)
    assert sum("tp4cp1" in line and "FAILED" in line for line in progress_lines(log)) == 6


def test_a_bare_process_is_one_rank(tmp_path):
    result = harness(tmp_path, *TINY, "--cases", "kernel", "layer", "--seq-lengths", "16", "32",
                     "--recompute", "none", "selective")
    results = check_reports(tmp_path, rows=6)
    assert [row["layout"] for row in results["rows"]] == ["tp1cp1dp1"] * 6  # the one layout of one rank
    assert [(row["case"], row["recompute"]) for row in results["rows"]] == \
        [("kernel", None)] * 2 + [("layer", "none"), ("layer", "selective")] * 2
    assert all(row["sample_tokens"] == row["scale_tokens"] and row["comm_share"] == 0 for row in results["rows"])
    assert len(progress_lines(result.stdout)) == 6


@pytest.mark.parametrize("args, message", [
    (["--layouts", "tp2x"], "--layouts: 'tp2x' is not tpN, cpN, tpNcpN"),
    (["--layouts", "cp2sp"], "--layouts: 'cp2sp': sequence parallelism (sp) needs tp > 1"),
    (["--set", "parallel.context_parallel_size=2"], "parallel.context_parallel_size=2: the harness sets this key"),
    (["--set", "model.num_heads=0"], "model.num_heads must be >= 1"),
    (["--steps", "0"], "--steps: must be >= 1"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    result = harness(tmp_path / "out", *args, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()
