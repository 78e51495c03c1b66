"""Checkpoints: DeepSpeed's files plus what DeepSpeed leaves out, committed only once complete,
opened without running code, and resumable at any tensor x data-parallel layout.

`format` knows the files on disk and reads them; `commit` saves; `resume` loads into a training
engine (through `layout_free` at another layout, made from `deepspeed_files`); `safe_load` opens
files without running their code; `rng` carries the RNG states; `export` writes the model alone.
"""
from prism_megatron.launch.checkpoint.commit import TrainState, save
from prism_megatron.launch.checkpoint.export import exported_record, exported_weights, load_exported
from prism_megatron.launch.checkpoint.format import CheckpointError, committed, newest
from prism_megatron.launch.checkpoint.resume import load

__all__ = ["CheckpointError", "TrainState", "committed", "exported_record", "exported_weights", "load", "load_exported",
           "newest", "save"]
