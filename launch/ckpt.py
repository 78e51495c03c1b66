"""`prism-ckpt`: look inside prism-train checkpoints and take them elsewhere.

    prism-ckpt inspect DIR        step, layout, model config, sizes and integrity of each checkpoint
    prism-ckpt convert DIR        write the layout-free form (what --resume at another layout reads)
    prism-ckpt export DIR OUT     the model alone in OUT (checkpoint/export.py: weights, config, tokenizer), for
                                  checkpoint.load_exported, prism-generate and transformers (prism_megatron.hf)

DIR is one checkpoint (checkpoint.dir/step_NNNNNNNN) or a run's checkpoint.dir (then convert and
export take its newest intact checkpoint). No process group and no GPU are needed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from prism_megatron.launch.checkpoint.export import export
from prism_megatron.launch.checkpoint.format import (LAYOUT_FREE, CheckpointError, is_committed, newest, read_layout,
                                                     read_model_config, read_step, step_folders, verify)
from prism_megatron.launch.checkpoint.layout_free import convert, layout_free_intact


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prism-ckpt", description=(__doc__ or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_command = commands.add_parser("inspect", help="step, layout, config, sizes and integrity")
    inspect_command.add_argument("dir", type=Path)
    convert_command = commands.add_parser("convert", help="write the layout-free form next to the checkpoint")
    convert_command.add_argument("dir", type=Path)
    export_command = commands.add_parser("export", help="consolidated safetensors plus the model config and tokenizer")
    export_command.add_argument("dir", type=Path)
    export_command.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    # DeepSpeed is imported only for the names of its checkpoint records: no accelerator is used.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        if args.command == "inspect":
            sys.exit(0 if inspect_checkpoints(args.dir) else 1)
        path = one_checkpoint(args.dir)
        started = time.perf_counter()
        if args.command == "convert":
            folder = convert(path)
            print(f"wrote {folder} in {time.perf_counter() - started:.1f} s")
        else:
            export(path, args.out)
            print(f"exported {path} to {args.out} in {time.perf_counter() - started:.1f} s "
                  f"(load it with prism_megatron.launch.checkpoint.load_exported, or with transformers' "
                  f"AutoModelForCausalLM after import prism_megatron.hf; prism-generate {args.out} --prompt TEXT)")
    except CheckpointError as e:
        sys.exit(f"prism-ckpt: error: {e}")


def one_checkpoint(folder: Path) -> Path:
    """The checkpoint `folder` is (verified), or the newest intact one in it (a run's checkpoint.dir)."""
    if is_committed(folder):
        verify(folder)
        return folder
    path = newest(folder)
    if path is None:
        raise CheckpointError(f"{folder} holds no checkpoint")
    return path


def inspect_checkpoints(folder: Path) -> bool:
    """Print what each checkpoint under `folder` holds; True if every one is intact."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    paths = step_folders(folder) or [folder]  # a run's checkpoint.dir, or one checkpoint
    intact = True
    for path in paths:
        files = [f for f in path.rglob("*") if f.is_file()]
        print(f"{path}: {sum(f.stat().st_size for f in files) / 2**20:,.1f} MiB in {len(files)} files")
        try:
            verify(path)
            print(f"  intact: every file matches its recorded size and sha256 | step {read_step(path)}")
            print(f"  layout: {read_layout(path)}")
            print("  model: " + ", ".join(f"{k}={v}" for k, v in read_model_config(path).items()))
            free = path / LAYOUT_FREE
            print(f"  layout-free form: {'intact' if layout_free_intact(path) else 'absent'}"
                  + (f" ({free})" if free.exists() else ""))
        except (CheckpointError, OSError) as e:
            intact = False
            print(f"  DAMAGED: {e}")
    return intact


if __name__ == "__main__":
    main()
