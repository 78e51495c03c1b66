"""Export: the model alone, for use anywhere (no DeepSpeed, any TP size).

    OUT/model.safetensors   every parameter's global tensor (the module weights, in the run's dtype)
    OUT/config.json         the model config and the step
    OUT/tokenizer.model     the run's sentencepiece tokenizer (its token stores' manifest names it)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from prism_megatron.files import write_atomic
from prism_megatron.launch.checkpoint.format import CheckpointError, read_model_config, read_run_config
from prism_megatron.launch.checkpoint.layout_free import global_weights

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_TOKENIZER = "tokenizer.model"


def export(path: Path, out: Path) -> Path:
    """Write `out/model.safetensors`, `out/config.json` and `out/tokenizer.model` from the checkpoint at `path`."""
    from safetensors.torch import save_file

    tokenizer = tokenizer_of(path)
    weights, step = global_weights(path)
    model = read_model_config(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in weights.items()}, str(out / EXPORT_WEIGHTS),
              metadata={"step": str(step)})
    shutil.copyfile(tokenizer, out / EXPORT_TOKENIZER)
    write_atomic(out / EXPORT_CONFIG, json.dumps({"model": model, "step": step}, indent=1))
    return out


def tokenizer_of(path: Path) -> Path:
    """The sentencepiece model of the checkpoint at `path`: the one its run's first token store was
    made with (stores of one run share a tokenizer), checked against the store's record of it."""
    from prism_megatron.data_prep.store import TokenStore, TokenStoreError
    from prism_megatron.data_prep.tokenizer import file_sha256

    stores = read_run_config(path).get("data", {}).get("stores") or []
    if not stores:
        raise CheckpointError(f"checkpoint {path}: its run config names no token store, so no tokenizer")
    try:
        identity = TokenStore.open(stores[0]).manifest["tokenizer"]
    except (OSError, TokenStoreError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read the tokenizer's record in its token store ({e})") from None
    tokenizer = Path(identity.get("path", ""))
    if not tokenizer.is_file() or file_sha256(str(tokenizer)) != identity["sha256"]:
        raise CheckpointError(f"checkpoint {path}: the tokenizer {tokenizer} that store {stores[0]} was made "
                              "with is missing or has changed")
    return tokenizer


def model_with_weights(config, weights: dict, parallel=None):
    """PrismLM of the ModelConfig `config` holding the global `weights`, at the TP size of `parallel`
    (a ParallelConfig; default TP=1). Call after `process_groups.initialize_parallel`."""
    from prism_megatron.config import ParallelConfig
    from prism_megatron.model import PrismLM
    from prism_megatron.sharding import load_global_state_dict

    model = PrismLM(config, parallel or ParallelConfig())
    load_global_state_dict(model, weights)
    return model


def load_exported(folder: str | Path, parallel=None):
    """PrismLM with the weights of an exported folder (`prism-ckpt export`), at the TP size of
    `parallel` (a ParallelConfig; default TP=1). Call after `process_groups.initialize_parallel`;
    every TP rank reads the whole file and keeps its slice."""
    from safetensors.torch import load_file

    from prism_megatron.config import ModelConfig

    folder = Path(folder)
    try:
        config = ModelConfig(**json.loads((folder / EXPORT_CONFIG).read_text())["model"])
        weights = load_file(str(folder / EXPORT_WEIGHTS))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder} is not an exported model ({type(e).__name__}: {e})") from None
    return model_with_weights(config, weights, parallel)
