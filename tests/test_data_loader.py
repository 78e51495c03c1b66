import os
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import zarr

from prism_megatron.data_prep.loader import DistributedBatchLoader, PackedDataset
from data_helpers import write_shard
from prism_megatron.data_prep.store import TokenStoreError, write_manifest

EOS = 2
SEQ = 16


def make_store(root, num_documents, first_token, seed=0, num_shards=2, tokenizer_sha="a" * 64):
    """Document d holds the token ``first_token + d`` repeated, so any token names its document."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 30, size=num_documents)
    bounds = np.linspace(0, num_documents, num_shards + 1).astype(int)
    infos = [write_shard(os.path.join(root, "shards", f"{s:05d}.zarr"),
                         (np.full(lengths[d], first_token + d) for d in range(lo, hi)), "uint32")
             for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]
    write_manifest(root, {"sha256": tokenizer_sha, "vocab_size": 1 << 20, "eos_id": EOS,
                          "bos_id": 1, "pad_id": 0}, "uint32", infos)
    return str(root), lengths


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    a, a_lengths = make_store(root / "a", 300, first_token=10)
    b, b_lengths = make_store(root / "b", 200, first_token=100_000, seed=1, num_shards=1)
    return {"a": a, "b": b, "a_lengths": a_lengths, "root": root}


def samples(dataset, ids=None):
    return np.stack([dataset[i]["tokens"] for i in (range(len(dataset)) if ids is None else ids)])


def test_order_is_a_pure_function_of_inputs(stores, tmp_path):
    kwargs = dict(stores=[stores["a"]], weights=None, seq_length=SEQ, num_samples=200)
    first = PackedDataset(seed=1, cache_dir=str(tmp_path / "c1"), **kwargs)
    again = PackedDataset(seed=1, cache_dir=str(tmp_path / "c2"), **kwargs)
    cached = PackedDataset(seed=1, cache_dir=str(tmp_path / "c1"), **kwargs)
    other_seed = PackedDataset(seed=2, cache_dir=str(tmp_path / "c1"), **kwargs)
    assert first.built_index and again.built_index and not cached.built_index
    assert len(first) == 200
    np.testing.assert_array_equal(samples(first), samples(again))
    np.testing.assert_array_equal(samples(first), samples(cached))
    assert not np.array_equal(samples(first), samples(other_seed))


def stream_order(dataset):
    """Sample ids sorted by where they start in their store's token stream."""
    return np.lexsort((dataset._sample_offset, dataset._sample_position))


def test_packing_covers_each_epoch_once_with_eos_between_documents(stores, tmp_path):
    lengths = stores["a_lengths"]
    # 800 samples of 16 tokens are about 2.6 epochs of store a.
    dataset = PackedDataset([stores["a"]], None, SEQ, seed=3, num_samples=800,
                            cache_dir=str(tmp_path))
    ordered = samples(dataset, stream_order(dataset))
    # Consecutive samples of the stream overlap by exactly one token; only the last, partly
    # used epoch has gaps.
    contiguous = np.flatnonzero(ordered[1:, 0] != ordered[:-1, -1])
    ordered = ordered[:contiguous[0] + 1 if len(contiguous) else len(ordered)]
    stream = np.concatenate([ordered[0], ordered[1:, 1:].reshape(-1)])
    # Each document is its tokens (first_token + its index) then EOS; empty ones just EOS.
    segments = np.split(stream, np.flatnonzero(stream == EOS) + 1)[:-1]
    doc_ids = [int(d[0]) - 10 if len(d) > 1 else None for d in segments]
    for segment, doc_id in zip(segments[1:], doc_ids[1:]):  # the first may start mid-document
        assert doc_id is None or (np.all(segment[:-1] == doc_id + 10)
                                  and len(segment) - 1 == lengths[doc_id])
    train = set(np.asarray(dataset._doc_ids[0]).tolist())
    nonempty = {d for d in train if lengths[d] > 0}
    epoch = len(train)  # segments per epoch, empty documents included
    first, second = doc_ids[:epoch], doc_ids[epoch:2 * epoch]
    assert len(second) == epoch
    assert {d for d in first if d is not None} == nonempty
    assert {d for d in second if d is not None} == nonempty
    assert first != second


def test_train_and_valid_are_disjoint(stores, tmp_path):
    kwargs = dict(stores=[stores["a"]], weights=None, seq_length=SEQ, seed=0, num_samples=300,
                  valid_fraction=0.2, cache_dir=str(tmp_path))
    train = samples(PackedDataset(split="train", **kwargs))
    valid = samples(PackedDataset(split="valid", **kwargs))
    train_docs, valid_docs = set(train[train != EOS].tolist()), set(valid[valid != EOS].tolist())
    assert train_docs and valid_docs and not train_docs & valid_docs
    assert 0.1 < len(valid_docs) / len(train_docs | valid_docs) < 0.3
    # The held-out set does not depend on the seed.
    valid_other_seed = samples(PackedDataset(split="valid", **{**kwargs, "seed": 5}))
    assert set(valid_other_seed[valid_other_seed != EOS].tolist()) == valid_docs


def test_blending_follows_weights(stores, tmp_path):
    dataset = PackedDataset([stores["a"], stores["b"]], [3, 1], SEQ, seed=0, num_samples=400,
                            cache_dir=str(tmp_path))
    tokens = samples(dataset)
    from_b = (tokens >= 100_000).any(axis=1)
    from_a = ((tokens != EOS) & (tokens < 100_000)).any(axis=1)
    assert not np.any(from_a & from_b)
    np.testing.assert_array_equal(from_b, np.asarray(dataset._sample_store) == 1)
    # Every prefix of the global order is within one sample of the 3:1 split.
    prefix_b = np.cumsum(from_b)
    assert np.all(np.abs(prefix_b - 0.25 * np.arange(1, 401)) <= 1)
    # Without weights, stores are blended by their tokens.
    by_size = PackedDataset([stores["a"], stores["b"]], None, SEQ, seed=0, num_samples=400,
                            cache_dir=str(tmp_path))
    share_b = np.mean(np.asarray(by_size._sample_store) == 1)
    sizes = [PackedDataset([s], None, SEQ, 0, 1, cache_dir=str(tmp_path)) for s in
             (stores["a"], stores["b"])]
    tokens_per_epoch = [len(ds._doc_ids[0]) + int(np.diff(ds._doc_starts[0])[ds._doc_ids[0]].sum())
                        for ds in sizes]
    assert abs(share_b - tokens_per_epoch[1] / sum(tokens_per_epoch)) < 0.01


def test_cu_seqlens_match_documents(stores, tmp_path):
    dataset = PackedDataset([stores["a"]], None, SEQ, seed=0, num_samples=64,
                            cache_dir=str(tmp_path))
    for batch in DistributedBatchLoader(dataset, 4, 0, 1, with_cu_seqlens=True):
        flat, cu = batch["tokens"].reshape(-1), batch["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == flat.numel()
        assert torch.all(cu[1:] > cu[:-1])
        inner = cu[1:-1].long()
        not_sample_start = inner[inner % SEQ != 0]
        assert torch.all(flat[not_sample_start - 1] == EOS)
        # Every EOS inside a row is followed by a boundary.
        eos = torch.nonzero(flat == EOS).reshape(-1)
        eos = eos[(eos + 1) % SEQ != 0]
        assert set((eos + 1).tolist()) <= set(cu.tolist())
        np.testing.assert_array_equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])


def loader_ids(dataset, loader):
    """Recover each yielded sample's global id by matching its tokens (samples are distinct)."""
    by_tokens = {dataset[i]["tokens"][:-1].tobytes(): i for i in range(len(dataset))}
    return [by_tokens[row.numpy().tobytes()] for b in loader for row in b["tokens"]]


def test_resume_at_another_dp_size_continues_the_global_order(stores, tmp_path):
    dataset = PackedDataset([stores["a"]], None, SEQ, seed=0, num_samples=96,
                            cache_dir=str(tmp_path))
    assert loader_ids(dataset, DistributedBatchLoader(dataset, 4, 0, 1)) == list(range(96))
    # dp=2, global batch 8 (micro 4): resume after 3 global batches.
    per_rank = [loader_ids(dataset, DistributedBatchLoader(dataset, 4, r, 2, consumed_samples=24))
                for r in range(2)]
    assert per_rank[0] == list(range(24, 96, 2)) and per_rank[1] == list(range(25, 96, 2))
    assert len(DistributedBatchLoader(dataset, 4, 1, 2, consumed_samples=24)) == 9


def test_one_pass_over_every_sample_gives_every_rank_the_same_rounds(stores, tmp_path):
    """drop_last=False (an evaluation): each sample once over the ranks, a short last micro batch,
    and None for the rounds a rank has no samples in, so that every rank runs as many."""
    dataset = PackedDataset([stores["a"]], None, SEQ, seed=0, num_samples=7, cache_dir=str(tmp_path))
    loaders = [DistributedBatchLoader(dataset, 2, r, 3, drop_last=False) for r in range(3)]
    rounds = [list(loader) for loader in loaders]
    assert [len(loader) for loader in loaders] == [len(r) for r in rounds] == [2, 2, 2]
    assert [[None if b is None else len(b["tokens"]) for b in r] for r in rounds] == [[2, 1], [2, None], [2, None]]
    seen = [loader_ids(dataset, [b for b in r if b is not None]) for r in rounds]
    assert seen == [[0, 3, 6], [1, 4], [2, 5]]
    assert len(DistributedBatchLoader(dataset, 2, 0, 3)) == 1  # drop_last: whole micro batches only


def test_worker_processes_give_the_same_batches(stores, tmp_path):
    dataset = PackedDataset([stores["a"], stores["b"]], [1, 1], SEQ, seed=0, num_samples=40,
                            cache_dir=str(tmp_path))
    kwargs = dict(micro_batch_size=4, dp_rank=1, dp_size=2, consumed_samples=8,
                  with_cu_seqlens=True)
    inline = list(DistributedBatchLoader(dataset, num_workers=0, **kwargs))
    workers = list(DistributedBatchLoader(dataset, num_workers=2, **kwargs))
    assert len(inline) == len(workers) == 4
    for a, b in zip(inline, workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _distributed_worker(rank, store, cache_dir, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    dataset = PackedDataset([store], None, SEQ, seed=7, num_samples=64, cache_dir=cache_dir)
    loader = DistributedBatchLoader(dataset, 2, dist.get_rank(), 2, consumed_samples=16)
    batches = torch.cat([b["tokens"] for b in loader])
    gathered = [torch.empty_like(batches) for _ in range(2)]
    dist.all_gather(gathered, batches)
    built = [None, None]
    dist.all_gather_object(built, dataset.built_index)
    if rank == 0:
        results.put((built, torch.stack(gathered, 1).reshape(-1, SEQ).numpy()))
    dist.destroy_process_group()


def test_two_ranks_build_the_index_once_and_share_one_order(stores, tmp_path):
    cache = tmp_path / "cache"
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_distributed_worker, args=(stores["a"], str(cache), str(tmp_path / "init"), results),
             nprocs=2)
    built, interleaved = results.get()
    assert sorted(built) == [False, True]
    assert len([p for p in os.listdir(cache) if not p.endswith(".lock")]) == 1
    # Interleaving the ranks' batches (rank 0 takes even samples) is the global order from 16.
    here = PackedDataset([stores["a"]], None, SEQ, seed=7, num_samples=64, cache_dir=str(cache))
    assert not here.built_index
    np.testing.assert_array_equal(interleaved, samples(here, range(16, 64))[:, :-1])


def test_clear_errors_name_the_file(stores, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        PackedDataset([str(tmp_path / "nowhere")], None, SEQ, 0, 10)
    broken = tmp_path / "broken"
    shutil.copytree(stores["a"], broken)
    other_tokenizer, _ = make_store(tmp_path / "other", 10, 10, tokenizer_sha="b" * 64)
    with pytest.raises(ValueError, match="different tokenizers"):
        PackedDataset([str(broken), other_tokenizer], None, SEQ, 0, 10)
    with pytest.raises(ValueError, match="no valid documents"):
        PackedDataset([str(broken)], None, SEQ, 0, 10, split="valid", valid_fraction=0.0)

    dataset = PackedDataset([str(broken)], None, SEQ, 0, 10, cache_dir=str(tmp_path / "c"))
    chunk = broken / "shards" / "00001.zarr" / "tokens" / "c" / "0"
    os.truncate(chunk, 8)
    with pytest.raises(TokenStoreError, match="00001.zarr/tokens/c/0"):
        samples(dataset)
    offsets = zarr.open_array(broken / "shards" / "00000.zarr" / "doc_offsets", mode="r+")
    offsets[1] = 10**9
    with pytest.raises(TokenStoreError, match="00000.zarr: doc_offsets"):
        PackedDataset([str(broken)], None, SEQ, 0, 10, cache_dir=str(tmp_path / "c2"))
    shutil.rmtree(broken / "shards" / "00001.zarr")
    with pytest.raises(FileNotFoundError, match="00001.zarr"):
        PackedDataset([str(broken)], None, SEQ, 0, 10)
