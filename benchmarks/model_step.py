"""Training-step throughput of a PrismLM preset against fla's GatedDeltaNetForCausalLM, one run.

    python benchmarks/model_step.py --store DIR | --build-store WORKDIR  [--steps 6] [--profile]
        [--config launch/configs/1.3b.yaml] [--set KEY=VALUE ...] [--variants NAME ...] [--batch 4 4096]

Each PRISM variant (the preset of --config, 1.3B by default, with --set's overrides and then the
variant's: a model, PRISM L=3, L=2 or L=1, `solver: none` or L=3 with fused_ops off, in a recompute
mode, e.g. prism-L1-selective, unsuffixed for none) runs as prism-train runs it: PrismLM under a
DeepSpeed engine (bf16, ZeRO-1, our AdamW instance), batches of --batch tokens (4 x 4096) from the real
loader (DistributedBatchLoader with cu_seqlens) on a token store made by prism-prep (--build-store: from
this machine's Python standard library sources, one document per file). fla's model runs at the width
and depth of the preset in its own head layout (FLA_SHAPES; its default config for the 1.3B preset) with
its defaults (bf16 autocast over float32 weights, fused AdamW), on the same batches' tokens. Prints per
variant tokens/s over the timed steps (after --warmup steps that compile; each step's time is also
printed), MFU against the device's dense bf16 peak (prism_megatron.flops: 989 TFLOP/s on an H100 or H200
SXM, or PRISM_PEAK_FLOPS) from prism_megatron.flops' exact FLOP count and from 6N FLOPs a token (N: the
parameters without the input embedding; fla's model has 6N only), and peak memory; with --profile the
time of one step's forward, backward and optimizer step, and its top CUDA kernels and operators (by
device and by host time). Each variant runs in a process of its own (one after another), so that its
peak memory is its own and one variant's failure loses no other's. Results also go to --json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS_BYTES = 20_000_000
MODELS = {  # name -> overrides of the --config preset
    "prism-L3": ["model.solver=prism", "model.solver_steps=3"],
    "prism-L2": ["model.solver=prism", "model.solver_steps=2"],
    "prism-L1": ["model.solver=prism", "model.solver_steps=1"],
    "solver-none": ["model.solver=none"],
    # The same model with the PyTorch code the fused kernels replace (what fusing bought).
    "prism-L3-reference": ["model.solver=prism", "model.solver_steps=3", "model.fused_ops=off"],
}
# Each model in each recompute mode: prism-L3 (none), prism-L3-selective, prism-L3-full, ...
VARIANTS = {name + ("" if mode == "none" else f"-{mode}"): [*overrides, f"model.recompute={mode}"]
            for name, overrides in MODELS.items() for mode in ("none", "selective", "full")}
# fla's GatedDeltaNetConfig for each preset (by file name): the same width, depth, vocabulary and
# embedding tying, in fla's head layout (heads of 256, values twice as wide).
FLA_SHAPES = {"1.3b.yaml": {},
              "125m.yaml": dict(hidden_size=768, num_hidden_layers=12, num_heads=3, head_dim=256,
                                tie_word_embeddings=True)}


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


def batches(store: Path, steps: int, shape: tuple[int, int]):
    from prism_megatron.data_prep.loader import DistributedBatchLoader, PackedDataset

    data = PackedDataset([str(store)], None, shape[1], 1234, steps * shape[0], split="train")
    return iter(DistributedBatchLoader(data, shape[0], 0, 1, with_cu_seqlens=True))


def profile_step(phases) -> dict:
    """One step, phase by phase (synchronised between phases), then one step under the profiler:
    seconds per phase, the CUDA time in kernels against the step's wall time (a GPU that waits on
    the host shows kernel time well under wall time), the top kernels, the operators that take the
    most host time, and the top operators by their input shapes (which say where a copy or an
    elementwise kernel comes from)."""
    times = {}
    for name, run in phases:
        torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times[name] = round(time.perf_counter() - started, 4)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        started = time.perf_counter()
        for _, run in phases:
            run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    cuda_total = sum(e.self_device_time_total for e in kernels) / 1e6
    # The optimizer step alone, by host time: a step that launches a kernel or two per parameter, or
    # waits on the GPU, shows here.
    *before_step, (_, optimizer_step) = phases
    for _, run in before_step:
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as step_prof:
        optimizer_step()
        torch.cuda.synchronize()
    return dict(phase_seconds=times, profiled_wall_s=round(wall, 4), cuda_kernel_s=round(cuda_total, 4),
                kernel_launches=sum(e.count for e in kernels),
                step_operators=step_prof.key_averages().table(sort_by="cpu_time_total", row_limit=20,
                                                              max_name_column_width=50),
                kernels=events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90),
                host_operators=events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90),
                operators=prof.key_averages(group_by_input_shape=True).table(
                    sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=40,
                    max_shapes_column_width=70))


def measure(phases, flops_per_token: dict[str, float], tokens_per_step: int, warmup: int, steps: int,
            profile: bool) -> dict:
    """phases: (name, function) of one training step in order: forward, backward, optimizer step;
    flops_per_token: FLOP counts by name ("exact", "6n"), each reported as mfu_<name>."""
    from prism_megatron.flops import mfu, peak_flops

    def step():
        for _, run in phases:
            run()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    # Each step timed to its end: a step that compiles or waits on the host shows as an outlier
    # against the others, where a mean over the steps would hide it.
    step_seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        step_seconds.append(round(time.perf_counter() - started, 4))
    tokens_per_sec = steps * tokens_per_step / sum(step_seconds)
    result = dict(tokens_per_sec=tokens_per_sec, step_seconds=step_seconds,
                  peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9)
    peak = peak_flops()
    if peak is not None:
        result.update({f"mfu_{name}": mfu(count, tokens_per_sec, 1, peak) for name, count in flops_per_token.items()})
    if profile:
        result.update(profile_step(phases))
    return result


def run_prism(config: Path, overrides: list[str], store: Path, shape: tuple[int, int], warmup: int, steps: int,
              profile: bool) -> dict:
    from prism_megatron.flops import non_embedding_parameters, step_flops
    from prism_megatron.launch.config import load_config
    from prism_megatron.launch.engine import build_engine, forward
    from prism_megatron.model import PrismLM
    from prism_megatron.process_groups import destroy_parallel, initialize_parallel

    # One micro-batch a step, through the engine prism-train builds.
    batch = [f"training.micro_batch_size={shape[0]}", f"training.global_batch_size={shape[0]}",
             f"data.seq_length={shape[1]}", "training.precision=bf16"]
    cfg = load_config(config, [f"data.stores=[{store}]", *batch, *overrides])
    initialize_parallel(cfg.parallel, cfg.training.seed)
    model = PrismLM(cfg.model, cfg.parallel)
    flops = step_flops(cfg.model, shape[1])
    engine, _ = build_engine(cfg, model)
    data = batches(store, warmup + steps + 3, shape)  # + the profiled steps (profile_step runs 3)

    loss = None

    def phase_forward():
        nonlocal loss
        loss = forward(engine, next(data))

    phases = [("forward", phase_forward), ("backward", lambda: engine.backward(loss)), ("step", engine.step)]
    try:
        result = measure(phases, {"exact": flops.total, "6n": flops.six_n}, shape[0] * shape[1], warmup, steps,
                         profile)
        return dict(result, parameters=non_embedding_parameters(cfg.model))
    finally:
        destroy_parallel()


def run_fla(shape_of: dict, store: Path, shape: tuple[int, int], warmup: int, steps: int, profile: bool) -> dict:
    import fla.ops.common.chunk_o as fla_chunk_o
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    # fla refuses its gated backward on Triton 3.4-3.7.0 on Hopper (fla #640, a miscompile of its
    # dq/dk/dg kernel); the baseline is timed with that guard lifted, its gradients not trusted.
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True

    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**shape_of)).cuda()
    n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    data = batches(store, warmup + steps + 3, shape)  # + the profiled steps (profile_step runs 3)

    loss = None

    def phase_forward():
        nonlocal loss
        tokens = next(data)["tokens"].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss

    def phase_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    phases = [("forward", phase_forward), ("backward", lambda: loss.backward()), ("step", phase_step)]
    return dict(measure(phases, {"6n": 6 * n_params}, shape[0] * shape[1], warmup, steps, profile),
                parameters=n_params)


def run_variant(name: str, args: argparse.Namespace, store: Path) -> dict:
    shape, warmup, steps, profile = tuple(args.batch), args.warmup, args.steps, args.profile
    started = time.perf_counter()
    try:
        if name == "fla-gdn":
            result = run_fla(FLA_SHAPES[args.config.name], store, shape, warmup, steps, profile)
        else:
            result = run_prism(args.config, [*args.set, *VARIANTS[name]], store, shape, warmup, steps, profile)
    except Exception:  # reported as this variant's row (OOM, a compile error)
        result = dict(error=traceback.format_exc(limit=6))
    preset = dict(config=args.config.name) if name == "fla-gdn" else dict(config=args.config.name, overrides=args.set)
    return dict(variant=name, batch=shape, wall_s=round(time.perf_counter() - started, 1), **preset, **result)


def report(result: dict, profile: bool) -> None:
    name = result["variant"]
    if "error" in result:
        print(f"{name}: FAILED\n{result['error']}", flush=True)
        return
    mfus = " | ".join(f"MFU({label}) {100 * result[key]:.1f}%"
                      for key, label in (("mfu_exact", "exact"), ("mfu_6n", "6N")) if key in result)
    print(f"{name}: {result['tokens_per_sec']:,.0f} tokens/s | {mfus or 'no MFU (peak FLOP/s unknown)'} | "
          f"peak {result['peak_memory_gb']:.1f} GB | N {result['parameters'] / 1e9:.2f}B | "
          f"{result['wall_s']} s", flush=True)
    print(f"  steps (s): {result['step_seconds']}", flush=True)
    if profile:
        print(f"  phases (s): {result['phase_seconds']} | profiled step {result['profiled_wall_s']} s, "
              f"CUDA kernels {result['cuda_kernel_s']} s in {result['kernel_launches']} launches", flush=True)
        print(result["kernels"], flush=True)
        print(result["host_operators"], flush=True)
        print(result["operators"], flush=True)
        print(result["step_operators"], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", type=Path, help="a token store made by prism-prep tokenize")
    source.add_argument("--build-store", type=Path, metavar="WORKDIR", help="build one here from the stdlib")
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, "fla-gdn"], choices=[*VARIANTS, "fla-gdn"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for each variant's process")
    parser.add_argument("--config", type=Path, default=ROOT / "launch/configs/1.3b.yaml",
                        help="the preset the PRISM variants start from")
    parser.add_argument("--batch", type=int, nargs=2, default=[4, 4096], metavar=("SEQUENCES", "LENGTH"),
                        help="tokens a step, for every variant")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of --config for every PRISM variant (repeatable)")
    parser.add_argument("--json", type=Path, help="append one JSON line per variant here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one variant, result on stdout
    args = parser.parse_args()
    if args.config.name not in FLA_SHAPES and "fla-gdn" in args.variants:
        parser.error(f"fla's model has no shape for {args.config.name}: add one to FLA_SHAPES")
    store = args.store or build_store(args.build_store)
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.variants[0], args, store)))
        return
    print(f"{torch.cuda.get_device_name()} | {args.batch[0]} x {args.batch[1]} tokens a step", flush=True)
    for name in args.variants:
        command = [sys.executable, __file__, "--child", "--store", str(store), "--variants", name,
                   "--config", str(args.config), *(f"--set={item}" for item in args.set),
                   "--batch", *map(str, args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps)] + ["--profile"] * args.profile
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            sys.stderr.write(done.stderr)  # the variant's warnings (TORCH_LOGS=recompiles, for one) in the log
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            result = (json.loads(lines[-1][len("RESULT "):]) if lines else
                      dict(variant=name, error=f"exit {done.returncode}: {(done.stdout + done.stderr)[-3000:]}"))
        except subprocess.TimeoutExpired:
            result = dict(variant=name, error=f"no result within --timeout {args.timeout} s")
        report(result, args.profile)
        if args.json:
            with args.json.open("a") as out:
                out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
