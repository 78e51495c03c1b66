"""`prism-demo` end to end as a user runs it, with a short training (the full demo is `make demo`)."""

import re
import subprocess
import sys
from pathlib import Path

from prism_megatron.launch.checkpoint.format import COMPLETE

DEMO = str(Path(sys.executable).with_name("prism-demo"))


def prism_demo(workdir, *overrides):
    args = [DEMO, "--workdir", str(workdir)]
    for item in overrides:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"prism-demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "ms per token" in result.stderr
    return result.stdout


def test_demo_end_to_end_then_cached(tmp_path):
    short = ["training.train_steps=8", "optim.warmup_steps=2", "logging.log_interval=4",
             "logging.eval_interval=4", "logging.eval_steps=1", "checkpoint.save_interval=4"]
    out = prism_demo(tmp_path, *short)
    assert re.search(r"corpus: [\d,]+ files", out) and "tokenizer: training" in out
    assert re.search(r"step 4/8 \| loss [\d.]+ \| lr", out)
    summary = out[out.index("PRISM demo: summary"):]
    for label in ("model", "train loss", "val loss", "throughput", "checkpoint", "TensorBoard", "time"):
        assert re.search(rf"^  {label}\s", summary, re.M), f"summary lacks {label!r}:\n{summary}"
    ckpt = tmp_path / "train" / "checkpoints" / "step_00000008"
    assert str(ckpt) in summary and (ckpt / COMPLETE).is_file()
    assert list((tmp_path / "train" / "tensorboard").glob("events.out.tfevents.*"))
    # It ends with what the trained model writes from a prompt (and the time per token, on stderr).
    written = out[out.index("What it writes (prism-generate"):].splitlines()
    assert len(written) > 1 and written[1].startswith("def ")

    # A rerun reuses the corpus, tokenizer and store, and replaces the previous training run.
    out = prism_demo(tmp_path, "training.train_steps=2", *short[1:])
    assert "corpus: " in out and "(cached)" in out and "tokenizer: training" not in out
    assert not (tmp_path / "train" / "checkpoints" / "step_00000008").exists()
    assert (tmp_path / "train" / "checkpoints" / "step_00000002" / COMPLETE).is_file()
