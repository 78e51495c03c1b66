"""A checkpoint on disk: the one module that knows its folders, file names and records.

    DIR/step_00000100/               DeepSpeed's model/optimizer/scheduler files, layout.json,
                                     run_config.json, COMPLETE
    DIR/step_00000100/layout_free/   the same state with no layout (made on demand, layout_free.py)
    DIR/latest                       tag of the newest committed checkpoint (what DeepSpeed's tools read)

COMPLETE records the step and every file's size and sha256, and is written last (commit.py): a
folder without it is not a checkpoint, and one whose files do not match their record is not intact.
`layout.json` records the TP and DP sizes, the ZeRO stage and every parameter's TP split
(`sharding.ShardSpec`); `run_config.json` the config of the run that wrote it. The layout-free
form has `state.safetensors`, `state.json` and a COMPLETE of its own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from prism_megatron.files import write_atomic

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
LAYOUT = "layout.json"
RUN_CONFIG = "run_config.json"
LAYOUT_FREE = "layout_free"
TENSORS = "state.safetensors"
STATE = "state.json"
_TAG = re.compile(r"step_(\d+)")
_HASH_BLOCK = 1 << 24


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path."""


@dataclass(frozen=True)
class Layout:
    """The layout that wrote a checkpoint. `data_parallel` is DeepSpeed's data-parallel size, DP x CP
    (world / TP): the ranks ZeRO partitions the optimizer over, which is what a checkpoint's files
    depend on (layout.json keeps the key's name)."""

    tensor_parallel: int
    data_parallel: int
    zero_stage: int

    def __str__(self) -> str:
        return f"TP={self.tensor_parallel} x DP={self.data_parallel}, ZeRO-{self.zero_stage}"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_folders(ckpt_dir: str | Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _TAG.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def is_committed(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def committed(ckpt_dir: str | Path) -> list[Path]:
    """Committed checkpoints in `ckpt_dir`, oldest first."""
    return [p for p in step_folders(ckpt_dir) if is_committed(p)]


def newest(ckpt_dir: str | Path) -> Path | None:
    """The newest intact checkpoint. Newer ones that are half-written, truncated or corrupt are
    skipped with a warning naming the file; None if there is no checkpoint, an error if none is intact."""
    folders = step_folders(ckpt_dir)
    problems = []
    for path in reversed(folders):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            problems.append(str(e))
            log.warning("skipping %s", e)
    if any(is_committed(p) for p in folders):
        raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(problems))
    return None


def verify(path: Path) -> None:
    """Raise CheckpointError if `path` is not committed, naming the first file that is missing, not
    the size or not the hash recorded, or saying that the checkpoint vanished or changed while read."""
    if not is_committed(path):
        raise CheckpointError(f"{path} has no {COMPLETE} marker (a save that did not finish)")
    marker = _marker_text(path)
    for name, (size, sha256) in _read_complete(path)[1].items():
        try:
            problem = _file_problem(path / name, size, sha256)
        except FileNotFoundError:
            problem = f"is incomplete: {path / name} is missing"
        if problem:
            raise CheckpointError(vanished(path, marker) or f"checkpoint {path} {problem}")


def _file_problem(f: Path, size: int, sha256: str) -> str | None:
    if not f.is_file():
        return f"is incomplete: {f} is missing"
    if f.stat().st_size != size:
        return f"is corrupt: {f} has {f.stat().st_size} bytes, {size} were written"
    if file_record(f)["sha256"] != sha256:
        return f"is corrupt: {f} does not match its recorded sha256 (its contents changed after it was written)"
    return None


def _marker_text(path: Path) -> str | None:
    try:
        return (path / COMPLETE).read_text()
    except OSError:
        return None


def vanished(path: Path, marker: str | None = None) -> str | None:
    """Why a checkpoint being read is no longer the one the reader started on, or None: its folder
    or COMPLETE marker is gone, or the marker no longer reads `marker` (another run pruning or
    rewriting the folder, most likely)."""
    now = _marker_text(path)
    if now is not None and (marker is None or now == marker):
        return None
    return f"checkpoint {path} vanished or changed while being read: another run may be writing {path.parent}"


def file_record(f: Path) -> dict:
    digest = hashlib.sha256()
    with open(f, "rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return {"bytes": f.stat().st_size, "sha256": digest.hexdigest()}


def _read_complete(path: Path) -> tuple[int, dict[str, tuple[int, str]]]:
    """The step and {file name: (bytes, sha256)} that COMPLETE records."""
    try:
        record = json.loads((path / COMPLETE).read_text())
        return int(record["step"]), {name: (int(r["bytes"]), str(r["sha256"])) for name, r in record["files"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(vanished(path) or f"checkpoint {path}: unreadable {COMPLETE} marker ({e})") from None


def read_step(path: Path) -> int:
    return _read_complete(path)[0]


def run_config_file(path: Path) -> Path:
    return path / RUN_CONFIG


def read_run_config(path: Path) -> dict:
    """The config of the run that wrote the checkpoint at `path`: sections of plain values."""
    try:
        record = json.loads(run_config_file(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(vanished(path) or f"checkpoint {path}: no readable {RUN_CONFIG} ({e})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{run_config_file(path)}: not a JSON object of config sections")
    return record


def read_model_config(path: Path) -> dict:
    model = read_run_config(path).get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{run_config_file(path)}: no model section")
    return model


def read_layout(path: Path) -> Layout:
    try:
        record = json.loads((path / LAYOUT).read_text())
        return Layout(record["tensor_parallel"], record["data_parallel"], record["zero_stage"])
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(vanished(path) or f"checkpoint {path}: no readable {LAYOUT} ({e}); it was written "
                              "before checkpoints recorded their layout and resumes only at the layout that "
                              "wrote it") from None


def read_shard_specs(path: Path) -> dict:
    """{parameter name: its ShardSpec}, as `layout.json` records them."""
    from prism_megatron.sharding import ShardSpec

    return {name: ShardSpec(s["partition_dim"], tuple(s["segments"]) if s["segments"] else None, s["vocab_size"])
            for name, s in json.loads((path / LAYOUT).read_text())["params"].items()}


def write_run_config(path: Path, run_config: dict) -> None:
    write_atomic(run_config_file(path), json.dumps(run_config, indent=2))


def write_layout(path: Path, layout: Layout, model) -> None:
    """`layout` and the TP split of each parameter of `model`."""
    from prism_megatron.sharding import shard_spec

    params = {name: asdict(shard_spec(p)) for name, p in model.named_parameters()}
    write_atomic(path / LAYOUT, json.dumps({**asdict(layout), "params": params}, indent=1))


def write_complete(folder: Path, step: int, files: dict) -> None:
    """Commit `folder`: `files` maps each file's name to its `file_record`."""
    write_atomic(folder / COMPLETE, json.dumps({"step": step, "files": files}, indent=1))


def write_latest(ckpt_dir: Path, path: Path) -> None:
    write_atomic(ckpt_dir / LATEST, path.name)


def remove(folder: Path) -> None:
    # Uncommit first: a crash during rmtree must not leave a "complete" checkpoint with holes.
    (folder / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(folder)
