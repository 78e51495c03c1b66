"""Loader benchmark: sample-index build time and memory, and tokens/s one process delivers in the
training order (shuffled documents packed with EOS, shuffled samples, DP-strided), the store's
size on disk against its tokens + offsets, and how long a store of --startup-shards shards takes
to hand out its first verified batch against verifying every shard.

    python benchmarks/loader_throughput.py --workdir /tmp/loader-bench [--store STORE]

Without --store it writes a synthetic store (log-normal document lengths, mean ~660 tokens) of
--tokens tokens with the project's shard writer.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
import tracemalloc

import numpy as np
from tqdm import tqdm

from prism_megatron.data_prep.loader import DistributedBatchLoader, PackedDataset
from prism_megatron.data_prep.store import ShardWriter, TokenStore, write_manifest
from prism_megatron.data_prep.verify import ShardVerifier

VOCAB = 32000
EOS = 2


def synthetic_store(path: str, num_tokens: int, num_shards: int = 4, seed: int = 0) -> str:
    if os.path.exists(os.path.join(path, "manifest.json")):
        return path
    rng = np.random.default_rng(seed)
    infos = []
    for s in range(num_shards):
        lengths = np.maximum(1, rng.lognormal(6.0, 1.0, num_tokens // num_shards // 300 + 1))
        lengths = lengths.astype(int)[:np.searchsorted(np.cumsum(lengths), num_tokens // num_shards) + 1]

        with ShardWriter(os.path.join(path, "shards", f"{s:05d}.zarr"), "uint16") as writer:
            for start in tqdm(range(0, len(lengths), 1000), desc=f"shard {s}", disable=num_shards > 8):
                writer.add_documents([rng.integers(3, VOCAB, size=n, dtype=np.uint16)
                                      for n in lengths[start:start + 1000]])
            infos.append(writer.commit())
    write_manifest(path, {"sha256": "synthetic", "vocab_size": VOCAB, "eos_id": EOS,
                          "bos_id": 1, "pad_id": 0, "path": "synthetic"}, "uint16", infos)
    return path


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes in files, bytes of blocks on disk as `du` counts them) under ``path``."""
    files = blocks = 0
    for root, _, names in os.walk(path):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            files, blocks = files + stat.st_size, blocks + stat.st_blocks * 512
    return files, blocks


def startup(workdir: str, num_tokens: int, num_shards: int, seq_length: int,
            micro_batch_size: int) -> None:
    """Seconds to the first verified batch and to all shards verified, with a cold marker cache."""
    store = synthetic_store(os.path.join(workdir, f"store-{num_shards}-shards"), num_tokens,
                            num_shards)
    os.environ["PRISM_VERIFIED_SHARDS"] = os.path.join(workdir, f"verified-{time.time_ns()}")
    dataset = PackedDataset([store], None, seq_length, seed=1, num_samples=1000,
                            cache_dir=os.path.join(workdir, "index-startup"))
    start = time.perf_counter()
    verifier = ShardVerifier(dataset.stores, VOCAB)
    next(iter(DistributedBatchLoader(dataset, micro_batch_size, 0, 1, verifier=verifier)))
    first = time.perf_counter() - start
    verifier.require((0, i) for i in range(num_shards))
    print(f"{num_shards} shards of {num_tokens // num_shards:,} tokens, cold verification cache: "
          f"first verified batch after {first:.2f} s, all shards verified after "
          f"{time.perf_counter() - start:.2f} s")


def _build(store, seq_length, num_samples, cache_dir, result):
    tracemalloc.start()  # numpy reports its array allocations to tracemalloc
    start = time.perf_counter()
    PackedDataset([store], None, seq_length, seed=1, num_samples=num_samples, cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    result.put((seconds, tracemalloc.get_traced_memory()[1] / 2**20,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def index_build(store: str, seq_length: int, num_samples: int,
                cache_dir: str) -> tuple[float, float, float]:
    """(seconds, peak heap MiB, peak process RSS MiB) of building the index in a fresh process."""
    ctx = mp.get_context("spawn")
    result = ctx.SimpleQueue()
    process = ctx.Process(target=_build, args=(store, seq_length, num_samples, cache_dir, result))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"index build exited with {process.exitcode}")
    return result.get()


def throughput(dataset, micro_batch_size: int, dp_rank: int, dp_size: int, seconds: float) -> float:
    """Tokens/s of the training path (shards verified before use: the marker cache is warm)."""
    verifier = ShardVerifier(dataset.stores, VOCAB)
    verifier.require((0, i) for i in range(len(dataset.stores[0].shards)))
    loader = DistributedBatchLoader(dataset, micro_batch_size, dp_rank, dp_size,
                                    consumed_samples=dp_size * micro_batch_size * 10,
                                    with_cu_seqlens=True, verifier=verifier)
    tokens, start = 0, time.perf_counter()
    for batch in loader:
        tokens += batch["tokens"].numel()
        if time.perf_counter() - start > seconds:
            break
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--store", help="an existing token store (default: synthetic)")
    parser.add_argument("--tokens", type=float, default=1.2e8)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--startup-shards", type=int, default=400)
    args = parser.parse_args()

    os.environ.setdefault("PRISM_VERIFIED_SHARDS", os.path.join(args.workdir, "verified"))
    store = args.store or synthetic_store(os.path.join(args.workdir, "store"), int(args.tokens))
    opened = TokenStore.open(store)
    print(f"store {store}: {opened.num_tokens:,} tokens, {opened.num_documents:,} documents, "
          f"{len(opened.shards)} shards")
    data = opened.num_tokens * np.dtype(opened.token_dtype).itemsize + 8 * (
        opened.num_documents + len(opened.shards))
    files, blocks = disk_usage(opened.root)
    print(f"on disk: {blocks / 2**20:.1f} MiB (du), {files / 2**20:.1f} MiB in files, for "
          f"{data / 2**20:.1f} MiB of tokens + offsets: {100 * (blocks / data - 1):+.2f}%")
    cache_dir = os.path.join(args.workdir, f"index-{time.time_ns()}")
    one_epoch = opened.num_tokens // args.seq_length
    for epochs in (1, 10):
        seconds, heap, rss = index_build(store, args.seq_length, epochs * one_epoch, cache_dir)
        print(f"index build, {epochs:2d} epoch(s) = {epochs * one_epoch * args.seq_length:.2e} "
              f"tokens of index: {seconds:.2f} s, peak heap {heap:.0f} MiB "
              f"(process peak RSS {rss:.0f} MiB, torch imported)")

    dataset = PackedDataset([store], None, args.seq_length, seed=1, num_samples=one_epoch,
                            cache_dir=cache_dir)
    rates = {}
    for dp_rank, dp_size in ((0, 1), (3, 8)):
        rates[dp_size] = throughput(dataset, args.micro_batch_size, dp_rank, dp_size, args.seconds)
        print(f"loader, 1 process, dp rank {dp_rank}/{dp_size}, micro batch "
              f"{args.micro_batch_size}x{args.seq_length}, cu_seqlens: "
              f"{rates[dp_size] / 1e6:.2f} M tokens/s")
    # Baseline: the same samples with every document fragment read by slicing the zarr array.
    loaded = dataset.stores[0]
    arrays = [loaded.open_shard(i)[0] for i in range(len(loaded.shards))]
    loaded.read_tokens = lambda i, first, count: arrays[i][first:first + count]
    baseline = throughput(dataset, args.micro_batch_size, 0, 1, args.seconds)
    print(f"baseline, zarr slicing per document fragment: {baseline / 1e6:.2f} M tokens/s; "
          f"chunk-file reads are {rates[1] / baseline:.1f}x faster")
    startup(args.workdir, int(args.tokens), args.startup_shards, args.seq_length,
            args.micro_batch_size)


if __name__ == "__main__":
    main()
