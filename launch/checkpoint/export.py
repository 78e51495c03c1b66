"""Export: the model alone, for use anywhere (no DeepSpeed, any TP size).

    OUT/model.safetensors   every parameter's global tensor (the module weights, in the run's dtype)
    OUT/config.json         the model config and the step
"""
from __future__ import annotations

import json
from pathlib import Path

from prism_megatron.files import write_atomic
from prism_megatron.launch.checkpoint.format import CheckpointError, read_model_config
from prism_megatron.launch.checkpoint.layout_free import global_weights

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


def export(path: Path, out: Path) -> Path:
    """Write `out/model.safetensors` and `out/config.json` from the checkpoint at `path`."""
    from safetensors.torch import save_file

    weights, step = global_weights(path)
    model = read_model_config(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in weights.items()}, str(out / EXPORT_WEIGHTS),
              metadata={"step": str(step)})
    write_atomic(out / EXPORT_CONFIG, json.dumps({"model": model, "step": step}, indent=1))
    return out


def load_exported(folder: str | Path, parallel=None):
    """PrismLM with the weights of an exported folder (`prism-ckpt export`), at the TP size of
    `parallel` (a ParallelConfig; default TP=1). Call after `parallel.initialize_parallel`;
    every TP rank reads the whole file and keeps its slice."""
    from safetensors.torch import load_file

    from prism_megatron.config import ModelConfig, ParallelConfig
    from prism_megatron.model import PrismLM
    from prism_megatron.sharding import load_global_state_dict

    folder = Path(folder)
    try:
        config = ModelConfig(**json.loads((folder / EXPORT_CONFIG).read_text())["model"])
        weights = load_file(str(folder / EXPORT_WEIGHTS))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder} is not an exported model ({type(e).__name__}: {e})") from None
    model = PrismLM(config, parallel or ParallelConfig())
    load_global_state_dict(model, weights)
    return model
