"""`prism-train`, run as a user runs it (subprocesses): config errors, a tiny run's checkpoints and
logs, determinism, bitwise resume after a crash, a damaged checkpoint, two data-parallel ranks."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from prism_megatron.data_prep.tokenize import tokenize_corpus
from prism_megatron.data_prep.tokenizer import train_tokenizer
from prism_megatron.launch.checkpoint import COMPLETE
from prism_megatron.launch.config import load_config
from prism_megatron.launch.train import lr_at, read_metrics

BIN = Path(sys.executable).parent
STEPS = 6


def prism_train(*args, nproc=1, check=True):
    cmd = [str(BIN / "prism-train"), *map(str, args)]
    if nproc > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A token store of some standard-library modules, with a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]:
            f.write(json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")}) + "\n")
    tokenizer = train_tokenizer([str(corpus)], str(root / "tok.model"), 512, sample_lines=20_000, seed=0)
    return tokenize_corpus([str(corpus)], tokenizer, str(root / "store"))


def write_config(folder: Path, store: str, **sections) -> Path:
    config = {
        "model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "head_k_dim": 16,
                  "head_v_dim": 16, "ffn_hidden_size": 64, "solver_steps": 2, "kernel_backend": "torch"},
        "data": {"stores": [store], "seq_length": 32, "with_cu_seqlens": True, "valid_fraction": 0.1},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "training": {"train_steps": STEPS, "micro_batch_size": 2, "global_batch_size": 4, "seed": 7},
        "checkpoint": {"dir": str(folder / "ckpt"), "save_interval": 3, "keep_last": 0},
        "logging": {"log_interval": 1, "eval_interval": 3, "eval_steps": 2, "tensorboard_dir": str(folder / "tb")},
    }
    for name, values in sections.items():
        config[name].update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(folder / "tb") if "loss" in r}


def val_losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(folder / "tb") if "val_loss" in r}


def test_config_errors_name_the_file_and_the_key(tmp_path):
    config = write_config(tmp_path, "unused")
    raw = yaml.safe_load(config.read_text())
    raw["training"]["trian_steps"] = 5
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(raw))
    result = prism_train("--config", bad, check=False)
    assert result.returncode != 0
    assert str(bad) in result.stderr and "training.trian_steps" in result.stderr

    result = prism_train("--config", config, "--set", "optim.learning_rate=1", check=False)
    assert result.returncode != 0 and "optim.learning_rate" in result.stderr
    result = prism_train("--config", config, "--set", "training.train_steps=many", check=False)
    assert result.returncode != 0 and "training.train_steps" in result.stderr and "expected int" in result.stderr
    result = prism_train("--config", config, "--set", "training.zero_stage=7", check=False)
    assert result.returncode != 0 and "training.zero_stage" in result.stderr
    result = prism_train("--config", tmp_path / "missing.yaml", check=False)
    assert result.returncode != 0 and "missing.yaml" in result.stderr


def test_presets_load_and_schedule_shape():
    configs = Path(__file__).parents[1] / "launch" / "configs"
    for name in ("tiny", "1.3b", "2.7b", "7b", "demo"):
        cfg = load_config(configs / f"{name}.yaml", ["data.stores=[somewhere]"])
        assert cfg.training.global_batch_size % cfg.training.micro_batch_size == 0
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.training.train_steps = 1.0, 0.1, 10, 110
    lrs = [lr_at(step, cfg) for step in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[10] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lr_at(110, cfg) == pytest.approx(0.1)


def test_train_deterministic_and_resumes_bitwise(tmp_path, store):
    first, second = tmp_path / "first", tmp_path / "second"
    prism_train("--config", write_config(first, store))
    # The run's products: committed checkpoints, our own `latest`, TensorBoard events, metrics.
    ckpts = first / "ckpt"
    assert (ckpts / "step_00000003" / COMPLETE).is_file() and (ckpts / "step_00000006" / COMPLETE).is_file()
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert list((first / "tb").glob("events.out.tfevents.*"))
    reference = losses(first)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert sorted(val_losses(first)) == [0, 3, 6]
    assert all(r["grad_norm"] > 0 for r in read_metrics(first / "tb") if "grad_norm" in r)

    # The same config and seed give the same losses, to the bit.
    prism_train("--config", write_config(second, store))
    assert losses(second) == reference and val_losses(second) == val_losses(first)

    # A crash while saving step 6 leaves it uncommitted: --resume continues from step 3 and
    # reproduces steps 4..6 of the uninterrupted run exactly.
    (second / "ckpt" / "step_00000006" / COMPLETE).unlink()
    result = prism_train("--config", write_config(second, store), "--resume")
    assert "resumed from" in result.stdout and "step_00000003" in result.stdout
    assert losses(second) == reference and val_losses(second) == val_losses(first)

    # Starting afresh over committed checkpoints would lose them: refused.
    result = prism_train("--config", write_config(second, store), check=False)
    assert result.returncode != 0 and "--resume" in result.stderr

    # A truncated checkpoint file: skipped with a line naming it, and the previous one resumed.
    victim = next((ckpts / "step_00000006").glob("*model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    result = prism_train("--config", write_config(first, store), "--resume")
    assert str(victim) in result.stdout and "corrupt" in result.stdout
    assert "step_00000003 at step 3" in result.stdout


def test_two_data_parallel_ranks_match_one(tmp_path, store):
    """ZeRO-2 over 2 gloo ranks (1 micro batch each) against 1 rank accumulating 2 micro batches:
    the same global batches, the same updates up to float rounding."""
    one, two = tmp_path / "one", tmp_path / "two"
    prism_train("--config", write_config(one, store, training={"zero_stage": 2}))
    prism_train("--config", write_config(two, store, training={"zero_stage": 2}), nproc=2)
    reference, data_parallel = losses(one), losses(two)
    assert sorted(data_parallel) == sorted(reference)
    assert data_parallel == pytest.approx(reference, rel=1e-4)
    assert (two / "ckpt" / "step_00000006" / COMPLETE).is_file()
