"""Small file-system helpers shared by the data pipeline and the checkpoints."""
from __future__ import annotations

import os


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write whole or not at all: a kill leaves the old file or none, never half of one."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
