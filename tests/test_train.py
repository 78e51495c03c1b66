"""`prism-train`, run as a user runs it (subprocesses): config errors, a tiny run's checkpoints and
logs, determinism, bitwise resume after a crash, a damaged checkpoint, two data-parallel ranks."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from prism_megatron.data_prep.tokenize import tokenize_corpus
from prism_megatron.data_prep.tokenizer import train_tokenizer
from prism_megatron.flops import PEAK_FLOPS_ENV, step_flops
from prism_megatron.launch.checkpoint.format import COMPLETE
from prism_megatron.launch.config import load_config
from prism_megatron.launch.engine import lr_at
from prism_megatron.launch.metrics import read_metrics

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


def losses(folder: Path, tb: str = "tb") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(folder / tb) if "loss" in r}


def val_losses(folder: Path, tb: str = "tb") -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(folder / tb) if "val_loss" in r}


def fails_with(result, *words):
    """A refusal as a user sees it: a non-zero exit, one error line naming `words`, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("prism-train: error:")]
    assert all(word in line for word in words), line


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


def test_numbers_yaml_reads_as_strings_are_floats(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string; as a float field's value it is the number."""
    config = write_config(tmp_path, "unused", optim={"lr": "3e-3"})
    assert "lr: 3e-3" in config.read_text()
    assert load_config(config, ["optim.eps=1e-9"]).optim.lr == 3e-3
    # The --help example: accepted, so the error is the next problem, the store.
    fails_with(prism_train("--config", config, "--set", "optim.lr=1e-3", check=False), "data.stores[0]", "unused")
    fails_with(prism_train("--config", config, "--set", "optim.lr=fast", check=False), "optim.lr", "expected float")


def test_on_and_off_yaml_reads_as_booleans_are_words(tmp_path):
    """YAML 1.1 reads on/off as booleans; as a string field's value (model.fused_ops) they are the words."""
    config = write_config(tmp_path, "unused")
    assert load_config(config, ["model.fused_ops=off"]).model.fused_ops == "off"
    assert load_config(config, ["model.fused_ops=on"]).model.fused_ops == "on"
    config.write_text(config.read_text().replace("model:\n", "model:\n  fused_ops: off\n"))
    assert load_config(config).model.fused_ops == "off"


def test_bad_input_is_one_line_before_start_up(tmp_path, store):
    """Each mistake is refused before the model is built, in one line naming the file or the key."""
    config = write_config(tmp_path, store)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [
        (["--set", f"data.stores=[{tmp_path / 'nowhere'}]"], ["data.stores[0]", "nowhere", "does not exist"]),
        (["--set", f"data.stores=[{tmp_path}]"], ["data.stores[0]", "manifest.json"]),
        (["--set", "parallel.tensor_model_parallel_size=2"], ["parallel.tensor_model_parallel_size=2", "(1)"]),
        (["--set", "parallel.tensor_model_parallel_size=2", "--set", "model.num_heads=3"], ["model.num_heads"]),
        (["--set", f"checkpoint.dir={a_file}"], ["checkpoint.dir", "a_file", "not a folder"]),
        (["--set", f"logging.tensorboard_dir={a_file / 'tb'}"], ["logging.tensorboard_dir", "a_file"]),
    ]
    for args, words in cases:
        fails_with(prism_train("--config", config, *args, check=False), *words)
    assert not (tmp_path / "ckpt").exists()

    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [\n")
    fails_with(prism_train("--config", broken, check=False), str(broken), "line 2")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe")
    fails_with(prism_train("--config", binary, check=False), str(binary), "UTF-8")


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
    # reproduces steps 4..6 of the uninterrupted run exactly. The resumed run logs to a folder of
    # its own, so what is read back is what it trained (a new tensorboard_dir is a safe change).
    (second / "ckpt" / "step_00000006" / COMPLETE).unlink()
    result = prism_train("--config", write_config(second, store), "--resume",
                         "--set", f"logging.tensorboard_dir={second / 'tb_resumed'}")
    assert "resumed from" in result.stdout and "step_00000003" in result.stdout
    assert "logging.tensorboard_dir" in result.stdout
    assert losses(second, "tb_resumed") == {step: reference[step] for step in (4, 5, 6)}
    assert val_losses(second, "tb_resumed") == {6: val_losses(first)[6]}
    assert (second / "ckpt" / "step_00000006" / COMPLETE).is_file()

    # Starting afresh over committed checkpoints would lose them: refused.
    result = prism_train("--config", write_config(second, store), check=False)
    assert result.returncode != 0 and "--resume" in result.stderr

    # A truncated checkpoint file: skipped with a line naming it, and the previous one resumed.
    victim = next((ckpts / "step_00000006").glob("*model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    result = prism_train("--config", write_config(first, store), "--resume")
    assert str(victim) in result.stdout and "corrupt" in result.stdout
    assert "step_00000003 at step 3" in result.stdout


def test_logs_mfu_and_peak_memory(tmp_path, store, monkeypatch):
    """Every log line carries the MFU of flops.py's count, here against the peak PRISM_PEAK_FLOPS gives
    (the CPU has none of its own), in the progress line, metrics.jsonl and TensorBoard; peak memory
    only on CUDA."""
    config = write_config(tmp_path, store, training={"train_steps": 2}, logging={"eval_interval": 10})
    monkeypatch.setenv(PEAK_FLOPS_ENV, "1e12")
    result = prism_train("--config", config)
    cfg = load_config(config)
    per_token = step_flops(cfg.model, cfg.data.seq_length).total
    logged = [r for r in read_metrics(tmp_path / "tb") if "tokens_per_sec" in r]
    assert [r["step"] for r in logged] == [1, 2]
    for record in logged:
        assert record["mfu"] == pytest.approx(per_token * record["tokens_per_sec"] / 1e12)
        assert ("peak_memory_gb" in record) == torch.cuda.is_available()
    lines = [line for line in result.stdout.splitlines() if "tokens/s" in line]
    assert [f"MFU {100 * r['mfu']:.1f}%" in line for line, r in zip(lines, logged)] == [True, True]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("mfu")] == pytest.approx([r["mfu"] for r in logged], rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's missing peak FLOP/s")
def test_no_mfu_without_a_peak(tmp_path, store, monkeypatch):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    result = prism_train("--config", write_config(tmp_path, store, training={"train_steps": 2}))
    assert f"no MFU: the peak FLOP/s of the CPU is unknown (set {PEAK_FLOPS_ENV})" in result.stdout
    assert not [r for r in read_metrics(tmp_path / "tb") if "mfu" in r]


def test_commands_print_their_own_lines_first(tmp_path, store):
    """What a user sees in the terminal (both streams, unbuffered) starts with our lines: none of
    megatron-core's or DeepSpeed's start-up chatter, before them or after."""
    chatter = ["Transformer Engine", "Megatron-FSDP", "Megatron Core", "built successfully", "gcc "]
    config = write_config(tmp_path, store, training={"train_steps": 2})
    commands = {"model: ": [BIN / "prism-train", "--config", config],
                str(tmp_path / "ckpt" / "step_00000002"): [BIN / "prism-ckpt", "inspect", tmp_path / "ckpt"]}
    for first, command in commands.items():
        result = subprocess.run(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert result.returncode == 0, result.stdout[-3000:]
        assert result.stdout.startswith(first), result.stdout[:3000]
        assert not [words for words in chatter if words in result.stdout], result.stdout[:3000]


def test_resume_refuses_another_run_unless_allowed(tmp_path, store):
    """A resume compares its config with the checkpoint's run_config.json: a change that makes the
    continuation another run is refused with the differences listed, unless named; a safe one
    passes with a line saying so."""
    prism_train("--config", write_config(tmp_path, store, training={"train_steps": 3}))
    config = write_config(tmp_path / "again", store, checkpoint={"dir": str(tmp_path / "ckpt")},
                          training={"train_steps": 5})

    def resume(*args):
        return prism_train("--config", config, "--resume", *args, check=False)

    record = str(tmp_path / "ckpt" / "step_00000003" / "run_config.json")
    fails_with(resume("--set", "data.seq_length=64", "--set", "training.seed=8"),
               record, "data.seq_length: 32 -> 64", "training.seed: 7 -> 8", "--allow-change")
    fails_with(resume("--set", "training.seed=8", "--set", f"data.stores=[{store},{store}]",
                      "--allow-change", "training.seed"), "data.stores")
    fails_with(resume("--set", "training.global_batch_size=8"), "training.global_batch_size: 4 -> 8")
    fails_with(resume("--set", "training.train_steps=2"), "training.train_steps=2", "step_00000003")
    fails_with(resume("--allow-change", "optim.learning_rate"), "optim.learning_rate")
    fails_with(prism_train("--config", config, "--allow-change", "training.seed", check=False), "--resume")

    # Named, the seed may change; more steps and another micro batch pass on their own. The resumed
    # run trains steps 4 and 5 (read from its own metrics) and says which keys changed.
    result = resume("--set", "training.seed=8", "--allow-change", "training.seed",
                    "--set", "training.micro_batch_size=4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("config changed since")]
    for change in ("training.seed: 7 -> 8", "training.train_steps: 3 -> 5", "training.micro_batch_size: 2 -> 4",
                   "logging.tensorboard_dir"):
        assert change in line
    assert sorted(losses(tmp_path / "again")) == [4, 5]
    assert sorted(val_losses(tmp_path / "again")) == [5]


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


def test_bf16_training_at_dp2_and_cp2_follows_dp1(tmp_path, store):
    """bf16 runs (DeepSpeed's bf16 optimizer, the path GPUs take) at DP=2 and at CP=2, 2 gloo ranks each,
    follow DP=1's losses to bf16 rounding: the gradients are reduced over the ranks of both layouts."""
    runs = {}
    for name, nproc, parallel in [("dp1", 1, {}), ("dp2", 2, {}), ("cp2", 2, {"context_parallel_size": 2})]:
        path = write_config(tmp_path / name, store, training={"precision": "bf16"})
        raw = yaml.safe_load(path.read_text())
        raw["parallel"] = parallel
        path.write_text(yaml.safe_dump(raw))
        prism_train("--config", path, nproc=nproc)
        runs[name] = losses(tmp_path / name)
    assert sorted(runs["dp1"]) == list(range(1, STEPS + 1))
    for name in ("dp2", "cp2"):
        assert runs[name] == pytest.approx(runs["dp1"], abs=5e-4), name
