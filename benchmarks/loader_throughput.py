"""Loader benchmark: sample-index build time and memory, and tokens/s one process delivers in the
training order (shuffled documents packed with EOS, shuffled samples, DP-strided).

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
from prism_megatron.data_prep.store import TokenStore, write_manifest, write_shard

VOCAB = 32000
EOS = 2


def synthetic_store(path: str, num_tokens: int, num_shards: int = 4, seed: int = 0) -> str:
    if os.path.exists(os.path.join(path, "manifest.json")):
        return path
    rng = np.random.default_rng(seed)
    infos = []
    for s in range(num_shards):
        lengths = []
        while sum(lengths) < num_tokens // num_shards:
            lengths.extend(np.maximum(1, rng.lognormal(6.0, 1.0, 10_000)).astype(int).tolist())

        def documents():
            for length in lengths:
                yield rng.integers(3, VOCAB, size=length, dtype=np.uint16)

        infos.append(write_shard(os.path.join(path, "shards", f"{s:05d}.zarr"),
                                 tqdm(documents(), total=len(lengths), desc=f"shard {s}"),
                                 "uint16"))
    write_manifest(path, {"sha256": "synthetic", "vocab_size": VOCAB, "eos_id": EOS,
                          "bos_id": 1, "pad_id": 0, "path": "synthetic"}, "uint16", infos)
    return path


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
    loader = DistributedBatchLoader(dataset, micro_batch_size, dp_rank, dp_size,
                                    consumed_samples=dp_size * micro_batch_size * 10,
                                    with_cu_seqlens=True)
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
    args = parser.parse_args()

    store = args.store or synthetic_store(os.path.join(args.workdir, "store"), int(args.tokens))
    opened = TokenStore.open(store)
    print(f"store {store}: {opened.num_tokens:,} tokens, {opened.num_documents:,} documents, "
          f"{len(opened.shards)} shards")
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


if __name__ == "__main__":
    main()
