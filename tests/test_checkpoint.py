"""Checkpoints as a user meets them: damaged ones skipped by name, kill -9 during saves, a crafted
file that would run code, and `prism-ckpt` inspect / convert / export (a TP=2 run's export gives the
TP=2 model's logits at TP=1 and TP=2, and as a transformers model, and starts a TP=1 run)."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prism_megatron.data_prep.store import TokenStore
from prism_megatron.launch import checkpoint
from prism_megatron.launch.checkpoint.format import (COMPLETE, LAYOUT, LAYOUT_FREE, RUN_CONFIG, file_record, tag_for,
                                                     verify, write_complete)
from prism_megatron.launch.checkpoint.safe_load import safe_load
from test_tensor_parallel import run_distributed
from test_train import BIN, fails_with, prism_train, store, write_config  # noqa: F401 (store: a fixture)


def prism_ckpt(*args):
    return subprocess.run([sys.executable, "-m", "prism_megatron.launch.ckpt", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def recommit(step_dir: Path) -> None:
    """Record the files as they are now, as an attacker with write access to the folder could."""
    files = {f.name: file_record(f) for f in step_dir.iterdir() if f.is_file() and f.name != COMPLETE}
    write_complete(step_dir, int(step_dir.name[5:]), files)


@pytest.fixture(scope="module")
def run(tmp_path_factory, store):
    """A single-process run with checkpoints at steps 2, 4 and 6."""
    folder = tmp_path_factory.mktemp("run")
    config = write_config(folder, store, checkpoint={"save_interval": 2})
    prism_train("--config", config)
    return folder, config


def test_damaged_checkpoints_are_skipped_by_name(tmp_path, run):
    folder, _ = run
    ckpts = tmp_path / "ckpt"
    for step in (2, 4, 6):
        name = tag_for(step)
        (ckpts / name).mkdir(parents=True)
        for f in (folder / "ckpt" / name).iterdir():
            (ckpts / name / f.name).write_bytes(f.read_bytes())
    assert checkpoint.newest(ckpts) == ckpts / "step_00000006"
    newest = ckpts / "step_00000006"
    victim = next(newest.glob("*model_states.pt"))
    original = victim.read_bytes()

    def skipped(caplog) -> str:
        caplog.clear()
        assert checkpoint.newest(ckpts) == ckpts / "step_00000004"
        return caplog.text

    import logging
    caplog = _Capture()
    logging.getLogger(checkpoint.__name__).addHandler(caplog)
    try:
        victim.write_bytes(original[:-10])
        assert str(victim) in skipped(caplog) and "bytes" in caplog.text
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01  # same size, one bit: only the hash sees it
        victim.write_bytes(bytes(flipped))
        assert str(victim) in skipped(caplog) and "sha256" in caplog.text
        victim.unlink()
        assert str(victim) in skipped(caplog) and "missing" in caplog.text
        (newest / COMPLETE).unlink()
        assert str(newest) in skipped(caplog) and "did not finish" in caplog.text
    finally:
        logging.getLogger(checkpoint.__name__).removeHandler(caplog)

    # None intact: a clear error naming every file that is wrong.
    older = next((ckpts / "step_00000004").glob("*optim_states.pt"))
    older.write_bytes(b"")
    (ckpts / "step_00000002" / LAYOUT).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint") as error:
        checkpoint.newest(ckpts)
    assert str(older) in str(error.value) and str(ckpts / "step_00000002" / LAYOUT) in str(error.value)


class _Capture(__import__("logging").Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def clear(self):
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, run, store):
    folder, _ = run
    resumed = tmp_path / "resumed"
    config = write_config(resumed, store, checkpoint={"save_interval": 2})
    for step in (4, 6):
        name = tag_for(step)
        (resumed / "ckpt" / name).mkdir(parents=True)
        for f in (folder / "ckpt" / name).iterdir():
            (resumed / "ckpt" / name / f.name).write_bytes(f.read_bytes())
    victim = next((resumed / "ckpt" / "step_00000006").glob("*optim_states.pt"))
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = prism_train("--config", config, "--resume")
    assert f"skipping checkpoint {victim.parent} is corrupt: {victim}" in result.stdout
    assert "resumed from" in result.stdout and "step_00000004 at step 4" in result.stdout


def test_kill_during_saves_never_leaves_a_half_written_checkpoint(tmp_path, store):
    """10 runs, each killed (SIGKILL) at a random moment of one of its saves; every next run resumes."""
    config = write_config(tmp_path, store, training={"train_steps": 400},
                          checkpoint={"save_interval": 1, "keep_last": 2},
                          logging={"eval_interval": 1000})
    ckpts = tmp_path / "ckpt"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    mid_save = 0  # trials whose kill left a save unfinished
    for trial in range(10):
        launched = time.time()
        proc = subprocess.Popen([str(BIN / "prism-train"), "--config", str(config), "--resume"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 120
        if trial == 0:  # the first run commits one checkpoint first: every next run has one to resume
            while not checkpoint.committed(ckpts) and proc.poll() is None:
                assert time.monotonic() < deadline, "no checkpoint committed"
                time.sleep(0.001)
            launched = time.time()
        # Wait until this run starts a save (a step folder written since it started), then kill it.
        while not _written_since(ckpts, launched) and proc.poll() is None:
            assert time.monotonic() < deadline, "no save started"
            time.sleep(0.001)
        # Odd trials kill as the save's first file appears (a save takes tens of ms: surely inside it);
        # even ones at a random moment of the next 50 ms (inside it, or just after its commit).
        time.sleep(0 if trial % 2 else rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0]
        assert proc.returncode == -signal.SIGKILL, out[-2000:]
        mid_save += any(not (p / COMPLETE).is_file() for p in ckpts.glob("step_*"))
        if trial:
            assert "resumed from" in out, out[-2000:]
        found = checkpoint.committed(ckpts)
        assert found, f"trial {trial}: no committed checkpoint left"
        for path in found:
            verify(path)  # every committed checkpoint is whole
        assert checkpoint.newest(ckpts) == found[-1]
        assert len(found) <= 3  # keep_last 2, plus one if the kill fell between a commit and its pruning
    assert mid_save > 0, "no kill landed inside a save"


def _written_since(ckpts: Path, since: float) -> bool:
    for p in ckpts.glob("step_*"):
        try:
            if p.stat().st_mtime > since:
                return True
        except FileNotFoundError:  # removed by the run between glob and stat
            pass
    return False


class _RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {os.environ['PRISM_TEST_MARK']}",)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, run, store):
    folder, _ = run
    crafted = tmp_path / "crafted"
    config = write_config(crafted, store, checkpoint={"save_interval": 2})
    step = crafted / "ckpt" / "step_00000006"
    step.mkdir(parents=True)
    for f in (folder / "ckpt" / "step_00000006").iterdir():
        (step / f.name).write_bytes(f.read_bytes())
    victim = step / "mp_rank_00_model_states.pt"
    mark = tmp_path / "code-ran"
    os.environ["PRISM_TEST_MARK"] = str(mark)
    states = torch.load(victim, weights_only=True)
    states["payload"] = _RunsCode()
    torch.save(states, victim, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    recommit(step)
    result = prism_train("--config", config, "--resume", check=False)
    assert result.returncode != 0
    assert str(victim) in result.stderr and "refused" in result.stderr and "Traceback" not in result.stderr
    assert not mark.exists(), "loading the checkpoint ran its code"
    # The tool refuses it too.
    result = prism_ckpt("export", step, tmp_path / "out")
    assert result.returncode != 0 and str(victim) in result.stderr and "refused" in result.stderr
    assert not mark.exists()


def _logits(parallel_size: int, step_dir: str, export_dir: str, out: str) -> None:
    from prism_megatron.config import ModelConfig, ParallelConfig
    from prism_megatron.model import PrismLM
    from prism_megatron.process_groups import destroy_parallel, initialize_parallel, tp_rank

    parallel = ParallelConfig(tensor_model_parallel_size=parallel_size)
    initialize_parallel(parallel, seed=0)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    results = {}
    exported = checkpoint.load_exported(export_dir, parallel)
    results["exported"] = exported.gather_logits(exported(tokens))
    if parallel_size == 1:  # the folder as a transformers model
        import prism_megatron.hf  # noqa: F401 (registers the Auto classes)
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            results["transformers"] = AutoModelForCausalLM.from_pretrained(export_dir)(tokens).logits
    if step_dir:
        # The trained TP=2 model itself: its shard as DeepSpeed saved it.
        model_cfg = json.loads((Path(step_dir) / RUN_CONFIG).read_text())["model"]
        model = PrismLM(ModelConfig(**model_cfg), parallel)
        module = safe_load(Path(step_dir) / f"mp_rank_{tp_rank():02d}_model_states.pt")["module"]
        missing, _ = model.load_state_dict(module, strict=False)
        assert not [k for k in missing if not k.endswith("_extra_state")], missing
        results["trained"] = model.gather_logits(model(tokens))
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    destroy_parallel()


def test_prism_ckpt_inspect_convert_export(tmp_path, store):
    folder = tmp_path / "tp2"
    config = write_config(folder, store, training={"train_steps": 2, "global_batch_size": 2},
                          checkpoint={"save_interval": 2})
    config.write_text(config.read_text() + "parallel: {tensor_model_parallel_size: 2}\n")
    prism_train("--config", config, nproc=2)
    step = folder / "ckpt" / "step_00000002"

    result = prism_ckpt("inspect", folder / "ckpt")
    assert result.returncode == 0, result.stderr
    assert "intact" in result.stdout and "TP=2 x DP=1, ZeRO-1" in result.stdout and "step 2" in result.stdout
    assert "hidden_size=32" in result.stdout and "layout-free form: absent" in result.stdout

    result = prism_ckpt("convert", folder / "ckpt")
    assert result.returncode == 0, result.stderr
    assert (step / LAYOUT_FREE / COMPLETE).is_file()
    assert "layout-free form: intact" in prism_ckpt("inspect", step).stdout

    out = tmp_path / "exported"
    result = prism_ckpt("export", step, out)
    assert result.returncode == 0, result.stderr
    assert "load_exported" in result.stdout and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.model").read_bytes() == Path(TokenStore.open(store).manifest["tokenizer"]["path"]).read_bytes()

    tp2, tp1 = tmp_path / "tp2.pt", tmp_path / "tp1.pt"
    run_distributed(2, _logits, 2, str(step), str(out), str(tp2))
    run_distributed(1, _logits, 1, "", str(out), str(tp1))
    trained = torch.load(tp2)["trained"]
    torch.testing.assert_close(torch.load(tp2)["exported"], trained, rtol=0, atol=0)
    torch.testing.assert_close(torch.load(tp1)["exported"], trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.load(tp1)["transformers"], trained, rtol=1e-5, atol=1e-5)

    # The export starts a run at another TP size. At a learning rate far too small to move a weight, that
    # run's checkpoint holds the exported weights (a weight of 0 may move by the learning rate).
    fresh = tmp_path / "from_export"
    config = write_config(fresh, store, training={"train_steps": 1, "global_batch_size": 2},
                          optim={"lr": 1e-30, "min_lr": 0, "warmup_steps": 0},
                          checkpoint={"save_interval": 1, "initial_weights": str(out)})
    assert f"weights from {out} (exported at step 2" in prism_train("--config", config).stdout
    assert prism_ckpt("export", fresh / "ckpt", fresh / "exported").returncode == 0
    continued = checkpoint.exported_weights(fresh / "exported")
    for name, weight in checkpoint.exported_weights(out).items():
        torch.testing.assert_close(continued[name], weight, rtol=0, atol=1e-29, msg=name)
    # An export of another model is refused before anything starts.
    config.write_text(config.read_text().replace("ffn_hidden_size: 64", "ffn_hidden_size: 96"))
    fails_with(prism_train("--config", config, check=False), "checkpoint.initial_weights", "model.ffn_hidden_size is 64 there, 96 here")

    # A damaged file: inspect names it and exits non-zero; export refuses.
    victim = next(step.glob("zero_pp_rank_0_mp_rank_01_optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:-1])
    result = prism_ckpt("inspect", folder / "ckpt")
    assert result.returncode == 1 and "DAMAGED" in result.stdout and str(victim) in result.stdout
    result = prism_ckpt("export", step, tmp_path / "again")
    assert result.returncode != 0 and str(victim) in result.stderr and "Traceback" not in result.stderr
