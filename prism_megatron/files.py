"""Small file-system helpers shared by the data pipeline and the checkpoints."""
from __future__ import annotations

import os


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text or bytes whole or not at all: a kill leaves the old file or none, never half."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
