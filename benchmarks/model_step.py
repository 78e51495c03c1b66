"""Training-step throughput of the 1.3B PrismLM against fla's GatedDeltaNetForCausalLM, one process.

    python benchmarks/model_step.py --store DIR | --build-store WORKDIR  [--steps 6] [--profile]

Each PRISM variant runs as prism-train runs it: PrismLM under a DeepSpeed engine (bf16, ZeRO-1, our
AdamW instance), batches of 4 x 4096 tokens from the real loader (DistributedBatchLoader with
cu_seqlens) on a token store made by prism-prep (--build-store: from this machine's Python standard
library sources, one document per file). fla's model runs at its default config with its defaults
(bf16 autocast over float32 weights, fused AdamW), on the same batches' tokens. Prints per variant
tokens/s over the timed steps (after --warmup steps that compile), MFU from 6N FLOPs a token (N: the
parameters without the input embedding) against the H200's 989 TFLOP/s dense bf16, and peak memory;
with --profile the top CUDA kernels of one step. Results also go to --json.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 989e12  # H200 dense bf16 (spec sheet)
TOKENS = (4, 4096)
CORPUS_BYTES = 20_000_000
VARIANTS = {  # name -> --set overrides of launch/configs/1.3b.yaml
    "prism-L3": [],
    "prism-L3-selective": ["model.recompute=selective"],
    "prism-L3-full": ["model.recompute=full"],
    "prism-L1": ["model.solver_steps=1"],
    "solver-none": ["model.solver=none"],
}


def build_store(workdir: Path) -> Path:
    """A token store of the standard library's .py files (the first CORPUS_BYTES of them, far more than
    the steps read) through prism-prep (tokenizer, tokenize)."""
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "stdlib.jsonl"
    with corpus.open("w") as out:
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            text = path.read_text(errors="replace")
            if text.strip() and out.tell() < CORPUS_BYTES:
                out.write(json.dumps({"text": text}) + "\n")
    prep = [sys.executable, "-m", "prism_megatron.data_prep.cli"]
    subprocess.run(prep + ["tokenizer", str(corpus), "--output", str(workdir / "sp.model"), "--vocab-size", "8192",
                           "--sample-lines", "300000"], check=True)
    subprocess.run(prep + ["tokenize", str(corpus), "--tokenizer", str(workdir / "sp.model"),
                           "--output", str(workdir / "store")], check=True)
    return workdir / "store"


def batches(store: Path, steps: int):
    from prism_megatron.data_prep.loader import DistributedBatchLoader, PackedDataset

    data = PackedDataset([str(store)], None, TOKENS[1], 1234, steps * TOKENS[0], split="train")
    return iter(DistributedBatchLoader(data, TOKENS[0], 0, 1, with_cu_seqlens=True))


def cuda_profile(step) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)


def measure(step, n_params: int, warmup: int, steps: int, profile: bool) -> dict:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    tokens_per_sec = steps * TOKENS[0] * TOKENS[1] / (time.perf_counter() - started)
    result = dict(tokens_per_sec=tokens_per_sec, mfu_6n=6 * n_params * tokens_per_sec / PEAK_FLOPS,
                  peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9, parameters=n_params)
    if profile:
        result["profile"] = cuda_profile(step)
    return result


def run_prism(overrides: list[str], store: Path, warmup: int, steps: int, profile: bool) -> dict:
    import deepspeed

    from prism_megatron.launch.config import load_config
    from prism_megatron.launch.train import forward, weight_decay_groups
    from prism_megatron.model import PrismLM
    from prism_megatron.process_groups import deepspeed_mpu, destroy_parallel, initialize_parallel

    cfg = load_config(ROOT / "launch/configs/1.3b.yaml", [f"data.stores=[{store}]", *overrides])
    initialize_parallel(cfg.parallel, cfg.training.seed)
    model = PrismLM(cfg.model, cfg.parallel)
    n_params = model.num_parameters() - model.embedding.weight.numel() * (not cfg.model.tie_embeddings)
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=True)
    # The engine config prism-train builds (launch/train.py), at one micro-batch a step.
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=deepspeed_mpu(), config={
        "train_batch_size": TOKENS[0], "train_micro_batch_size_per_gpu": TOKENS[0],
        "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
        "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 62})
    data = batches(store, warmup + steps + 2)

    def step():
        loss = forward(engine, next(data))
        engine.backward(loss)
        engine.step()

    try:
        return measure(step, n_params, warmup, steps, profile)
    finally:
        del engine, model, optimizer
        destroy_parallel()


def run_fla(store: Path, warmup: int, steps: int, profile: bool) -> dict:
    import fla.ops.common.chunk_o as fla_chunk_o
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    # fla refuses its gated backward on Triton 3.4-3.7.0 on Hopper (fla #640, a miscompile of its
    # dq/dk/dg kernel); the baseline is timed with that guard lifted, its gradients not trusted.
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True

    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig()).cuda()
    n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    data = batches(store, warmup + steps + 2)

    def step():
        tokens = next(data)["tokens"].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return measure(step, n_params, warmup, steps, profile)
    finally:
        del model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", type=Path, help="a token store made by prism-prep tokenize")
    source.add_argument("--build-store", type=Path, metavar="WORKDIR", help="build one here from the stdlib")
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, "fla-gdn"], choices=[*VARIANTS, "fla-gdn"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, help="append one JSON line per variant here")
    args = parser.parse_args()
    store = args.store or build_store(args.build_store)
    print(f"{torch.cuda.get_device_name()} | {TOKENS[0]} x {TOKENS[1]} tokens a step", flush=True)
    for name in args.variants:
        started = time.perf_counter()
        try:
            if name == "fla-gdn":
                result = run_fla(store, args.warmup, args.steps, args.profile)
            else:
                result = run_prism(VARIANTS[name], store, args.warmup, args.steps, args.profile)
        except Exception:  # one variant's failure (OOM, a compile error) must not lose the others'
            result = dict(error=traceback.format_exc(limit=4))
        result = dict(variant=name, wall_s=round(time.perf_counter() - started, 1), **result)
        gc.collect()
        torch.cuda.empty_cache()
        if "error" in result:
            print(f"{name}: FAILED\n{result['error']}", flush=True)
        else:
            print(f"{name}: {result['tokens_per_sec']:,.0f} tokens/s | MFU(6N) {100 * result['mfu_6n']:.1f}% | "
                  f"peak {result['peak_memory_gb']:.1f} GB | {result['parameters'] / 1e9:.2f}B params | "
                  f"{result['wall_s']} s", flush=True)
            if args.profile:
                print(result["profile"], flush=True)
        if args.json:
            with args.json.open("a") as out:
                out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
