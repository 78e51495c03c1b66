"""What the trainer checks about its data: stores that fit the model, and shards that match their
checksums and hold only ids inside the model's vocabulary, each verified before its tokens are
first used.

Stores are checked when the run starts (manifests only, so it is cheap). Shards are verified
lazily: a background thread hashes them one after another while the run starts and trains, and a
batch that touches a shard not yet verified waits for that shard alone. A verified shard is
remembered on the machine by a marker in ``$PRISM_VERIFIED_SHARDS`` (default
``$XDG_CACHE_HOME/prism-megatron/verified-shards``, ``~/.cache`` without XDG_CACHE_HOME), keyed
by the shard's path, its expected digest and the size and mtime of each of its files, so a
restart verifies nothing twice; a lock per shard lets the ranks of one machine share the work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Sequence

from prism_megatron.data_prep.store import ShardInfo, TokenStore, TokenStoreError
from prism_megatron.data_prep.tokenizer import same_tokenizer
from prism_megatron.files import write_atomic


def open_training_stores(paths: Sequence[str], vocab_size: int) -> list[TokenStore]:
    """The stores a run trains on, refused (naming the store) unless they share one tokenizer
    whose vocabulary fits a model of ``vocab_size`` ids."""
    stores: list[TokenStore] = []
    for path in paths:
        try:
            store = TokenStore.open(path)
        except FileNotFoundError as e:
            raise TokenStoreError(f"data.stores: {e}") from e
        if store.vocab_size > vocab_size:
            raise TokenStoreError(
                f"store {store.manifest_path} was tokenized with a vocabulary of "
                f"{store.vocab_size} ids, more than model.vocab_size={vocab_size}")
        first = stores[0] if stores else store
        if not same_tokenizer(store.manifest["tokenizer"], first.manifest["tokenizer"]):
            raise TokenStoreError(
                f"stores {first.manifest_path} and {store.manifest_path} were tokenized with "
                f"different tokenizers (sha256 {first.manifest['tokenizer'].get('sha256')} vs "
                f"{store.manifest['tokenizer'].get('sha256')}); a run's stores must share one")
        stores.append(store)
    return stores


def _cache_dir() -> str:
    if os.environ.get("PRISM_VERIFIED_SHARDS"):
        return os.environ["PRISM_VERIFIED_SHARDS"]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "prism-megatron", "verified-shards")


def _marker_key(shard: ShardInfo) -> str:
    files = []
    for folder, _, names in os.walk(shard.path):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            files.append([os.path.relpath(os.path.join(folder, name), shard.path), stat.st_size,
                          stat.st_mtime_ns])
    key = [os.path.realpath(shard.path), shard.sha256, sorted(files)]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


class ShardVerifier:
    """Verifies the shards of ``stores`` in the background; ``require`` blocks until the named
    shards are verified and raises TokenStoreError (naming the shard) for a bad one."""

    def __init__(self, stores: Sequence[TokenStore], vocab_size: int):
        self.stores = list(stores)
        self.vocab_size = vocab_size
        self.cache_dir = _cache_dir()
        os.makedirs(self.cache_dir, exist_ok=True)
        self._verified: set[tuple[int, int]] = set()
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._verify_all, name="shard-verifier",
                                        daemon=True)
        self._thread.start()

    def _verify_all(self) -> None:
        try:
            for j, store in enumerate(self.stores):
                for i in range(len(store.shards)):
                    self._verify(j, i)
        except TokenStoreError as e:
            self._failure = str(e)

    def require(self, shards: Iterable[tuple[int, int]]) -> None:
        """Return once every (store index, shard index) in ``shards`` is verified."""
        for j, i in shards:
            self._verify(j, i)
        if self._failure is not None:  # found in the background: the run would meet it later
            raise TokenStoreError(self._failure)

    def _verify(self, j: int, i: int) -> None:
        if (j, i) in self._verified:
            return
        store, shard = self.stores[j], self.stores[j].shards[i]
        marker = os.path.join(self.cache_dir, _marker_key(shard) + ".json")
        with open(marker + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(marker) as f:
                    max_id = json.load(f)["max_id"]
            except (OSError, ValueError, KeyError):
                max_id = self._scan(store, i)
                write_atomic(marker, json.dumps({"shard": shard.path, "max_id": max_id}))
        if max_id >= self.vocab_size:
            raise TokenStoreError(f"shard {shard.path} holds token id {max_id}, outside the "
                                  f"model's vocabulary (model.vocab_size={self.vocab_size})")
        self._verified.add((j, i))

    @staticmethod
    def _scan(store: TokenStore, i: int) -> int:
        shard = store.shards[i]
        try:
            digest, max_id = store.scan_shard(i)
        except TokenStoreError:
            raise
        except (OSError, ValueError) as e:
            raise TokenStoreError(f"shard {shard.path} cannot be read: {e}") from e
        if digest != shard.sha256:
            raise TokenStoreError(f"shard {shard.path} does not match its sha256 in "
                                  f"{store.manifest_path}: it is corrupt or changed since it was "
                                  f"written")
        return max_id
