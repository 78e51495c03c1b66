"""`prism-eval` as a user runs it (subprocesses, and under torchrun at TP=2 over gloo) on a tiny run's
checkpoint: the run's own validation loss, the whole held-out split, and refusals of bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from test_generate import REPO, assert_refused, command_env
from test_train import BIN, prism_train, store, val_losses, write_config  # noqa: F401 (store: a fixture)

STEPS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory, store) -> tuple[Path, dict]:
    """A finished 2-step run: its folder and its run config."""
    folder = tmp_path_factory.mktemp("eval-run")
    config = write_config(folder, store, training={"train_steps": STEPS},
                          checkpoint={"save_interval": STEPS}, logging={"eval_interval": STEPS})
    prism_train("--config", config)
    return folder, config


def prism_eval(*args, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prism_megatron.launch.eval", *map(str, args)]
    if nproc > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "prism_megatron.launch.eval",
               *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**command_env(), "PYTHONPATH": str(REPO)}, cwd=Path.home())
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def json_line(result: subprocess.CompletedProcess) -> dict:
    """The last stdout line, the JSON record."""
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_run_own_validation_loss(run):
    """With the run's validation samples, prism-eval gives the validation loss prism-train logged at the
    checkpoint's step; at TP=2 under torchrun, the same."""
    import yaml

    folder, config = run
    raw = yaml.safe_load(config.read_text())
    samples = raw["logging"]["eval_steps"] * raw["training"]["micro_batch_size"]
    want = val_losses(folder)[STEPS]
    result = prism_eval(folder / "ckpt", "--samples", samples)
    record = json_line(result)
    assert record["step"] == STEPS and record["samples"] == samples and record["checkpoint"].endswith(f"step_{STEPS:08d}")
    assert record["tokens"] == samples * raw["data"]["seq_length"]
    assert record["loss"] == pytest.approx(want, rel=1e-6)
    assert record["perplexity"] == pytest.approx(math.exp(want), rel=1e-6)
    assert "prism-eval" in result.stderr  # the progress bar
    tp2 = json_line(prism_eval(folder / "ckpt", "--samples", samples, "--tensor-parallel", 2, nproc=2))
    assert tp2["loss"] == pytest.approx(want, rel=1e-5)


def test_every_held_out_token_by_default(run, store):
    """The default is one pass over the held-out split, here also named with --stores."""
    from prism_megatron.data_prep.loader import _held_out, document_lengths
    from prism_megatron.data_prep.store import TokenStore

    folder, _ = run
    record = json_line(prism_eval(folder / "ckpt", "--stores", store, "--micro-batch-size", 4))
    lengths = document_lengths(TokenStore.open(store))
    held_out = _held_out(len(lengths), 0.1)  # write_config's valid_fraction
    tokens = int(lengths[held_out].sum()) + int(held_out.sum())  # each document and its EOS
    assert record["samples"] == (tokens - 1) // 32 > 0  # samples of 32 tokens and the next one's label
    assert record["stores"] == [str(store)] and math.isfinite(record["loss"])


@pytest.mark.parametrize("case", ["no-intact-checkpoint", "missing-store", "zero-samples"])
def test_bad_input_is_one_line(case, run, tmp_path):
    folder, _ = run
    (tmp_path / "ckpt" / "step_00000002").mkdir(parents=True)
    args, code, words = {
        "no-intact-checkpoint": ((tmp_path / "ckpt",), 1, "no checkpoint"),
        "missing-store": ((folder / "ckpt", "--stores", tmp_path / "absent"), 1, "no token store manifest at"),
        "zero-samples": ((folder / "ckpt", "--samples", 0), 2, "--samples must be >= 1"),
    }[case]
    assert_refused(prism_eval(*args, check=False), "prism-eval", code, words)
