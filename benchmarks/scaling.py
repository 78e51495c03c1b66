"""Scaling harness: PRISM's recurrence, one block and the whole training step over the TP x CP x DP
layouts of this world size, in weak and strong scaling.

    torchrun --nproc-per-node N benchmarks/scaling.py OUT [--cases kernel layer model]
        [--layouts tp1 tp2sp cp2 tp2cp2sp ...] [--scaling weak strong] [--seq-lengths 32768 65536 ...]
        [--recompute none selective full] [--config launch/configs/1.3b.yaml] [--set KEY=VALUE ...]
        [--warmup 2] [--steps 5]

A bare `python benchmarks/scaling.py OUT ...` is one rank (gloo on the CPU, NCCL on a GPU). A layout
names its TP and CP sizes (`tp2cp2`; a size left out is 1) and `sp` for sequence parallelism; DP is
the world size over TP x CP. Without --layouts every TP x CP that divides the world size runs, with
SP wherever TP > 1. For each T of --seq-lengths (default: the config's data.seq_length):
- weak scaling keeps every GPU's share at T tokens: each DP rank takes one sample of T x TP x CP
  tokens, which CP splits along the sequence and TP by heads and MLP width;
- strong scaling keeps the step at T tokens: DP samples of T / DP tokens each.
On one GPU both are one sample of T tokens.

Cases, the model's shape, precision, kernel backend and ZeRO stage from --config and --set:
- kernel: prism_recurrence forward and backward on this rank's heads (H / TP) and tokens (one
  sample / CP), as the model's token layout runs it: under CP context_parallel_recurrence, with its
  summary exchange;
- layer: one Block (norms, mixer, MLP) forward and backward, TP/SP/CP collectives included, for each
  --recompute mode (full: the block under activation checkpointing, as PrismLM runs it);
- model: a training step of PrismLM (forward, backward, optimizer) through the DeepSpeed engine
  prism-train builds (launch.engine.build_engine), one sample a DP rank, for each --recompute mode.
Kernel and layer DP ranks work alone (no gradient reduction). Tokens and activations are random, one
document a sample: the time does not depend on their values.

Per case: the step time (median over --steps timed steps after --warmup; each step counts at its
slowest rank), tokens/s per GPU (the step's tokens / step time / world size), peak memory (the
largest torch.cuda.max_memory_allocated over the ranks, from the case's start; n/a on the CPU) and
the communication share: over one more step, run under torch.profiler, the time in which some
collective ran (NCCL kernels on a GPU, gloo operations on the CPU; a collective waiting for a slower
rank counts) over that step's wall time, at the rank with the largest share.

Rank 0 prints a line a case and rewrites OUT/results.json and OUT/scaling.md after each, so a run
cut short keeps the rows it finished; OUT/scaling.png comes at the end. A case that fails (out of
memory, a layout the model cannot take) is a row with its error. A failure on only some ranks leaves
the others in a collective until its timeout, which ends the run.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

matplotlib.use("Agg")  # files only, no display

ROOT = Path(__file__).resolve().parents[1]
CASES = ("kernel", "layer", "model")
SCALINGS = ("weak", "strong")
# The harness sets these per case: from --layouts, --seq-lengths and --recompute.
CASE_KEYS = ("parallel.", "data.seq_length", "training.micro_batch_size", "training.global_batch_size",
             "model.recompute")


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    sp: bool

    @classmethod
    def parse(cls, text: str) -> Layout:
        match = re.fullmatch(r"(?:tp(\d+))?(?:cp(\d+))?(sp)?", text)
        if not text or not match:
            raise ValueError(f"--layouts: {text!r} is not tpN, cpN, tpNcpN with an optional sp (e.g. tp2cp2sp)")
        tp, cp = int(match[1] or 1), int(match[2] or 1)
        if tp < 1 or cp < 1:
            raise ValueError(f"--layouts: {text!r}: sizes must be >= 1")
        if match[3] and tp == 1:
            raise ValueError(f"--layouts: {text!r}: sequence parallelism (sp) needs tp > 1")
        return cls(tp, cp, bool(match[3]))

    def fits(self, world: int) -> bool:
        return world % (self.tp * self.cp) == 0

    def name(self, world: int) -> str:
        dp = f"dp{world // (self.tp * self.cp)}" if self.fits(world) else ""
        return f"tp{self.tp}cp{self.cp}{dp}" + "sp" * self.sp


def all_layouts(world: int) -> list[Layout]:
    """Every TP x CP dividing the world size, SP on wherever TP > 1."""
    divisors = [n for n in range(1, world + 1) if world % n == 0]
    return [Layout(tp, cp, tp > 1) for tp in divisors for cp in divisors if world % (tp * cp) == 0]


@dataclass(frozen=True)
class Case:
    kind: str
    layout: Layout
    scaling: str
    scale_tokens: int  # T of --seq-lengths
    recompute: str | None  # None for the kernel

    def shape(self, world: int) -> tuple[int, int]:
        """(tokens a sample, samples a step), one sample per DP rank."""
        tp, cp = self.layout.tp, self.layout.cp
        if not self.layout.fits(world):
            raise ValueError(f"TP x CP = {tp} x {cp} does not divide the world size {world}")
        dp = world // (tp * cp)
        if self.scaling == "weak":
            return self.scale_tokens * tp * cp, dp
        if self.scale_tokens % dp:
            raise ValueError(f"strong scaling splits {self.scale_tokens} tokens into {dp} samples (one per DP rank)")
        return self.scale_tokens // dp, dp


def case_config(args, case: Case, sample_tokens: int, samples: int):
    from prism_megatron.launch.config import load_config

    layout = case.layout
    return load_config(args.config, [
        *base_overrides(args.set),
        f"parallel.tensor_model_parallel_size={layout.tp}", f"parallel.context_parallel_size={layout.cp}",
        f"parallel.sequence_parallel={str(layout.sp).lower()}", f"data.seq_length={sample_tokens}",
        "training.micro_batch_size=1", f"training.global_batch_size={samples}",
        f"model.recompute={case.recompute or 'none'}"])


def base_overrides(user_sets: list[str]) -> list[str]:
    # Random tokens stand in for data: no store is opened, but a run config must name one.
    return ["data.stores=[random-tokens]", *user_sets]


# ----------------------------------------------------------------------------------------------
# The cases: each yields one step (forward and backward, and for the model the optimizer step).


def compute_dtype(cfg) -> torch.dtype:
    from prism_megatron.launch.engine import use_bf16

    return torch.bfloat16 if use_bf16(cfg.training) else torch.float32


@contextmanager
def kernel_step(cfg, device: torch.device):
    from prism_megatron.model import batch_layout
    from prism_megatron.process_groups import cp_size, tp_size

    m, dtype = cfg.model, compute_dtype(cfg)  # the config's validation saw the heads divide by TP
    T, H = cfg.data.seq_length // cp_size(), m.num_heads // tp_size()  # this rank's tokens and heads
    K, V, L = m.head_k_dim, m.head_v_dim, m.write_steps

    def unit(*shape):
        return F.normalize(torch.randn(*shape, device=device), dim=-1).to(dtype).requires_grad_()

    q, k = unit(1, T, H, K), unit(1, T, H, K)
    d = torch.randn(1, T, H, L, V, device=device, dtype=dtype, requires_grad=True)
    kx = unit(1, T, H, L - 1, K) if L > 1 else None
    beta = torch.rand(1, T, H, L, device=device, dtype=dtype, requires_grad=True)
    g = (F.logsigmoid(torch.randn(1, T, H, device=device)) / 4).requires_grad_()  # float32, as the mixer's
    do = torch.randn(1, T, H, V, device=device, dtype=dtype)
    inputs = [x for x in (q, k, d, kx, beta, g) if x is not None]
    sequences = batch_layout(1, T, None, device)

    def step():
        o = sequences.recurrence(q, k, d, kx, beta, g, K**-0.5, m.kernel_backend)
        torch.autograd.grad(o, inputs, do)

    yield step


@contextmanager
def layer_step(cfg, device: torch.device):
    from prism_megatron.layers import megatron_config_for
    from prism_megatron.model import Block, batch_layout
    from prism_megatron.process_groups import cp_size, tp_size
    from prism_megatron.sharding import add_tp_grad_sum_hooks, draw_parameters

    m, T, dtype = cfg.model, cfg.data.seq_length, compute_dtype(cfg)
    sequence_parallel = cfg.parallel.sequence_parallel and tp_size() > 1
    local = T // cp_size()
    if sequence_parallel and local % tp_size():
        raise ValueError(f"sequence parallelism splits a rank's {local} tokens over TP={tp_size()}: they do not divide")
    block = Block(m, megatron_config=megatron_config_for(tp_size()), sequence_parallel=sequence_parallel)
    draw_parameters(block, cfg.training.seed)
    block.to(dtype)
    add_tp_grad_sum_hooks(block)
    x = torch.randn(1, local // tp_size() if sequence_parallel else local, m.hidden_size, device=device,
                    dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    wrt = [x, *block.parameters()]
    sequences = batch_layout(1, local, None, device)

    def step():
        if m.recompute == "full":
            y = checkpoint(block, x, sequences, use_reentrant=False)
        else:
            y = block(x, sequences)
        torch.autograd.grad(y, wrt, dy)

    yield step


@contextmanager
def model_step(cfg, device: torch.device):
    from prism_megatron.launch.engine import build_engine, forward
    from prism_megatron.model import PrismLM

    engine, _ = build_engine(cfg, PrismLM(cfg.model, cfg.parallel))
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_length + 1))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}

    def step():
        loss = forward(engine, batch)
        engine.backward(loss)
        engine.step()

    try:
        yield step
    finally:
        engine.destroy()


STEPS = {"kernel": kernel_step, "layer": layer_step, "model": model_step}


# ----------------------------------------------------------------------------------------------
# Measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def line_up(device: torch.device) -> None:
    """All ranks here, with no work left on the device, before a timed step starts."""
    synchronize(device)
    dist.all_reduce(torch.zeros(1, device=device))
    synchronize(device)


def collective_seconds(events, cuda: bool) -> float:
    """The time in which at least one collective ran: the union of their intervals, so that
    overlapping collectives (on several streams or threads) count once."""
    if cuda:
        spans = [e.time_range for e in events
                 if e.device_type == torch.profiler.DeviceType.CUDA and e.name.startswith("nccl")]
    else:
        spans = [e.time_range for e in events if e.name.startswith("gloo:")]
    busy, reached = 0.0, float("-inf")
    for span in sorted(spans, key=lambda s: s.start):
        if span.end > reached:
            busy += span.end - max(span.start, reached)
            reached = span.end
    return busy / 1e6  # the profiler's times are in microseconds


def communication_share(step, device: torch.device) -> float:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    line_up(device)
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        step()
        synchronize(device)
        wall = time.perf_counter() - started
    return collective_seconds(prof.events(), device.type == "cuda") / wall


def measure(step, device: torch.device, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        line_up(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    share = communication_share(step, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0.0
    worst = torch.tensor([*times, share, peak], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    *times, share, peak = worst.tolist()
    return dict(step_time_s=statistics.median(times), comm_share=share,
                peak_memory_gb=peak / 1e9 if device.type == "cuda" else None)


def measure_case(kind: str, cfg, device: torch.device, warmup: int, steps: int) -> dict:
    with STEPS[kind](cfg, device) as step:
        return measure(step, device, warmup, steps)


def run_case(args, case: Case, world: int, device: torch.device) -> dict:
    """The case's row: its shape and measurements, or its error (the first failing rank's)."""
    layout = case.layout
    row: dict[str, Any] = dict(
        case=case.kind, gpus=world, layout=layout.name(world), tp=layout.tp, cp=layout.cp,
        dp=world // (layout.tp * layout.cp) if layout.fits(world) else None, sp=layout.sp, scaling=case.scaling,
        scale_tokens=case.scale_tokens, recompute=case.recompute, sample_tokens=None, samples=None, step_tokens=None)
    error = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        sample_tokens, samples = case.shape(world)
        row.update(sample_tokens=sample_tokens, samples=samples, step_tokens=sample_tokens * samples)
        cfg = case_config(args, case, sample_tokens, samples)
        row.update(measure_case(case.kind, cfg, device, args.warmup, args.steps))
        row["tokens_per_s_per_gpu"] = row["step_tokens"] / row["step_time_s"] / world
    except Exception as e:  # out of memory, a shape the layout cannot take: the case's row says so
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        error = f"{type(e).__name__}: {message[:300]}"
    # The case's tensors (a failed one's too, with the exception) are unreachable now, some in
    # reference cycles (DeepSpeed's engine): free them, and hand their memory back for the next case.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    errors = [None] * world
    dist.all_gather_object(errors, error)
    error = next((e for e in errors if e is not None), None)
    if error is not None:
        row = {k: v for k, v in row.items() if k not in ("step_time_s", "comm_share", "peak_memory_gb")}
        row["error"] = error
    return row


# ----------------------------------------------------------------------------------------------
# Reports


COLUMNS = ("case", "GPUs", "layout", "scaling", "T", "recompute", "tokens/sample", "samples", "step s",
           "tokens/s/GPU", "peak GB", "comm %", "error")


def table_row(row: dict) -> list[str]:
    def number(key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else ""

    measured = "error" not in row
    peak = number("peak_memory_gb", ".2f")
    if measured and row["peak_memory_gb"] is None:
        peak = "n/a (CPU)"
    return [row["case"], str(row["gpus"]), row["layout"], row["scaling"], number("scale_tokens", ","),
            row["recompute"] or "-",
            number("sample_tokens", ","), number("samples", "d"), number("step_time_s", ".4f"),
            number("tokens_per_s_per_gpu", ",.0f"), peak,
            format(100 * row["comm_share"], ".1f") if measured else "",
            row.get("error", "").replace("|", "\\|")]


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Scaling: {meta['device']}, {meta['gpus']} GPU(s)" if meta["device_type"] == "cuda"
             else f"# Scaling: CPU, {meta['gpus']} process(es), gloo (a check of the harness, not performance)",
             "",
             f"{meta['date']} | `{meta['command']}` | compute dtype {meta['dtype']}, "
             f"{meta['warmup']} warmup and {meta['steps']} timed steps a case (median)",
             "",
             "T: tokens per GPU (weak scaling) or per step (strong scaling); comm %: the share of a profiled "
             "step in which some collective ran, at the rank with the largest share.",
             "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    """A column per case; tokens/s per GPU, peak memory (on GPUs) and communication share against T,
    a line per layout, scaling and recompute mode."""
    import matplotlib.pyplot as plt

    cuda = meta["device_type"] == "cuda"
    kinds = [kind for kind in CASES if any(row["case"] == kind for row in rows)] or ["kernel"]
    metrics = (("tokens_per_s_per_gpu", "tokens/s per GPU", 1),
               *([("peak_memory_gb", "peak memory (GB)", 1)] if cuda else []),
               ("comm_share", "communication (% of step)", 100))
    fig, axes = plt.subplots(len(metrics), len(kinds), figsize=(5 * len(kinds), 3 * len(metrics)), squeeze=False)
    for column, kind in enumerate(kinds):
        series: dict[str, list[dict]] = {}
        for row in rows:
            if row["case"] == kind and "error" not in row:
                label = " ".join(filter(None, (row["layout"], row["scaling"], row["recompute"])))
                series.setdefault(label, []).append(row)
        for line, (key, title, factor) in enumerate(metrics):
            ax = axes[line][column]
            for label, points in series.items():
                ax.plot(*zip(*sorted((p["scale_tokens"], p[key] * factor) for p in points)), marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("T (weak: tokens per GPU, strong: per step)")
            ax.set_ylabel(title)
            ax.grid(True, alpha=0.3)
            if line == 0:
                ax.set_title(kind)
                if series:
                    ax.legend(fontsize=7)
    device = meta["device"] if cuda else "CPU/gloo (a check of the harness, not performance; no peak memory)"
    fig.suptitle(f"PRISM scaling: {device}, {meta['gpus']} rank(s), {meta['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_tables(out: Path, meta: dict, rows: list[dict]) -> None:
    from prism_megatron.files import write_atomic

    write_atomic(out / "results.json", json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    write_atomic(out / "scaling.md", markdown(meta, rows))


def progress_line(index: int, total: int, row: dict) -> str:
    what = (f"[{index}/{total}] {row['case']} {row['layout']} {row['scaling']}"
            + (f" recompute={row['recompute']}" if row["recompute"] else "")
            + (f" {row['sample_tokens']:,} tokens x {row['samples']}" if row["sample_tokens"] else ""))
    if "error" in row:
        return f"{what}: FAILED: {row['error']}"
    peak = f"peak {row['peak_memory_gb']:.2f} GB" if row["peak_memory_gb"] is not None else "peak n/a (CPU)"
    return (f"{what}: {row['step_time_s']:.4f} s, {row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, {peak}, "
            f"comm {100 * row['comm_share']:.1f}%")


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="scaling.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="folder for results.json, scaling.md and scaling.png")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--layouts", nargs="+", metavar="LAYOUT",
                        help="e.g. tp1 tp2sp cp2 tp2cp2sp (default: every TP x CP dividing the world size)")
    parser.add_argument("--scaling", nargs="+", choices=SCALINGS, default=["weak"])
    parser.add_argument("--seq-lengths", nargs="+", type=int, metavar="T",
                        help="weak: tokens per GPU; strong: tokens per step (default: the config's data.seq_length)")
    parser.add_argument("--recompute", nargs="+", choices=("none", "selective", "full"),
                        help="modes for the layer and model cases (default: the config's model.recompute)")
    parser.add_argument("--config", type=Path, default=ROOT / "launch/configs/1.3b.yaml",
                        help="the run config whose model, precision and ZeRO stage the cases use")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, as prism-train's --set (repeatable)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps a case (compilation, allocation)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps a case")
    args = parser.parse_args(argv)

    from prism_megatron.launch.config import ConfigError, load_config

    for item in args.set:
        if item.startswith(CASE_KEYS):
            parser.error(f"--set {item}: the harness sets this key per case (--layouts, --seq-lengths, --recompute)")
    try:
        cfg = load_config(args.config, base_overrides(args.set))
        if args.layouts:
            args.layouts = [Layout.parse(text) for text in args.layouts]
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
    if args.seq_lengths and min(args.seq_lengths) < 1:
        parser.error(f"--seq-lengths: must be >= 1, got {args.seq_lengths}")
    if args.warmup < 0:
        parser.error(f"--warmup: must be >= 0, got {args.warmup}")
    if args.steps < 1:
        parser.error(f"--steps: must be >= 1, got {args.steps}")
    args.seq_lengths = args.seq_lengths or [cfg.data.seq_length]
    args.recompute = args.recompute or [cfg.model.recompute]
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(argv)
    from megatron.core import parallel_state

    from prism_megatron.config import ParallelConfig
    from prism_megatron.process_groups import destroy_parallel, initialize_parallel

    # torch.distributed first (the world size decides the layouts); megatron's groups per layout.
    initialize_parallel(ParallelConfig(), cfg.training.seed)
    world, rank0 = dist.get_world_size(), dist.get_rank() == 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    layouts = args.layouts or all_layouts(world)
    cases = [Case(kind, layout, scaling, tokens, recompute)
             for layout in layouts for kind in args.cases for tokens in args.seq_lengths
             for scaling in args.scaling
             for recompute in ([None] if kind == "kernel" else args.recompute)]
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                device_type=device.type, gpus=world, dtype=str(compute_dtype(cfg)).removeprefix("torch."),
                config=str(args.config), overrides=args.set, warmup=args.warmup, steps=args.steps,
                command=" ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    if rank0:
        args.output.mkdir(parents=True, exist_ok=True)
        print(f"scaling: {len(cases)} cases on {world} rank(s) ({meta['device']}), writing {args.output}", flush=True)
    rows: list[dict] = []
    current = None
    for index, case in enumerate(cases, 1):
        if case.layout != current:
            current = case.layout
            parallel_state.destroy_model_parallel()
            if current.fits(world):  # else each of its cases is a row with the error
                initialize_parallel(ParallelConfig(current.tp, current.sp, current.cp), cfg.training.seed)
        row = run_case(args, case, world, device)
        rows.append(row)
        if rank0:
            print(progress_line(index, len(cases), row), flush=True)
            write_tables(args.output, meta, rows)
    if rank0:
        plot(meta, rows, args.output / "scaling.png")  # half a second: once, not after every case
    destroy_parallel()


if __name__ == "__main__":
    main()
