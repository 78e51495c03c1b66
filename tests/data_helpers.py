"""Test helpers for the data pipeline."""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence

import numpy as np

from prism_megatron.data_prep.store import ShardInfo, ShardWriter


def write_shard(path: str | os.PathLike, documents: Iterable[Sequence[int] | np.ndarray],
                token_dtype: str, batch_documents: int = 4096) -> ShardInfo:
    """One shard from an iterable of documents, added in batches."""
    with ShardWriter(path, token_dtype) as writer:
        documents = iter(documents)
        while batch := list(itertools.islice(documents, batch_documents)):
            writer.add_documents(batch)
        return writer.commit()
