"""Training data: a deterministic global sample order over token stores, and a DP-strided loader.

The global order is a pure function of (seed, the stores' manifests, weights, seq_length,
num_samples, split, valid_fraction):

1. Split. A document is held out for "valid" when a fixed hash of its index in the store falls
   below ``valid_fraction``; the split ignores the seed, so train and valid never mix across runs.
2. Per store and epoch, the split's documents in a seeded random order, each followed by EOS,
   form one token stream (epochs are concatenated, each reshuffled).
3. Sample k of a store is stream[k*seq_length : k*seq_length + seq_length + 1]: consecutive
   samples overlap by one token (Megatron's convention), so every token is an input once and
   every label is predicted once. Samples span document boundaries.
4. Samples are shuffled with a seeded permutation within each epoch (a sample's epoch is that of
   the document it starts in), and each store contributes the first samples of that order.
5. Stores are blended by weight: a store's k-th sample is due at time (k + 1/2) / weight, and
   the global order is the merge by due time (ties to the lower store index), which keeps every
   prefix within one sample of its target proportions.

Every step is vectorised numpy over index arrays (document ids, document starts, sample offsets);
the result is cached under ``cache_dir/<sha256 of the inputs>/``, built by one process under a
file lock and memory-mapped by every other process (ranks and loader workers).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .store import TokenStore, TokenStoreError
from .verify import ShardVerifier

logger = logging.getLogger(__name__)

# Bump when the order computed from the same inputs changes, so old caches are not reused.
INDEX_VERSION = 1
_SPLIT_SALT = 0x5EED_0F_DA7A_5B17


def _held_out(num_documents: int, valid_fraction: float) -> np.ndarray:
    """Boolean mask of the documents held out for validation (splitmix64 of the index)."""
    x = np.arange(num_documents, dtype=np.uint64) + np.uint64(_SPLIT_SALT)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53 < valid_fraction


def document_lengths(store: TokenStore) -> np.ndarray:
    """The token count of each document of the store, in order (from the shards' doc_offsets)."""
    lengths = []
    for i in range(len(store.shards)):
        offsets = store.open_shard(i)[1][:].astype(np.int64)
        if (offsets[0] != 0 or offsets[-1] != store.shards[i].num_tokens
                or np.any(np.diff(offsets) < 0)):
            raise TokenStoreError(f"shard {store.shards[i].path}: doc_offsets are not a "
                                  f"non-decreasing run from 0 to its token count")
        lengths.append(np.diff(offsets))
    return np.concatenate(lengths) if lengths else np.empty(0, np.int64)


def held_out_samples(stores: Sequence[TokenStore], seq_length: int, valid_fraction: float) -> int:
    """The samples of one pass over the held-out documents of `stores` (each document and its EOS once):
    the num_samples with which PackedDataset(split="valid") covers them."""
    total = 0
    for store in stores:
        lengths = document_lengths(store)
        held_out = _held_out(len(lengths), valid_fraction)
        total += max(0, (int(lengths[held_out].sum()) + int(held_out.sum()) - 1) // seq_length)
    return total


def _blend(weights: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(store, rank within store) of each global sample, merged by due time (k + 1/2) / w."""
    stores, ranks, due = [], [], []
    for j, w in enumerate(weights):
        if w <= 0:
            continue
        # A store's share of any prefix is within a few samples of w * num_samples.
        count = int(np.ceil(w * num_samples)) + len(weights) + 2
        ranks.append(np.arange(count, dtype=np.int64))
        stores.append(np.full(count, j, dtype=np.int16))
        due.append((ranks[-1] + 0.5) / w)
    order = np.argsort(np.concatenate(due), kind="stable")[:num_samples]
    return np.concatenate(stores)[order], np.concatenate(ranks)[order]


def _store_samples(lengths: np.ndarray, documents: np.ndarray, seq_length: int, num_samples: int,
                   seed: int, store_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Document order (over epochs) of one store and (position, offset) of its first samples."""
    tokens_per_epoch = int(lengths[documents].sum()) + len(documents)  # + one EOS per document
    epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)
    doc_ids = np.concatenate([
        np.random.default_rng([seed, store_index, epoch, 0]).permutation(documents)
        for epoch in range(epochs)])
    segment_ends = np.cumsum(lengths[doc_ids] + 1)
    starts = np.arange((int(segment_ends[-1]) - 1) // seq_length, dtype=np.int64) * seq_length
    position = np.searchsorted(segment_ends, starts, side="right")
    offset = starts - np.concatenate([[0], segment_ends])[position]
    # Samples are in stream order, so each epoch's samples form one contiguous block.
    bounds = np.searchsorted(position // len(documents), np.arange(epochs + 1))
    shuffled = np.concatenate([
        lo + np.random.default_rng([seed, store_index, epoch, 1]).permutation(hi - lo)
        for epoch, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))])[:num_samples]
    return doc_ids, position[shuffled], offset[shuffled]


def _build_index(stores: Sequence[TokenStore], weights: Sequence[float] | None, seq_length: int,
                 seed: int, num_samples: int, split: str, valid_fraction: float,
                 out_dir: str) -> None:
    documents, all_lengths = [], []
    for store in stores:
        lengths = document_lengths(store)
        held_out = _held_out(len(lengths), valid_fraction)
        docs = np.flatnonzero(held_out if split == "valid" else ~held_out)
        if len(docs) == 0:
            raise ValueError(f"store {store.root} has no {split} documents "
                             f"(valid_fraction={valid_fraction}, {len(lengths)} documents)")
        documents.append(docs)
        all_lengths.append(lengths)
        np.save(os.path.join(out_dir, f"doc_starts_{len(documents) - 1}.npy"),
                np.concatenate([[0], np.cumsum(lengths)]))
    if weights is None:  # each store in proportion to its split's tokens
        weights = [float(lengths[docs].sum() + len(docs))
                   for lengths, docs in zip(all_lengths, documents, strict=True)]
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    sample_store, sample_rank = _blend(w, num_samples)
    sample_position = np.empty(num_samples, dtype=np.int64)
    sample_offset = np.empty(num_samples, dtype=np.int64)
    for j in range(len(stores)):
        mine = sample_store == j
        count = int(mine.sum())
        if count == 0:
            continue
        doc_ids, position, offset = _store_samples(all_lengths[j], documents[j], seq_length,
                                                   count, seed, j)
        np.save(os.path.join(out_dir, f"doc_ids_{j}.npy"), doc_ids)
        sample_position[mine] = position[sample_rank[mine]]
        sample_offset[mine] = offset[sample_rank[mine]]
    np.save(os.path.join(out_dir, "sample_store.npy"), sample_store)
    np.save(os.path.join(out_dir, "sample_position.npy"), sample_position)
    np.save(os.path.join(out_dir, "sample_offset.npy"), sample_offset)


def _build_once(index_dir: str, build) -> bool:
    """Run ``build(tmp_dir)`` unless ``index_dir`` exists; True if this process built it.

    The lock makes concurrent ranks wait instead of building too; the rename makes the index
    appear whole, so a process killed mid-build leaves only a stale tmp folder.
    """
    if os.path.isdir(index_dir):
        return False
    start = time.perf_counter()
    os.makedirs(os.path.dirname(index_dir), exist_ok=True)
    with open(index_dir + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(index_dir):
            return False
        tmp = f"{index_dir}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            build(tmp)
            os.replace(tmp, index_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("built sample index %s in %.1f s", index_dir, time.perf_counter() - start)
    return True


class PackedDataset:
    """Samples of ``seq_length + 1`` tokens in the global training order (see module docstring).

    ``dataset[i]`` -> {"tokens": int64 [seq_length + 1], "doc_starts": int32 positions where a
    document starts in the sample, always including 0, "shards": the (store, shard) indices its
    tokens came from}. The dataset pickles as paths: a worker
    reopens the manifests and memory-maps the cached index itself.
    """

    def __init__(self, stores: Sequence[str], weights: Sequence[float] | None, seq_length: int,
                 seed: int, num_samples: int, split: str = "train", valid_fraction: float = 0.01,
                 cache_dir: str | None = None):
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        if weights is not None and (len(weights) != len(stores) or min(weights) < 0
                                    or sum(weights) <= 0):
            raise ValueError(f"weights {weights} must be one non-negative number per store "
                             f"({len(stores)} stores) with a positive sum")
        if seq_length < 1 or num_samples < 1 or not 0 <= valid_fraction <= 1:
            raise ValueError("seq_length and num_samples must be positive and valid_fraction "
                             "in [0, 1]")
        opened = [TokenStore.open(s) for s in stores]
        identities = {(s.manifest["tokenizer"].get("sha256"), s.eos_id) for s in opened}
        if len(identities) != 1:
            raise ValueError(f"stores {list(stores)} were tokenized with different tokenizers")
        inputs = {"index_version": INDEX_VERSION, "seed": seed, "weights": weights,
                  "seq_length": seq_length, "num_samples": num_samples, "split": split,
                  "valid_fraction": valid_fraction,
                  "stores": [{"tokenizer": s.manifest["tokenizer"].get("sha256"),
                              "eos_id": s.eos_id,
                              "shards": [[x.sha256, x.num_documents, x.num_tokens]
                                         for x in s.shards]} for s in opened]}
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        if cache_dir is None:
            cache_dir = os.path.join(os.path.dirname(opened[0].root), "index-cache")
        index_dir = os.path.join(cache_dir, key)
        self.built_index = _build_once(index_dir, functools.partial(
            _build_index, opened, weights, seq_length, seed, num_samples, split, valid_fraction))
        self._state = {"stores": [s.manifest_path for s in opened], "index_dir": index_dir,
                       "seq_length": seq_length}
        self._load(opened)

    def _load(self, stores: list[TokenStore]) -> None:
        self.stores = stores
        self.seq_length = self._state["seq_length"]
        self.eos_id = stores[0].eos_id
        index_dir = self._state["index_dir"]

        def load(name):
            path = os.path.join(index_dir, name)
            return np.load(path, mmap_mode="r") if os.path.exists(path) else None

        self._sample_store = load("sample_store.npy")
        self._sample_position = load("sample_position.npy")
        self._sample_offset = load("sample_offset.npy")
        self._doc_ids = [load(f"doc_ids_{j}.npy") for j in range(len(stores))]
        self._doc_starts = [load(f"doc_starts_{j}.npy") for j in range(len(stores))]
        self._shard_starts = [np.cumsum([0] + [x.num_tokens for x in s.shards]) for s in stores]

    def __getstate__(self) -> dict:
        return dict(self._state)

    def __setstate__(self, state: dict) -> None:
        self._state = state
        self.built_index = False
        self._load([TokenStore.open(p) for p in state["stores"]])

    def __len__(self) -> int:
        return len(self._sample_store)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        length = self.seq_length + 1
        tokens = np.full(length, self.eos_id, dtype=np.int64)
        j = int(self._sample_store[i])
        store, doc_ids, starts = self.stores[j], self._doc_ids[j], self._doc_starts[j]
        shard_starts = self._shard_starts[j]
        position, offset = int(self._sample_position[i]), int(self._sample_offset[i])
        doc_starts, filled, shards = [0], 0, set()
        while filled < length:
            doc = int(doc_ids[position])
            first = int(starts[doc]) + offset
            remaining = int(starts[doc + 1]) - first
            take = min(remaining, length - filled)
            if take:
                shard = int(np.searchsorted(shard_starts, first, side="right")) - 1
                shards.add((j, shard))
                tokens[filled:filled + take] = store.read_tokens(
                    shard, first - int(shard_starts[shard]), take)
            filled += remaining + 1  # the EOS after the document is already in `tokens`
            if filled < length:
                doc_starts.append(filled)
            position, offset = position + 1, 0
        return {"tokens": tokens, "doc_starts": np.asarray(doc_starts, dtype=np.int32),
                "shards": shards}


def collate_samples(samples: list[dict[str, np.ndarray]], with_cu_seqlens: bool) -> dict:
    """Stack samples into tokens/labels [batch, seq_length] (and cu_seqlens over the flat batch)."""
    stacked = torch.from_numpy(np.stack([s["tokens"] for s in samples]))
    batch = {"tokens": stacked[:, :-1].contiguous(), "labels": stacked[:, 1:].contiguous(),
             "shards": sorted(set().union(*(s["shards"] for s in samples)))}
    if with_cu_seqlens:
        seq_length = stacked.shape[1] - 1
        bounds = [row * seq_length + s["doc_starts"][s["doc_starts"] < seq_length]
                  for row, s in enumerate(samples)]
        bounds.append(np.array([len(samples) * seq_length]))
        batch["cu_seqlens"] = torch.from_numpy(np.concatenate(bounds).astype(np.int32))
    return batch


class _MicroBatches:
    """Global sample ids of one DP rank's micro batches, in increasing order; the last one short
    rather than left out unless ``drop_last``."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int, drop_last: bool):
        first = consumed_samples + (dp_rank - consumed_samples) % dp_size
        self.ids = range(first, num_samples, dp_size)
        self.micro_batch_size = micro_batch_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        whole, rest = divmod(len(self.ids), self.micro_batch_size)
        return whole + (rest > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(len(self)):
            yield list(self.ids[b * self.micro_batch_size:(b + 1) * self.micro_batch_size])


class DistributedBatchLoader:
    """Micro batches of DP rank ``dp_rank``: global samples g with g % dp_size == dp_rank, from
    ``consumed_samples`` (a global count) until the dataset is exhausted.

    The number of consumed samples is the whole loader state to checkpoint; resuming it at any
    DP size with the same global batch continues the same global order. With a ``verifier``
    (verify.ShardVerifier) no batch is handed out before the shards it was read from are verified.

    ``drop_last=False`` makes one pass over every sample (an evaluation's): the rank's last micro
    batch may be short, and every rank yields as many rounds as the rank with the most samples,
    None for a round in which it has none, so that a collective run once a round stays matched.
    """

    def __init__(self, dataset: PackedDataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, num_workers: int = 0, with_cu_seqlens: bool = False,
                 verifier: ShardVerifier | None = None, drop_last: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.dataset = dataset
        self.batches = _MicroBatches(len(dataset), micro_batch_size, dp_rank, dp_size,
                                     consumed_samples, drop_last)
        self.rounds = len(self.batches)
        if not drop_last:  # the rank with the most samples: the one the global order resumes at
            self.rounds = len(_MicroBatches(len(dataset), micro_batch_size, consumed_samples % dp_size,
                                            dp_size, consumed_samples, drop_last))
        self.num_workers = num_workers
        self.verifier = verifier
        self.collate = functools.partial(collate_samples, with_cu_seqlens=with_cu_seqlens)

    def __len__(self) -> int:
        return self.rounds

    def __iter__(self) -> Iterator[dict | None]:
        if self.num_workers == 0:
            batches = (self.collate([self.dataset[g] for g in ids]) for ids in self.batches)
        else:
            # Spawned workers unpickle the dataset as paths and open the stores themselves.
            batches = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self.batches, num_workers=self.num_workers,
                collate_fn=self.collate, multiprocessing_context="spawn",
                worker_init_fn=_ignore_stop_signals)
        for batch in batches:
            shards = batch.pop("shards")
            if self.verifier is not None:
                self.verifier.require(shards)
            yield batch
        for _ in range(self.rounds - len(self.batches)):
            yield None


def _ignore_stop_signals(worker_id: int) -> None:
    """Preemption signals reach the whole process group; the training process decides when to stop
    (and stops its workers), so a worker killed by one must not break the batch in flight."""
    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
