"""The sentencepiece tokenizer: training on a seeded sample of a large corpus, adopting an existing
model, and the identity a token store records so that stores made with different tokenizers are
never mixed."""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from prism_megatron.data_prep.sources import discover_inputs, read_documents
from prism_megatron.files import write_atomic

# Fixed special ids, so that every tokenizer this project trains agrees on them.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TokenizerError(ValueError):
    """A tokenizer model is missing, unreadable or unusable; the message names the file."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """A loaded sentencepiece model."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._processor = spm.SentencePieceProcessor()
        try:
            self._processor.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load sentencepiece model {self.path}: {e}") from e
        self.sha256 = file_sha256(self.path)
        self.vocab_size = self._processor.GetPieceSize()
        self.eos_id = self._processor.eos_id()
        self.bos_id = self._processor.bos_id()
        self.pad_id = self._processor.pad_id()
        if self.eos_id < 0:
            raise TokenizerError(f"sentencepiece model {self.path} has no EOS piece; the loader "
                                 "separates packed documents with EOS")

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's token ids, as int32 arrays (no Python int per token)."""
        return self._processor.Encode(texts, out_type="numpy", num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.Decode([int(i) for i in ids])

    def identity(self) -> dict:
        """What a store's manifest records; stores agree on a tokenizer iff all but path agree."""
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "bos_id": self.bos_id, "pad_id": self.pad_id, "path": os.path.abspath(self.path)}


def same_tokenizer(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}


def reservoir_sample(items: Iterable[str], k: int, seed: int) -> list[str]:
    """k items drawn uniformly from a stream of unknown length, in one pass and O(k) memory.

    Li's "Algorithm L": after the reservoir fills, it draws random numbers only for the items it
    keeps, so a pass over a huge corpus costs little more than reading it.
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    weight = 1.0
    next_kept = 0
    for i, item in enumerate(items):
        if i < k:
            reservoir.append(item)
            if i == k - 1:
                weight = math.exp(math.log(rng.random()) / k)
                next_kept = i + 1 + int(math.log(rng.random()) / math.log(1 - weight))
        elif i == next_kept:
            reservoir[rng.randrange(k)] = item
            weight *= math.exp(math.log(rng.random()) / k)
            next_kept += 1 + int(math.log(rng.random()) / math.log(1 - weight))
    return reservoir


def _lines(documents: Iterable[str]) -> Iterator[str]:
    for document in documents:
        for line in document.splitlines():
            if line.strip():
                yield line


def train_tokenizer(inputs: Sequence[str], output: str, vocab_size: int, model_type: str = "bpe",
                    sample_lines: int = 1_000_000, seed: int = 0,
                    special_tokens: Sequence[str] = (), byte_fallback: bool = True,
                    text_key: str = "text") -> str:
    """Train a sentencepiece model on ``sample_lines`` lines sampled (seeded) from ``inputs``.

    ``inputs`` are files, directories or globs, read as ``prism-prep tokenize`` reads them.
    Returns the path of the written ``.model`` (``output``).
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if not output.endswith(".model"):
        raise ValueError(f"the tokenizer output must end in .model, got {output!r}")
    files = discover_inputs(inputs)
    documents = tqdm(read_documents(files, text_key), desc="sampling lines", unit=" docs",
                     mininterval=1.0)
    sample = reservoir_sample(_lines(documents), sample_lines, seed)
    if not sample:
        raise ValueError(f"no text found in {', '.join(map(str, inputs))}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # Trained from memory into memory: no temporary path ends up in the model's trainer spec, so
    # the same sample and settings give the same .model bytes (the tokenizer's identity).
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(sample), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=byte_fallback,
            user_defined_symbols=list(special_tokens), pad_id=PAD_ID, unk_id=UNK_ID,
            bos_id=BOS_ID, eos_id=EOS_ID, num_threads=os.cpu_count() or 1,
            # Lossless: keep newlines and runs of spaces (code, poetry) instead of
            # normalizing them away; with byte fallback a newline becomes a byte piece.
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, minloglevel=1)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training on {sample_lines} sampled lines of "
                         f"{', '.join(map(str, inputs))} failed: {e}") from e
    write_atomic(output, model.getvalue())
    return output


def adopt_tokenizer(model: str, output: str) -> str:
    """Copy an existing sentencepiece model to ``output`` after checking that it loads."""
    Tokenizer(model)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(model, "rb") as f:
        write_atomic(output, f.read())
    return output
