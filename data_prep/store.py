"""The token store (format version 1): sharded zarr v3 arrays of token ids plus a manifest.

    STORE/
      manifest.json          written last, atomically
      shards/00000.zarr      one zarr v3 group per shard, written by exactly one process
        tokens               1-D uint16 (vocab_size <= 65536) or uint32
        doc_offsets          1-D uint64, num_documents + 1 entries, starting at 0

Documents are stored without EOS; the loader inserts it between packed documents.

A shard is written into ``<name>.tmp`` and renamed into place only when complete, so a killed
writer leaves either a whole shard or a stale ``.tmp`` that the next attempt removes.

Both arrays are uncompressed with one file per chunk (``tokens/c/<k>`` holds chunk k as raw
little-endian integers). The writer streams tokens to one flat file and only at commit, when the
length is known, picks the chunk shape: the fewest chunks of at most ``TOKENS_PER_CHUNK`` tokens,
as equal as they can be, so the last chunk's padding is less than one token per chunk and a store
takes on disk what its tokens and offsets take (stores written with fixed, padded chunks read the
same: the chunk shape is read from each array's metadata). The loader reads samples straight from
the chunk files (``TokenStore.read_tokens``): zarr's per-call cost is far too high for a shuffled
stream of short documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Sequence

import numpy as np
import zarr

from prism_megatron.data_prep.sources import REPORT, combine_reports, write_report
from prism_megatron.data_prep.tokenizer import same_tokenizer
from prism_megatron.files import write_atomic

FORMAT = "prism-token-store"
VERSION = 1
MANIFEST = "manifest.json"

# The largest chunk (16 MiB of uint16 tokens): few files for a large corpus.
TOKENS_PER_CHUNK = 1 << 23
OFFSETS_PER_CHUNK = 1 << 20
_RAW_LITTLE_ENDIAN = [{"name": "bytes", "configuration": {"endian": "little"}}]
_TOKEN_STREAM = "tokens.stream"  # the writer's flat token file inside the .tmp shard
# verify() hashes a shard in blocks of this many tokens so memory stays bounded.
VERIFY_BLOCK_TOKENS = 1 << 24


class TokenStoreError(ValueError):
    """A store, manifest or shard is malformed; the message names the file."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    path: str
    num_documents: int
    num_tokens: int
    sha256: str


def token_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def _little_endian_bytes(array: np.ndarray, dtype: str) -> memoryview:
    return memoryview(np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")))


def fitted_chunk(length: int, max_chunk: int) -> int:
    """The chunk size that cuts ``length`` elements into the fewest chunks of at most
    ``max_chunk``, as equal as they can be (the last chunk pads less than one element per chunk)."""
    if length == 0:
        return 1
    chunks = -(-length // max_chunk)
    return -(-length // chunks)


def _cut_into_chunks(stream: str, folder: str, length: int, chunk: int, itemsize: int) -> None:
    """Turn the flat file ``stream`` of ``length`` items into zarr chunk files folder/<k>."""
    os.makedirs(folder)
    chunk_bytes = chunk * itemsize
    count = -(-length // chunk)
    with open(stream, "rb") as src:
        src.seek(chunk_bytes)
        for k in range(1, count):  # chunk 0 is the stream itself, cut short below
            path = os.path.join(folder, str(k))
            with open(path, "wb") as dst:
                dst.write(src.read(chunk_bytes))
            os.truncate(path, chunk_bytes)  # zero padding of the last chunk
    if count:
        os.truncate(stream, chunk_bytes)
        os.replace(stream, os.path.join(folder, "0"))
    else:
        os.remove(stream)


class ShardWriter:
    """Streams documents into one shard; ``commit()`` makes it visible.

    Use as a context manager: leaving the block without ``commit()`` (an exception) removes the
    partial ``.tmp`` directory.
    """

    def __init__(self, path: str | os.PathLike, token_dtype: str):
        if token_dtype not in ("uint16", "uint32"):
            raise ValueError(f"token_dtype must be 'uint16' or 'uint32', got {token_dtype!r}")
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            raise FileExistsError(f"shard {self.path} already exists; refusing to overwrite it")
        self.token_dtype = token_dtype
        self._max_token = np.iinfo(token_dtype).max
        self._tmp = self.path + ".tmp"
        shutil.rmtree(self._tmp, ignore_errors=True)  # left by a killed writer
        self._group = zarr.open_group(self._tmp, mode="w", zarr_format=3)
        self._stream_path = os.path.join(self._tmp, _TOKEN_STREAM)
        self._stream = open(self._stream_path, "wb")
        self._written = 0
        self._doc_lengths: list[np.ndarray] = []
        self._hash = hashlib.sha256()

    def add_documents(self, documents: Iterable[Sequence[int] | np.ndarray]) -> None:
        """Append a batch of documents (lists of ids or integer arrays), in order."""
        documents = list(documents)
        if not documents:
            return
        lengths = np.fromiter((len(d) for d in documents), dtype=np.uint64, count=len(documents))
        total = int(lengths.sum())
        if all(isinstance(d, np.ndarray) for d in documents):
            flat = np.concatenate(documents) if total else np.empty(0, dtype=np.int64)
        else:
            flat = np.fromiter(itertools.chain.from_iterable(documents), dtype=np.int64, count=total)
        if total and (flat.min() < 0 or flat.max() > self._max_token):
            raise ValueError(f"{self.path}: token ids must lie in [0, {self._max_token}] for "
                             f"{self.token_dtype}, got [{flat.min()}, {flat.max()}]")
        self._doc_lengths.append(lengths)
        block = _little_endian_bytes(flat, self.token_dtype)
        self._stream.write(block)
        self._hash.update(block)
        self._written += total

    def _create_array(self, name: str, length: int, dtype: str, max_chunk: int) -> zarr.Array:
        return self._group.create_array(
            name, shape=(length,), dtype=dtype, chunks=(fitted_chunk(length, max_chunk),),
            compressors=None, fill_value=0, config={"write_empty_chunks": True})

    def commit(self) -> ShardInfo:
        self._stream.close()
        tokens = self._create_array("tokens", self._written, self.token_dtype, TOKENS_PER_CHUNK)
        _cut_into_chunks(self._stream_path, os.path.join(self._tmp, "tokens", "c"), self._written,
                         tokens.chunks[0], np.dtype(self.token_dtype).itemsize)
        lengths = np.concatenate(self._doc_lengths) if self._doc_lengths else np.empty(0, np.uint64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.uint64)
        np.cumsum(lengths, out=offsets[1:])
        self._create_array("doc_offsets", len(offsets), "uint64", OFFSETS_PER_CHUNK)[:] = offsets
        self._hash.update(_little_endian_bytes(offsets, "uint64"))
        info = ShardInfo(self.path, len(lengths), self._written, self._hash.hexdigest())
        # The counts travel with the shard so a resumed run can list finished shards cheaply.
        self._group.attrs.update({"num_documents": info.num_documents,
                                  "num_tokens": info.num_tokens, "sha256": info.sha256})
        os.replace(self._tmp, self.path)
        return info

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._stream.close()
            shutil.rmtree(self._tmp, ignore_errors=True)


def read_shard_info(path: str | os.PathLike) -> ShardInfo:
    """The counts and checksum a committed shard recorded about itself."""
    path = os.fspath(path)
    try:
        attrs = zarr.open_group(path, mode="r").attrs
        return ShardInfo(path, int(attrs["num_documents"]), int(attrs["num_tokens"]),
                         str(attrs["sha256"]))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise FileNotFoundError(f"shard {path} does not exist") from e
    except (KeyError, ValueError, TypeError) as e:
        raise TokenStoreError(f"shard {path} has no valid shard attributes: {e!r}") from e


def write_manifest(store_dir: str | os.PathLike, tokenizer_identity: dict, token_dtype: str,
                   shards: Sequence[ShardInfo]) -> str:
    """Write STORE/manifest.json atomically; shard paths are stored relative to ``store_dir``."""
    store_dir = os.fspath(store_dir)
    for key in ("vocab_size", "eos_id"):
        if key not in tokenizer_identity:
            raise ValueError(f"tokenizer identity for {store_dir} lacks {key!r}")
    if token_dtype == "uint16" and tokenizer_identity["vocab_size"] > 65536:
        raise ValueError(f"uint16 cannot hold vocab_size {tokenizer_identity['vocab_size']}")
    entries = [{"path": os.path.relpath(os.path.abspath(s.path), os.path.abspath(store_dir)),
                "num_documents": s.num_documents, "num_tokens": s.num_tokens, "sha256": s.sha256}
               for s in shards]
    manifest = {"format": FORMAT, "version": VERSION, "tokenizer": dict(tokenizer_identity),
                "token_dtype": token_dtype,
                "num_documents": sum(s.num_documents for s in shards),
                "num_tokens": sum(s.num_tokens for s in shards),
                "shards": entries}
    os.makedirs(store_dir, exist_ok=True)
    path = os.path.join(store_dir, MANIFEST)
    write_atomic(path, json.dumps(manifest, indent=1))
    return path


def _check_manifest(manifest: object, path: str) -> None:
    def fail(what: str):
        raise TokenStoreError(f"manifest {path}: {what}")

    if not isinstance(manifest, dict):
        fail("not a JSON object")
    if manifest.get("format") != FORMAT:
        fail(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        fail(f"version {manifest.get('version')!r} is not supported (expected {VERSION})")
    if manifest.get("token_dtype") not in ("uint16", "uint32"):
        fail(f"token_dtype {manifest.get('token_dtype')!r} is not uint16/uint32")
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict) or not all(
            isinstance(tokenizer.get(k), int) for k in ("vocab_size", "eos_id")):
        fail("tokenizer must be an object with integer vocab_size and eos_id")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        fail("shards must be a list")
    for i, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("path"), str)
                and isinstance(shard.get("num_documents"), int)
                and isinstance(shard.get("num_tokens"), int)
                and isinstance(shard.get("sha256"), str)):
            fail(f"shard entry {i} needs path, num_documents, num_tokens, sha256")
    for key in ("num_documents", "num_tokens"):
        if manifest.get(key) != sum(s[key] for s in shards):
            fail(f"{key} {manifest.get(key)!r} is not the sum over its shards")


class TokenStore:
    """A read-only view of a store: its manifest and fresh handles on its shards."""

    def __init__(self, manifest: dict, manifest_path: str):
        _check_manifest(manifest, manifest_path)
        self.manifest = manifest
        self.manifest_path = manifest_path
        self.root = os.path.dirname(manifest_path)
        self.shards = [ShardInfo(os.path.normpath(os.path.join(self.root, s["path"])),
                                 s["num_documents"], s["num_tokens"], s["sha256"])
                       for s in manifest["shards"]]
        self._layouts: dict[int, tuple[str, np.dtype, int]] = {}
        for shard in self.shards:
            if not os.path.isdir(shard.path):
                raise FileNotFoundError(
                    f"shard {shard.path} listed in manifest {manifest_path} does not exist")

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenStore:
        path = os.fspath(path)
        manifest_path = path if path.endswith(".json") else os.path.join(path, MANIFEST)
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no token store manifest at {manifest_path}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenStoreError(f"manifest {manifest_path} is not valid JSON: {e}") from e
        return cls(manifest, os.path.abspath(manifest_path))

    @property
    def num_documents(self) -> int:
        return self.manifest["num_documents"]

    @property
    def num_tokens(self) -> int:
        return self.manifest["num_tokens"]

    @property
    def token_dtype(self) -> str:
        return self.manifest["token_dtype"]

    @property
    def eos_id(self) -> int:
        return self.manifest["tokenizer"]["eos_id"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    def open_shard(self, i: int) -> tuple[zarr.Array, zarr.Array]:
        """(tokens, doc_offsets) of shard i, opened fresh (each loader worker opens its own)."""
        shard = self.shards[i]
        try:
            group = zarr.open_group(shard.path, mode="r")
            tokens, doc_offsets = group["tokens"], group["doc_offsets"]
        except Exception as e:
            raise TokenStoreError(f"shard {shard.path} cannot be opened as a token shard: "
                                  f"{e!r}") from e
        if tokens.shape != (shard.num_tokens,) or doc_offsets.shape != (shard.num_documents + 1,):
            raise TokenStoreError(
                f"shard {shard.path} holds {tokens.shape[0]} tokens and "
                f"{doc_offsets.shape[0] - 1} documents but manifest {self.manifest_path} "
                f"says {shard.num_tokens} and {shard.num_documents}")
        return tokens, doc_offsets

    def _chunk_layout(self, i: int) -> tuple[str, np.dtype, int]:
        """(chunk folder, little-endian dtype, tokens per chunk) of shard i's tokens array."""
        if i not in self._layouts:
            self._layouts[i] = self._read_chunk_layout(i)
        return self._layouts[i]

    def _read_chunk_layout(self, i: int) -> tuple[str, np.dtype, int]:
        path = os.path.join(self.shards[i].path, "tokens", "zarr.json")
        try:
            with open(path) as f:
                meta = json.load(f)
            chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
            layout_ok = (meta["codecs"] == _RAW_LITTLE_ENDIAN
                         and meta["chunk_key_encoding"] == {"name": "default",
                                                            "configuration": {"separator": "/"}}
                         and meta["data_type"] == self.token_dtype and len(chunk) == 1)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenStoreError(f"{path} is not readable zarr array metadata: {e!r}") from e
        if not layout_ok:
            raise TokenStoreError(f"{path} is not an uncompressed {self.token_dtype} array with "
                                  f"one file per chunk (not written by this store's writer?)")
        dtype = np.dtype(self.token_dtype).newbyteorder("<")
        return os.path.join(self.shards[i].path, "tokens", "c"), dtype, chunk[0]

    def read_tokens(self, i: int, first: int, count: int) -> np.ndarray:
        """tokens[first:first + count] of shard i, read straight from its chunk files."""
        if first < 0 or first + count > self.shards[i].num_tokens:
            raise IndexError(f"tokens [{first}, {first + count}) outside shard "
                             f"{self.shards[i].path} of {self.shards[i].num_tokens} tokens")
        folder, dtype, chunk = self._chunk_layout(i)
        pieces = []
        while count > 0:
            k, within = divmod(first, chunk)
            take = min(count, chunk - within)
            path = os.path.join(folder, str(k))
            try:
                piece = np.fromfile(path, dtype=dtype, count=take, offset=within * dtype.itemsize)
            except OSError as e:
                raise TokenStoreError(f"token chunk {path} cannot be read: {e}") from e
            if len(piece) != take:
                raise TokenStoreError(f"token chunk {path} is truncated")
            pieces.append(piece)
            first, count = first + take, count - take
        if not pieces:  # count 0: a shard may hold no documents
            return np.empty(0, dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def scan_shard(self, i: int) -> tuple[str, int]:
        """(sha256 of its contents, largest token id) of shard i, read block by block."""
        _, doc_offsets = self.open_shard(i)
        digest, max_id = hashlib.sha256(), -1
        count = self.shards[i].num_tokens
        for start in range(0, count, VERIFY_BLOCK_TOKENS):
            block = self.read_tokens(i, start, min(VERIFY_BLOCK_TOKENS, count - start))
            digest.update(_little_endian_bytes(block, self.token_dtype))
            max_id = max(max_id, int(block.max()))
        digest.update(_little_endian_bytes(doc_offsets[:], "uint64"))
        return digest.hexdigest(), max_id

    def verify(self) -> list[str]:
        """Paths of the shards whose contents do not match the manifest's checksum."""
        corrupt = []
        for i, shard in enumerate(self.shards):
            try:
                ok = self.scan_shard(i)[0] == shard.sha256
            except Exception:  # unreadable counts as corrupt; the caller reports the path
                ok = False
            if not ok:
                corrupt.append(shard.path)
        return corrupt


def merge_stores(output: str, stores: Sequence[str]) -> str:
    """A store at ``output`` whose manifest lists the shards of ``stores`` in order, in place
    (relative paths into them); the stores must share a tokenizer. Returns the manifest path."""
    opened = [TokenStore.open(s) for s in stores]
    first = opened[0]
    for store in opened[1:]:
        if not same_tokenizer(store.manifest["tokenizer"], first.manifest["tokenizer"]):
            raise TokenStoreError(
                f"cannot merge {store.manifest_path} with {first.manifest_path}: they were made "
                f"with different tokenizers ({store.manifest['tokenizer']} vs "
                f"{first.manifest['tokenizer']})")
    reports = []
    for store in opened:
        path = os.path.join(store.root, REPORT)
        if os.path.exists(path):
            with open(path) as f:
                reports.append(json.load(f)["files"])
    write_report(output, combine_reports(reports))
    return write_manifest(output, first.manifest["tokenizer"], first.token_dtype,
                          [shard for store in opened for shard in store.shards])
