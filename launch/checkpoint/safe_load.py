"""Loading checkpoint files without running code from them.

Every file is opened with `torch.load(weights_only=True)` (DeepSpeed's engine gets
`safe_checkpoint_engine()`), allowing only three of DeepSpeed's own plain record classes; the RNG
states travel as tensors and lists of ints. A file holding any other object is refused, never executed.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from prism_megatron.launch.checkpoint.format import CheckpointError


def _allowed_classes() -> list:
    # DeepSpeed's plain records inside its optimizer files: restored as data, none runs code.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location=None):
    """torch.load that runs no code from the file: tensors, plain data and DeepSpeed's records only."""
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, refused "
                              f"(loading it could run code): {str(e).splitlines()[0]}") from None
    except Exception as e:
        raise CheckpointError(f"{path} cannot be loaded: {type(e).__name__}: {e}") from None


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading through `safe_load` (built here, not at import,
    so that importing this module does not import DeepSpeed before its accelerator is chosen)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return SafeCheckpointEngine(None)
