"""`prism-train` checks its data, run as a user runs it: stores that do not fit the model, a
corrupt shard, ids outside the vocabulary are each refused in one line naming the file."""

import json
import os
import shutil
import subprocess

import numpy as np

from data_helpers import write_shard
from prism_megatron.data_prep.store import TokenStore, write_manifest
from test_train import BIN, store, write_config  # noqa: F401 (store is a fixture)


def prism_train(config, cache, *sets, nproc=1):
    env = {**os.environ, "PRISM_VERIFIED_SHARDS": str(cache)}
    args = [str(BIN / "prism-train"), "--config", str(config)]
    if nproc > 1:
        args = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *args]
    for value in sets:
        args += ["--set", value]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def refused(result, *names):
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("prism-train: error:")]
    assert len(errors) == 1 and all(str(name) in errors[0] for name in names), result.stderr[-3000:]
    assert "loss" not in result.stdout, "it trained before refusing"


def test_stores_that_do_not_fit_the_model_are_refused_before_start_up(tmp_path, store):
    config = write_config(tmp_path, store)
    refused(prism_train(config, tmp_path, f"data.stores=[{tmp_path / 'nowhere'}]"), "nowhere")
    refused(prism_train(config, tmp_path, "model.vocab_size=256"),
            os.path.join(store, "manifest.json"), "model.vocab_size=256")
    # Under torchrun each rank that gets as far as the check says it in one line; torchrun stops the
    # other rank as soon as one fails, so it may not get that far (then torchrun adds its own report).
    ranks = prism_train(config, tmp_path, "model.vocab_size=256", nproc=2)
    errors = [line for line in ranks.stderr.splitlines() if line.startswith("prism-train: error:")]
    assert ranks.returncode == 1 and len(errors) in (1, 2), ranks.stderr[-3000:]
    assert all("model.vocab_size=256" in line for line in errors)
    other = tmp_path / "other"
    shutil.copytree(store, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    refused(prism_train(config, tmp_path, f"data.stores=[{store},{other}]"),
            other / "manifest.json", "different tokenizers")


def test_corrupt_shards_and_ids_outside_the_vocabulary_are_refused(tmp_path, store):
    cache = tmp_path / "cache"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(store, corrupt)
    shard = TokenStore.open(corrupt).shards[0].path
    chunk = os.path.join(shard, "tokens", "c", "0")
    data = bytearray(open(chunk, "rb").read())
    data[100] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    refused(prism_train(write_config(tmp_path / "a", str(corrupt)), cache), shard, "sha256")

    # A store whose shard was written with one id past the tokenizer's 512.
    opened = TokenStore.open(store)
    tokens, offsets = opened.open_shard(0)
    tokens, offsets = tokens[:].astype(np.int64), offsets[:]
    tokens[5] = 700
    documents = [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    bad = tmp_path / "bad"
    info = write_shard(bad / "shards" / "00000.zarr", documents, "uint16")
    write_manifest(bad, opened.manifest["tokenizer"], "uint16", [info])
    refused(prism_train(write_config(tmp_path / "b", str(bad)), cache), info.path, "700",
            "model.vocab_size=512")

    # A good store trains, and its verified shard is remembered on this machine.
    result = prism_train(write_config(tmp_path / "c", store, training={"train_steps": 2}), cache)
    assert result.returncode == 0, result.stderr[-3000:]
    markers = [json.loads(p.read_text()) for p in cache.rglob("*.json")]
    assert {m["shard"] for m in markers} == {opened.shards[0].path, info.path}
