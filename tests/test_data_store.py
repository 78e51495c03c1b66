import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import zarr

from data_helpers import write_shard
from prism_megatron.data_prep import store as store_mod
from prism_megatron.data_prep.store import (ShardWriter, TokenStore, TokenStoreError,
                                            read_shard_info, token_dtype_for, write_manifest)

TOKENIZER = {"sha256": "0" * 64, "vocab_size": 1000, "eos_id": 2, "bos_id": 1, "pad_id": 0,
             "path": "synthetic.model"}


def make_documents(seed, n, max_len=50):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 1000, size=rng.integers(0, max_len)) for _ in range(n)]


def make_store(root, shard_docs, dtype="uint16"):
    infos = [write_shard(os.path.join(root, "shards", f"{i:05d}.zarr"), docs, dtype)
             for i, docs in enumerate(shard_docs)]
    write_manifest(root, TOKENIZER, dtype, infos)
    return TokenStore.open(root)


@pytest.fixture
def small_buffers(monkeypatch):
    # Many chunks per shard, so chunk and block boundaries are exercised.
    monkeypatch.setattr(store_mod, "TOKENS_PER_CHUNK", 16)
    monkeypatch.setattr(store_mod, "OFFSETS_PER_CHUNK", 8)
    monkeypatch.setattr(store_mod, "VERIFY_BLOCK_TOKENS", 48)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_round_trip(tmp_path, small_buffers, dtype):
    docs = [make_documents(0, 40), make_documents(1, 7)]
    store = make_store(tmp_path, docs, dtype)
    assert store.num_documents == 47 and store.eos_id == 2 and store.vocab_size == 1000
    assert store.num_tokens == sum(len(d) for shard in docs for d in shard)
    for i, shard_docs in enumerate(docs):
        tokens, offsets = store.open_shard(i)
        assert tokens.dtype == np.dtype(dtype) and offsets.dtype == np.uint64
        offsets = offsets[:]
        assert offsets[0] == 0 and len(offsets) == len(shard_docs) + 1
        for d, doc in enumerate(shard_docs):
            np.testing.assert_array_equal(tokens[offsets[d]:offsets[d + 1]], doc)
        all_tokens = tokens[:]
        for first, count in [(0, 1), (5, 40), (15, 2), (16, 16), (len(all_tokens) - 3, 3)]:
            np.testing.assert_array_equal(store.read_tokens(i, first, count),
                                          all_tokens[first:first + count])
    assert store.verify() == []
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"][1]["path"] == os.path.join("shards", "00001.zarr")


def test_a_shard_without_documents_reads_as_empty(tmp_path):
    # prism-prep cuts shards by bytes, so a long document can leave a shard with none.
    store = make_store(tmp_path, [make_documents(0, 3), []], "uint16")
    assert store.shards[1].num_tokens == 0
    tokens = store.read_tokens(1, 0, 0)
    assert tokens.dtype == np.uint16 and len(tokens) == 0


def test_documents_as_lists_and_checksum_matches_contents(tmp_path, small_buffers):
    docs = [d.tolist() for d in make_documents(2, 30)]
    info = write_shard(tmp_path / "a.zarr", docs, "uint16", batch_documents=7)
    info_arrays = write_shard(tmp_path / "b.zarr", [np.array(d) for d in docs], "uint16")
    assert info.sha256 == info_arrays.sha256
    flat = np.concatenate([np.array(d, dtype="<u2") for d in docs])
    offsets = np.cumsum([0] + [len(d) for d in docs]).astype("<u8")
    assert info.sha256 == hashlib.sha256(flat.tobytes() + offsets.tobytes()).hexdigest()
    assert read_shard_info(tmp_path / "a.zarr") == info


def test_failed_write_leaves_nothing_and_commit_refuses_overwrite(tmp_path, small_buffers):
    path = tmp_path / "s.zarr"

    def failing():
        yield from make_documents(3, 10)
        raise RuntimeError("input broke")

    with pytest.raises(RuntimeError):
        write_shard(path, failing(), "uint16")
    assert not path.exists() and not (tmp_path / "s.zarr.tmp").exists()
    # A stale .tmp from a killed writer is replaced by the next attempt.
    (tmp_path / "s.zarr.tmp").mkdir()
    (tmp_path / "s.zarr.tmp" / "junk").write_text("x")
    write_shard(path, make_documents(3, 10), "uint16")
    with pytest.raises(FileExistsError, match="s.zarr"):
        write_shard(path, make_documents(3, 10), "uint16")


def test_token_out_of_range(tmp_path):
    with ShardWriter(tmp_path / "s.zarr", "uint16") as writer:
        with pytest.raises(ValueError, match="s.zarr"):
            writer.add_documents([[1, 70000]])
    assert token_dtype_for(65536) == "uint16" and token_dtype_for(65537) == "uint32"


def test_open_errors_name_the_file(tmp_path, small_buffers):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TokenStore.open(tmp_path)
    make_store(tmp_path, [make_documents(4, 5), make_documents(5, 5)])
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    manifest_path.write_text("{not json")
    with pytest.raises(TokenStoreError, match="manifest.json"):
        TokenStore.open(manifest_path)
    manifest_path.write_text(json.dumps({**manifest, "version": 7}))
    with pytest.raises(TokenStoreError, match="version 7"):
        TokenStore.open(tmp_path)
    manifest_path.write_text(json.dumps({**manifest, "num_tokens": 1}))
    with pytest.raises(TokenStoreError, match="num_tokens"):
        TokenStore.open(tmp_path)

    manifest_path.write_text(json.dumps(manifest))
    os.rename(tmp_path / "shards" / "00001.zarr", tmp_path / "moved.zarr")
    with pytest.raises(FileNotFoundError, match="00001.zarr"):
        TokenStore.open(tmp_path)


def test_verify_names_corrupt_shards(tmp_path, small_buffers):
    store = make_store(tmp_path, [make_documents(6, 20), make_documents(7, 20),
                                  make_documents(8, 20)])
    # Flip one byte in a token chunk of shard 1 and delete the offsets of shard 2.
    chunk = os.path.join(store.shards[1].path, "tokens", "c", "0")
    data = bytearray(open(chunk, "rb").read())
    data[0] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    shutil.rmtree(os.path.join(store.shards[2].path, "doc_offsets"))
    assert store.verify() == [store.shards[1].path, store.shards[2].path]
    with pytest.raises(TokenStoreError, match="00002.zarr"):
        store.open_shard(2)
    os.truncate(chunk, 4)
    with pytest.raises(TokenStoreError, match="truncated"):
        store.read_tokens(1, 0, 10)


def disk_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(folder) for name in names)


def test_a_shard_takes_on_disk_what_its_tokens_and_offsets_take(tmp_path):
    one = write_shard(tmp_path / "one.zarr", [np.arange(3, 103)], "uint16")
    # 100 tokens and 2 offsets; the rest is zarr's metadata (about 1.5 KB over three files).
    assert disk_bytes(tmp_path / "one.zarr") < 200 + 16 + 4096
    docs = make_documents(9, 3000, max_len=400)
    many = write_shard(tmp_path / "many.zarr", docs, "uint16")
    data = 2 * many.num_tokens + 8 * (many.num_documents + 1)
    assert data <= disk_bytes(tmp_path / "many.zarr") < data + 4096
    assert one.num_tokens == 100


def test_stores_with_fixed_padded_chunks_still_read(tmp_path):
    """Stores written before chunks were fitted to the data: 16-token chunks, the last padded."""
    docs = make_documents(10, 9)
    flat = np.concatenate(docs).astype("uint16")
    offsets = np.cumsum([0] + [len(d) for d in docs]).astype("uint64")
    path = tmp_path / "shards" / "00000.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=3)
    for name, values, chunk in (("tokens", flat, 16), ("doc_offsets", offsets, 8)):
        group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(chunk,),
                           compressors=None, fill_value=0,
                           config={"write_empty_chunks": True})[:] = values
    digest = hashlib.sha256(flat.astype("<u2").tobytes() + offsets.astype("<u8").tobytes())
    info = store_mod.ShardInfo(str(path), len(docs), len(flat), digest.hexdigest())
    write_manifest(tmp_path, TOKENIZER, "uint16", [info])
    store = TokenStore.open(tmp_path)
    np.testing.assert_array_equal(store.read_tokens(0, 0, len(flat)), flat)
    assert store.verify() == [] and store.scan_shard(0) == (info.sha256, int(flat.max()))
