"""benchmarks/quality.py end to end as a user runs it: tiny configurations x two seeds, two runs at a
time, then the same command again (nothing is trained twice), a configuration that cannot run, a
changed configuration over an old run, and a run stopped by the time limit."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_train import store, write_config  # noqa: F401 (store is a fixture)

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def quality(cwd: Path, *args):
    return subprocess.run([sys.executable, str(QUALITY), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_quality_end_to_end(tmp_path, store):
    base = write_config(tmp_path / "base", store, training={"train_steps": 4},
                        logging={"log_interval": 1, "eval_interval": 2, "eval_steps": 1})
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"base": str(base), "seeds": [1, 2], "configurations": {
        "prism": {"set": ["model.solver_steps=2"]},
        "split": {"set": ["model.solver=split", "model.solver_steps=1", "model.solver_rank=4"]},
        "broken": {"set": ["model.solver_steps=9"]}}}))
    result = quality(tmp_path, plan, "--out", "out", "--parallel", "2")
    out, reports, log = tmp_path / "out", tmp_path / "out" / "plan", result.stdout
    assert result.returncode == 1, log + result.stderr  # the broken configuration
    # Two at a time: the second run starts before the first ends.
    events = re.findall(r"^(prism|split) seed (\d): (started|finished)", log, re.M)
    assert [e[2] for e in events[:2]] == ["started", "started"] and len(events) == 8, log
    assert "broken seed 1: not started: " in log and "4/6 runs finished" in log

    report = json.loads((reports / "quality.json").read_text())
    rows = {(r["configuration"], r["seed"]): r for r in report["runs"]}
    assert len(rows) == 6 and report["device"].startswith("CPU") and report["date"]
    for name in ("prism", "split"):
        for seed in (1, 2):
            r = rows[name, seed]
            assert r["status"] == "finished" and r["steps"] == 4 and math.isfinite(r["val_loss"])
            assert r["perplexity"] == math.exp(r["val_loss"]) and [s for s, _ in r["val_curve"]] == [0, 2, 4]
            assert (out / "runs" / name / f"seed{seed}" / "tensorboard" / "metrics.jsonl").is_file()
    assert rows["prism", 1]["val_loss"] != rows["prism", 2]["val_loss"]  # the seed reached the run
    assert rows["prism", 1]["num_parameters"] != rows["split", 1]["num_parameters"] > 0
    assert rows["broken", 2]["status"] == "failed" and "model.solver_steps=9" in rows["broken", 2]["error"]
    summary = {c["configuration"]: c for c in report["configurations"]}
    losses = [rows["split", s]["val_loss"] for s in (1, 2)]
    assert summary["split"]["seeds"] == 2 and math.isclose(summary["split"]["val_loss_mean"], sum(losses) / 2)
    assert math.isclose(summary["split"]["val_loss_std"], abs(losses[0] - losses[1]) / math.sqrt(2))
    assert summary["broken"]["seeds"] == 0 and summary["broken"]["val_loss_mean"] is None

    table = (reports / "quality.md").read_text()
    assert re.search(rf"^\| split \| 2 \| {rows['split', 2]['num_parameters']:,} \| 4/4 \| .* \| "
                     rf"{rows['split', 2]['val_loss']:.4f} \| .* \| finished \|$", table, re.M), table
    assert re.search(rf"^\| split \| [\d,]+ \| 2 \| {summary['split']['val_loss_mean']:.4f} \| ", table, re.M), table
    assert re.search(r"^\| broken \| 1 \| .* \| failed: .*model.solver_steps", table, re.M), table
    png = (reports / "quality.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # The same command again: every run that finished is left alone.
    again = quality(tmp_path, plan, "--out", "out", "--parallel", "2")
    assert again.stdout.count("finished already") == 4 and ": started" not in again.stdout, again.stdout

    # A configuration changed under an existing run folder is refused, not mixed with the old run.
    plan.write_text(plan.read_text().replace("model.solver_rank=4", "model.solver_rank=2"))
    changed = quality(tmp_path, plan, "--out", "out", "--only", "split", "--seeds", "1")
    assert changed.returncode == 1 and "holds a run of other settings" in changed.stdout, changed.stdout

    # A new seed cut short by the time limit: asked to stop, the run is resumable, not failed.
    cut = quality(tmp_path, plan, "--out", "out", "--only", "prism", "--seeds", "3", "--time-limit", "1")
    assert cut.returncode == 1 and "time limit" in cut.stdout, cut.stdout + cut.stderr
    (row,) = json.loads((reports / "quality.json").read_text())["runs"]
    assert row["seed"] == 3 and row["status"] == "stopped", row


# Per plan: the tokens of each run, and each configuration's parameters as docs/QUALITY.md section 1
# (screen.yaml), docs/SOLVERS.md sections 5 and 6 (screen-125m.yaml), docs/QUALITY.md section 12
# (screen-demo.yaml) and section 13 (verdict-125m.yaml) state them.
PLANS = {
    "screen.yaml": (52_428_800, {"none": 116_830_608, "prism-L2": 127_466_016, "prism-L3": 129_843_816,
                                 "split-L2-r32": 125_751_840}),
    "screen-125m.yaml": (9_830_400, {"none": 116_830_608, "prism-L2": 127_466_016, "prism-L1": 125_088_216,
                                     "prism-L2-first-residual-v": 127_466_016, "prism-L2-erase-from-input": 127_512_024,
                                     "prism-L2-extra-strength-4": 127_466_016, "prism-L2-conv7": 127_576_608,
                                     "split-L2-r32-authors-init": 125_751_840, "none-ffn2432": 127_447_440}),
    "screen-demo.yaml": (307_200, {"none": 2_719_192, "prism-L2": 3_017_968, "prism-L1": 2_918_116,
                                   "prism-L2-first-residual-v": 3_017_968, "prism-L2-erase-from-input": 3_019_492,
                                   "prism-L2-extra-strength-4": 3_017_968, "prism-L2-conv7": 3_027_184,
                                   "split-L2-r32-authors-init": 3_020_272, "none-ffn640": 3_014_104,
                                   "prism-L3": 3_117_820, "prism-L3-first-residual-v": 3_117_820}),
    "verdict-125m.yaml": (52_428_800, {f"{name}-lr{lr}": size for name, size in (
        ("none", 116_830_608), ("prism-L2-first-residual-v", 127_466_016)) for lr in ("5e-4", "1e-3", "2e-3")}),
}


@pytest.mark.parametrize("plan", PLANS)
def test_screen_plan_builds_the_documented_models(plan, monkeypatch, single_process):
    """A screen's plan reads, and each configuration is a valid run of the documented size and tokens
    (on the meta device: nothing allocated, nothing trained)."""
    import importlib.util

    import torch

    from prism_megatron.config import ParallelConfig
    from prism_megatron.model import PrismLM

    spec = importlib.util.spec_from_file_location("quality", QUALITY)
    harness = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quality", harness)  # its dataclasses look their module up
    spec.loader.exec_module(harness)
    monkeypatch.chdir(QUALITY.parents[1])  # plans name their paths from the repository root
    # A plan on the demo's store takes it from the command line, as its comment says.
    extra = ["data.stores=[unused]"] if plan == "screen-demo.yaml" else []
    configurations, seeds = harness.read_plan(Path("benchmarks/plans") / plan, extra, None, [])
    runs = harness.make_runs(configurations, seeds, Path("unused"))
    tokens, documented = PLANS[plan]
    sizes = {}
    for run in runs:
        assert run.status == "pending", run.error
        training = run.config.training
        assert training.train_steps * training.global_batch_size * run.config.data.seq_length == tokens
        # A learning-rate sweep's configuration trains at the rate its name says, decaying to a tenth.
        _, _, rate = run.configuration.name.partition("-lr")
        if rate:
            assert (run.config.optim.lr, run.config.optim.min_lr) == pytest.approx((float(rate), float(rate) / 10))
        with torch.device("meta"):
            sizes[run.configuration.name] = PrismLM(run.config.model, ParallelConfig()).num_parameters()
    assert sizes == documented
