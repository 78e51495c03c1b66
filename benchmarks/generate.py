"""Generation speed of a PrismLM preset against fla's GatedDeltaNetForCausalLM, one run on one GPU.

    python benchmarks/generate.py [--config launch/configs/1.3b.yaml] [--set KEY=VALUE ...]
        [--batches 1 32] [--prompts 1024 8192 32768 131072] [--new-tokens 128]
        [--prefill-tokens 65536] [--models prism fla-gdn] [--json FILE] [--profile]

Both models with random weights in bf16, in eval mode, fla's at the width and depth of the preset in
its own head layout (benchmarks/model_step.py's FLA_SHAPES). For each batch size and prompt length,
after an untimed run at the same forward shapes (compilation, autotuning), each model prefills random
prompts in forwards of at most --prefill-tokens tokens (rows of prefill-tokens / batch tokens, each
continuing its cache: ours DecodeCache, fla's its Cache), which gives prefill tokens/s (beside it, one
forward of the first prefill forward's shape without a cache, as a training step's forward runs:
`forward tokens/s`, which prefill should match), then decodes
greedily, a step a token: ours decoding.DecodeStep, as prism-generate decodes (its first step eager, its
second captured as a CUDA graph, then replayed), fla's a forward. After two untimed steps, --new-tokens
steps give the time per token and decode tokens/s, and the peak memory allocated while decoding
(weights, cache, the step's temporaries and our graph's memory).
Every forward computes the logits of its last position only (`logits_to_keep=1`, as transformers'
generate() asks for a prompt): a prefill forward's full logits would otherwise be part of what the
decode peak measures. Both loops are the same few lines for both models: fla's own `generate()` adds
transformers' per-token work (logits processors, stopping criteria) on top, which the row `fla-gdn
generate()` measures once, at the smallest batch and prompt.

The memory a recurrent model needs to decode does not grow with the prompt: the decode peak should be
flat across prompt lengths.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from model_step import FLA_SHAPES  # noqa: E402


class PrismModel:
    """PrismLM of the preset, with a DecodeCache per batch."""

    name = "prism"

    def __init__(self, config: Path, overrides: list[str]):
        from prism_megatron.config import ParallelConfig
        from prism_megatron.launch.config import load_config
        from prism_megatron.model import PrismLM
        from prism_megatron.process_groups import initialize_parallel

        cfg = load_config(config, ["data.stores=[unused]", *overrides])  # a model only: no data
        initialize_parallel(ParallelConfig(), seed=0)
        self.model = PrismLM(cfg.model, ParallelConfig(), seed=0).cuda().bfloat16().eval()
        self.vocab_size = cfg.model.vocab_size
        self.cache = None

    def start(self, batch: int) -> None:
        from prism_megatron.decoding import DecodeCache, DecodeStep

        self.cache = DecodeCache.for_model(self.model, batch)
        self.decode = DecodeStep(self.model, self.cache)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, cache=self.cache, logits_to_keep=1)[:, -1]

    def forward_uncached(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, logits_to_keep=1)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(tokens)


class FlaModel:
    """fla's GatedDeltaNetForCausalLM of the preset's shape, with its Cache per batch."""

    name = "fla-gdn"

    def __init__(self, config: Path, overrides: list[str]):
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

        self.model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**FLA_SHAPES[config.name]))
        self.model = self.model.cuda().bfloat16().eval()
        self.vocab_size = self.model.config.vocab_size
        self.cache = None

    def start(self, batch: int) -> None:
        self.cache = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def forward_uncached(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False, logits_to_keep=1).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward(tokens[:, None])


def timed(run) -> tuple[object, float]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = run()
    torch.cuda.synchronize()
    return result, time.perf_counter() - started


def measure(model, batch: int, prompt: int, new_tokens: int, prefill_tokens: int) -> dict:
    """Prefill `prompt` random tokens in each of `batch` sequences, then decode `new_tokens` greedily."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    chunk = max(1, prefill_tokens // batch)
    model.start(batch)

    def prefill():  # each forward's tokens drawn as it comes: no prompt-sized tensor outlives the prefill
        for start in range(0, prompt, chunk):
            tokens = torch.randint(0, model.vocab_size, (batch, min(chunk, prompt - start)), device="cuda",
                                   generator=gen)
            logits = model.forward(tokens)
        return logits

    def decode(steps: int):
        nonlocal logits
        for _ in range(steps):
            logits = model.step(logits.argmax(-1))

    with torch.no_grad():
        logits, prefill_s = timed(prefill)
        torch.cuda.reset_peak_memory_stats()
        decode(2)  # ours: the eager step and the capture
        _, decode_s = timed(lambda: decode(new_tokens))
        decode_peak = torch.cuda.max_memory_allocated()
        first = torch.randint(0, model.vocab_size, (batch, min(chunk, prompt)), device="cuda", generator=gen)
        _, forward_s = timed(lambda: model.forward_uncached(first))
    return dict(model=model.name, batch=batch, prompt=prompt, prefill_tokens_per_sec=batch * prompt / prefill_s,
                forward_tokens_per_sec=first.numel() / forward_s,
                decode_ms_per_token=1e3 * decode_s / new_tokens, decode_tokens_per_sec=batch * new_tokens / decode_s,
                decode_peak_gb=decode_peak / 1e9)


def profile_decode(model, steps: int = 8) -> dict:
    """`steps` decode steps at batch 1 (after a short prompt) under the torch profiler: their wall time,
    their kernels' CUDA time, and the operators taking the most host time, for where a step goes when
    it is bound by the host's launches rather than the GPU."""
    measure(model, 1, 256, 2, 256)  # the cache is warm, the kernels compiled, ours captured
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        _, wall = timed(lambda: [model.step(token) for _ in range(steps)])
    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    top = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return dict(model=f"{model.name} decode profile", wall_ms_per_token=1e3 * wall / steps,
                kernel_ms_per_token=kernels / 1e3 / steps, launches_per_token=launches / steps,
                top_host_ops=[(e.key, e.count // steps, round(e.self_cpu_time_total / 1e3 / steps, 3)) for e in top])


def profile_prefill(model, tokens: int = 32768, top: int = 12) -> dict:
    """One prefill forward of `tokens` tokens at batch 1 (continuing a fresh cache) and one forward of the
    same tokens without a cache, each under the torch profiler: their kernels' CUDA time and the kernels
    taking the most, for where a prefill differs from the training kernel's forward."""
    prompt = torch.randint(0, model.vocab_size, (1, tokens), device="cuda")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]

    def prefill():
        model.start(1)
        model.forward(prompt)

    kernels = {}
    with torch.no_grad():
        for name, run in (("prefill", prefill), ("forward", lambda: model.forward_uncached(prompt))):
            run()  # compiles, autotunes
            with torch.profiler.profile(activities=activities) as prof:
                timed(run)
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            events.sort(key=lambda e: e.self_device_time_total, reverse=True)
            kernels[name] = dict(ms=sum(e.self_device_time_total for e in events) / 1e3,
                                 top=[(e.key[:80], e.count, round(e.self_device_time_total / 1e3, 3)) for e in events[:top]])
    return dict(model=f"{model.name} prefill profile", tokens=tokens, kernels=kernels)


def fla_generate(model: FlaModel, batch: int, prompt: int, new_tokens: int) -> dict:
    """fla's model through transformers' generate(): greedy, exactly new_tokens tokens."""
    tokens = torch.randint(0, model.vocab_size, (batch, prompt), device="cuda")
    run = lambda: model.model.generate(tokens, max_new_tokens=new_tokens, min_new_tokens=new_tokens,  # noqa: E731
                                       do_sample=False, use_cache=True)
    with torch.no_grad():
        run()  # compiles
        _, seconds = timed(run)
    return dict(model="fla-gdn generate()", batch=batch, prompt=prompt, generate_s=seconds,
                ms_per_token_with_prefill=1e3 * seconds / new_tokens)


def report(row: dict, out: Path | None) -> None:
    if "kernels" in row:
        for name, part in row["kernels"].items():
            print(f"{row['model']:>20} | batch 1 | {row['tokens']} tokens | {name}: kernels {part['ms']:.1f} ms | "
                  "most CUDA time (kernel, calls, ms): " + "; ".join(f"{k} {n} {ms}" for k, n, ms in part["top"]),
                  flush=True)
    elif "top_host_ops" in row:
        print(f"{row['model']:>20} | batch 1 | {row['wall_ms_per_token']:.2f} ms a token, of which kernels "
              f"{row['kernel_ms_per_token']:.2f} ms | {row['launches_per_token']:.0f} kernel launches a token | "
              "most host time a token (op, calls, ms): " + "; ".join(f"{k} {n} {ms}" for k, n, ms in row["top_host_ops"]),
              flush=True)
    elif "generate_s" in row:
        print(f"{row['model']:>20} | batch {row['batch']:>3} | prompt {row['prompt']:>6} | {row['generate_s']:.3f} s "
              f"for the prompt and the new tokens ({row['ms_per_token_with_prefill']:.2f} ms a token)", flush=True)
    else:
        print(f"{row['model']:>20} | batch {row['batch']:>3} | prompt {row['prompt']:>6} | prefill "
              f"{row['prefill_tokens_per_sec']:>10,.0f} tokens/s (forward {row['forward_tokens_per_sec']:,.0f}) | decode {row['decode_ms_per_token']:6.2f} ms a token, "
              f"{row['decode_tokens_per_sec']:>8,.0f} tokens/s | decode peak {row['decode_peak_gb']:.3f} GB", flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "launch/configs/1.3b.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of --config for the PRISM model (repeatable)")
    parser.add_argument("--models", nargs="+", default=["prism", "fla-gdn"], choices=["prism", "fla-gdn"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=65536, help="the most tokens in one prefill forward")
    parser.add_argument("--json", type=Path, help="append one JSON line per row here")
    parser.add_argument("--profile", action="store_true",
                        help="only profile each model's decode step at batch 1 (host time, launches, kernels) "
                             "and its prefill against its forward without a cache (kernels)")
    args = parser.parse_args()
    if "fla-gdn" in args.models and args.config.name not in FLA_SHAPES:
        parser.error(f"fla's model has no shape for {args.config.name}: add one to benchmarks/model_step.py's FLA_SHAPES")
    print(f"{torch.cuda.get_device_name()} | {args.config.name} {' '.join(args.set)} | "
          f"{args.new_tokens} new tokens | prefill forwards of at most {args.prefill_tokens} tokens", flush=True)
    for kind in (PrismModel, FlaModel):
        if kind.name not in args.models:
            continue
        model = kind(args.config, args.set)
        if args.profile:
            report(profile_decode(model), args.json)
            report(profile_prefill(model), args.json)
            del model
            continue
        for batch in args.batches:
            for prompt in args.prompts:
                # Compiles and autotunes for this batch's decode step and this prompt's prefill forwards
                # (all of one shape: prompt and chunk are powers of two), outside the timed run.
                measure(model, batch, min(prompt, max(1, args.prefill_tokens // batch)), 2, args.prefill_tokens)
                report(measure(model, batch, prompt, args.new_tokens, args.prefill_tokens), args.json)
        if kind is FlaModel:
            report(fla_generate(model, min(args.batches), min(args.prompts), args.new_tokens), args.json)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
