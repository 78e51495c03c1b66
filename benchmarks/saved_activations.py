"""What one layer of a preset keeps for the backward, per token, by module and tensor: a count of the
unique storages that autograd saves (parameters left out), on the CPU. Peak activation memory on a
GPU is about this times the tokens a step and the layers, so a change to what the model saves can be
weighed here, without a GPU. Run with TRITON_INTERPRET=1 and --set model.kernel_backend=triton to
count what the Triton op saves (its torch backend saves other things); model.fused_ops=on counts what
the compiled glue saves.

    python benchmarks/saved_activations.py [--config launch/configs/1.3b.yaml] [--tokens 128] [--set KEY=VALUE ...]

The model runs at TP = CP = 1 with 2 layers in bf16; the second layer is counted (the first also holds
what the embedding hands it). One sample of --tokens tokens, packed as two documents. Each row is one
storage: the shape is that of the first tensor saved from it (a view, maybe), the bytes the whole
storage's. Per-chunk tensors (the recurrence's states, one per 64 tokens and one more) weigh more a
token at few tokens than at a step's.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def saved_per_token(config: Path, overrides: list[str], tokens: int) -> dict[str, list[tuple[tuple, str, float]]]:
    """{module name within the layer: [(shape, dtype, bytes a token), ...]} of layer 1's saved storages."""
    from prism_megatron.launch.config import load_config
    from prism_megatron.model import PrismLM
    from prism_megatron.process_groups import destroy_parallel, initialize_parallel

    cfg = load_config(config, ["data.stores=[unused]", "parallel.tensor_model_parallel_size=1",
                               "parallel.sequence_parallel=false", "parallel.context_parallel_size=1",
                               "model.num_layers=2", *overrides])
    initialize_parallel(cfg.parallel, cfg.training.seed)
    try:
        model = PrismLM(cfg.model, cfg.parallel).to(torch.bfloat16)
        names = {module: name for name, module in model.named_modules()}
        active: list[str] = []  # the modules whose forward is running, innermost last

        def enter(module, _inputs) -> None:
            active.append(names[module])

        def leave(module, _inputs, _output) -> None:
            active.pop()

        for module in names:
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, tuple[str, tuple, str, int]] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in parameters and storage.data_ptr() not in seen:
                seen[storage.data_ptr()] = (active[-1], tuple(t.shape), str(t.dtype).removeprefix("torch."),
                                            storage.nbytes())
            return t

        sample = torch.randint(0, cfg.model.vocab_size, (1, tokens))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(sample, sample, cu_seqlens=torch.tensor([0, tokens // 3, tokens]))
    finally:
        destroy_parallel()
    per_module: dict[str, list[tuple[tuple, str, float]]] = collections.defaultdict(list)
    for where, shape, dtype, nbytes in seen.values():
        if where == "layers.1" or where.startswith("layers.1."):
            per_module[where.removeprefix("layers.1").lstrip(".") or "(block)"].append((shape, dtype, nbytes / tokens))
    return per_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "launch/configs/1.3b.yaml")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    from prism_megatron.launch.config import ConfigError

    try:
        per_module = saved_per_token(args.config, args.set, args.tokens)
    except ConfigError as e:  # a bad --config or --set: one line, naming the file or key
        sys.exit(f"saved_activations: error: {e}")
    total = sum(b for rows in per_module.values() for *_, b in rows)
    print(f"{args.config.name} {' '.join(args.set)}: one layer keeps {total / 1024:.1f} KiB a token")
    for module, rows in sorted(per_module.items(), key=lambda kv: -sum(r[2] for r in kv[1])):
        print(f"  {module:24s} {sum(r[2] for r in rows) / 1024:8.2f} KiB")
        for shape, dtype, per_token in sorted(rows, key=lambda r: -r[2]):
            print(f"      {str(list(shape)):26s} {dtype:9s} {per_token / 1024:8.2f} KiB")


if __name__ == "__main__":
    main()
