"""Export: the model alone, for use anywhere (no DeepSpeed, any TP size), also as a transformers model.

    OUT/model.safetensors        every parameter's global tensor (the module weights, in the run's dtype)
    OUT/config.json              the model config ("model") and the step; for transformers, the model type,
                                 architecture and special token ids (prism_megatron.hf.PrismConfig reads it)
    OUT/tokenizer.model          the run's sentencepiece tokenizer (its token stores' manifest names it)
    OUT/tokenizer_config.json    the tokenizer class for transformers' AutoTokenizer
    OUT/prism_hf.py              what trust_remote_code=True loads: the installed prism_megatron.hf

Writing the folder needs no transformers; loading it as a transformers model does (the `hf` extra).
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
EXPORT_TOKENIZER_CONFIG = "tokenizer_config.json"
# A process that has not imported prism_megatron.hf (which registers the classes with transformers' Auto
# classes) reaches them through this module of the folder, with trust_remote_code=True.
REMOTE_CODE_MODULE = "prism_hf"
# How a run computed, not what: an export takes ModelConfig's defaults for these, which pick the fast path
# on whatever device loads it (a model trained on the CPU with kernel_backend "torch" prefills with the
# Triton kernels on a GPU).
HOW_IT_RAN = ("kernel_backend", "recompute", "fused_ops")
REMOTE_CODE = ('"""transformers\' trust_remote_code entry point: the classes of the installed prism-megatron '
               '(pip install \'prism-megatron[hf]\')."""\n'
               "from prism_megatron.hf import PrismConfig, PrismForCausalLM, PrismTokenizer  # noqa: F401\n")


def export(path: Path, out: Path) -> Path:
    """Write the export folder (the module docstring's files) of the checkpoint at `path`."""
    tokenizer = tokenizer_of(path)
    weights, step = global_weights(path)
    return write_export(out, weights, read_model_config(path), step, tokenizer)


def write_export(out: Path, weights: dict, model: dict, step: int, tokenizer: Path) -> Path:
    """Write the export folder of the global `weights` of a model of config `model` (ModelConfig's
    fields) at `step`, with the sentencepiece model `tokenizer`."""
    from safetensors.torch import save_file

    from prism_megatron.config import ModelConfig
    from prism_megatron.data_prep.tokenizer import Tokenizer

    model = {**model, **{name: ModelConfig.__dataclass_fields__[name].default for name in HOW_IT_RAN}}
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in weights.items()}, str(out / EXPORT_WEIGHTS),
              metadata={"step": str(step)})
    shutil.copyfile(tokenizer, out / EXPORT_TOKENIZER)
    pieces = Tokenizer(tokenizer)
    special_ids = {f"{name}_token_id": i for name, i in (("bos", pieces.bos_id), ("eos", pieces.eos_id),
                                                        ("pad", pieces.pad_id)) if i >= 0}
    write_atomic(out / f"{REMOTE_CODE_MODULE}.py", REMOTE_CODE)
    write_atomic(out / EXPORT_TOKENIZER_CONFIG, json.dumps({
        "tokenizer_class": "PrismTokenizer",
        "auto_map": {"AutoTokenizer": [f"{REMOTE_CODE_MODULE}.PrismTokenizer", None]}}, indent=1))
    write_atomic(out / EXPORT_CONFIG, json.dumps({
        "model_type": "prism", "architectures": ["PrismForCausalLM"],
        "auto_map": {"AutoConfig": f"{REMOTE_CODE_MODULE}.PrismConfig",
                     "AutoModelForCausalLM": f"{REMOTE_CODE_MODULE}.PrismForCausalLM"},
        "model": model, "step": step, **special_ids}, indent=1))
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

    # The weights drawn at construction are all replaced: any seed does, and none is taken from the global RNG.
    model = PrismLM(config, parallel or ParallelConfig(), seed=0)
    load_global_state_dict(model, weights)
    return model


def load_exported(folder: str | Path, parallel=None):
    """PrismLM with the weights of an exported folder (`prism-ckpt export`), at the TP size of
    `parallel` (a ParallelConfig; default TP=1). Call after `process_groups.initialize_parallel`;
    every TP rank reads the whole file and keeps its slice."""
    from prism_megatron.config import ModelConfig

    record = exported_record(folder)
    try:
        config = ModelConfig(**record["model"])
    except TypeError as e:
        raise CheckpointError(f"{folder} is not an exported model ({EXPORT_CONFIG}: {e})") from None
    return model_with_weights(config, exported_weights(folder), parallel)


def load_checkpointed(path: Path, parallel=None):
    """(PrismLM with the weights of the checkpoint at `path`, of any layout, at the TP size of `parallel`;
    the checkpoint's step). Call after `process_groups.initialize_parallel`."""
    from prism_megatron.config import ModelConfig

    weights, step = global_weights(path)
    return model_with_weights(ModelConfig(**read_model_config(path)), weights, parallel), step


def exported_record(folder: str | Path) -> dict:
    """An exported folder's config.json: the model config ("model") and the step it was exported at."""
    path = Path(folder) / EXPORT_CONFIG
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("model"), dict):
            raise ValueError('no "model" section')
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{folder} is not an exported model ({path}: {e})") from None
    return record


def exported_weights(folder: str | Path) -> dict:
    """An exported folder's global weights, by parameter name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / EXPORT_WEIGHTS
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot read the exported weights ({e})") from None
