"""Times the Triton PRISM kernel against fla's Gated DeltaNet kernel and against PRISM run the
generic way (fla's DPLR delta rule over the L-times longer sequence), forward and forward+backward,
with peak memory, on one GPU. Prints a markdown table (ratios against Gated DeltaNet in the same
run), PRISM L=3's speed-up over the DPLR path, and on request the CUDA time per kernel.

    python benchmarks/prism_kernel.py [--out results.md]

fla (fla-core) is a benchmark-only dependency. Its gated backward refuses to run under Triton
3.4-3.7.0 on Hopper (a miscompile in its dq/dk/dg kernel, fla #640); for timing alone this script
lifts that guard, so fla's Gated DeltaNet backward gradients here are timed, not trusted. The first
call of each fla kernel autotunes for minutes: give a run 15 minutes or more.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import logging

import torch
import torch.nn.functional as F
import triton.testing

from prism_megatron.kernels.prism import launch_config
from prism_megatron.kernels.prism.chunk import chunk_prism_recurrence

log = logging.getLogger("prism_kernel_bench")
SHAPES = [(8, 2048, 16, 128), (1, 32768, 16, 128), (8, 2048, 32, 64)]  # B, T, H, K = V


def prism_inputs(B, T, H, D, L, dtype=torch.bfloat16):
    def unit(*shape):
        return F.normalize(torch.randn(*shape, device="cuda", dtype=torch.float32), dim=-1).to(dtype)

    return dict(
        q=unit(B, T, H, D), k=unit(B, T, H, D), d=torch.randn(B, T, H, L, D, device="cuda", dtype=dtype),
        kx=unit(B, T, H, L - 1, D) if L > 1 else None,
        beta=torch.rand(B, T, H, L, device="cuda", dtype=dtype),
        g=F.logsigmoid(torch.randn(B, T, H, device="cuda", dtype=torch.float32)) / 4,
    )


def prism_call(x):
    return lambda: chunk_prism_recurrence(x["q"], x["k"], x["d"], x["kx"], x["beta"], x["g"])[0]


def gdn_call(x):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    v, beta = x["d"][:, :, :, 0].contiguous(), x["beta"][..., 0].contiguous()
    x.update(v=v, b1=beta)
    return lambda: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["b1"])[0]


def dplr_inputs(B, T, H, D, L, dtype=torch.bfloat16):
    """PRISM as a DPLR delta rule over L sub-tokens per token: sub-token 1 decays and erases along k
    and writes b1 d^1; sub-tokens 2..L write b^l d^l along kappa^l. Random values of those shapes."""
    x = prism_inputs(B, T * L, H, D, 1, dtype)
    k = x["k"]
    return dict(q=x["q"], k=k, v=x["d"][:, :, :, 0].contiguous(), a=k.clone(),
                b=(-x["beta"][..., :1] * k).contiguous(),
                gk=x["g"][..., None].expand(B, T * L, H, D).contiguous())


def dplr_call(x):
    from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule

    return lambda: chunk_dplr_delta_rule(x["q"], x["k"], x["v"], x["a"], x["b"], x["gk"])[0]


def measure(make_inputs, make_call):
    """(forward ms, forward+backward ms, peak GiB allocated during one forward+backward)."""
    torch.cuda.empty_cache()
    x = make_inputs()
    leaves = [t for t in x.values() if t is not None]
    for t in leaves:
        t.requires_grad_()
    fn = make_call(x)
    with torch.no_grad():
        fwd = triton.testing.do_bench(fn, warmup=5, rep=50)
    o = fn()
    do = torch.randn_like(o)
    del o

    fwd_bwd = forward_backward(fn, do, leaves)
    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    both = triton.testing.do_bench(fwd_bwd, warmup=5, rep=50)
    return fwd, both, peak


def forward_backward(fn, do, leaves):
    """One training-like step: forward, backward, then the gradients dropped (as zero_grad(set_to_none=True)
    does), so that no step pays for accumulating into .grad."""
    def step():
        torch.autograd.backward(fn(), do)
        for t in leaves:
            t.grad = None

    return step


def kernel_breakdown(make_inputs, make_call):
    """CUDA time per kernel (ms per forward+backward), the largest first."""
    x = make_inputs()
    leaves = [t for t in x.values() if t is not None]
    for t in leaves:
        t.requires_grad_()
    fn = make_call(x)
    step = forward_backward(fn, torch.randn_like(fn()), leaves)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals = collections.Counter()
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            totals[evt.name.split("(")[0][:60]] += evt.device_time / 1e3 / steps
    return totals.most_common(14)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--L", type=int, nargs="+", default=[1, 2, 3, 4], help="PRISM ranks to time")
    parser.add_argument("--shapes", type=int, nargs="+", default=list(range(len(SHAPES))),
                        help=f"indices into {SHAPES} (B, T, H, K=V)")
    parser.add_argument("--no-dplr", action="store_true", help="skip the expanded DPLR baseline")
    parser.add_argument("--breakdown", action="store_true",
                        help="also print CUDA time per kernel of Gated DeltaNet and of each PRISM L at each shape")
    parser.add_argument("--warps", nargs="+", default=[], metavar="KERNEL=N",
                        help="override the warps of a PRISM kernel (at K=128; half at K<=64), one of "
                        f"{sorted(launch_config.WARPS)}")
    args = parser.parse_args()
    for item in args.warps:
        name, _, n = item.partition("=")
        if name not in launch_config.WARPS or not n.isdigit():
            parser.error(f"--warps takes KERNEL=N with KERNEL one of {sorted(launch_config.WARPS)}, got {item!r}")
        launch_config.WARPS[name] = int(n)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import fla.ops.common.chunk_o as fla_chunk_o

    fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only; see the module docstring

    out = open(args.out, "w") if args.out else None

    def emit(line):
        log.info(line)
        if out:
            out.write(line + "\n")
            out.flush()

    header = [f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, "
             f"{datetime.date.today()}; bf16 inputs, times in ms (triton.testing.do_bench), "
             "peak = max allocated GiB during one forward+backward (inputs included).",
             f"PRISM warps per kernel (K=128): {launch_config.WARPS}.", "",
             "| shape (B, T, H, K=V) | kernel | fwd ms | fwd+bwd ms | fwd x GDN | fwd+bwd x GDN | peak GiB "
             "| peak x GDN |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for line in header:
        emit(line)
    runs, bases, times = [], {}, {}
    for i_shape in args.shapes:
        B, T, H, D = SHAPES[i_shape]
        runs.append((i_shape, "fla Gated DeltaNet", lambda B=B, T=T, H=H, D=D: prism_inputs(B, T, H, D, 1), gdn_call))
        runs += [(i_shape, f"PRISM Triton L={L}", lambda B=B, T=T, H=H, D=D, L=L: prism_inputs(B, T, H, D, L),
                  prism_call) for L in args.L]
    for run in runs:
        time_row(run, bases, times, emit)
    if args.breakdown:
        for i_shape, name, make_inputs, make_call in runs:
            B, T, H, D = SHAPES[i_shape]
            emit(f"{name} at B={B} T={T} H={H} K=V={D}, CUDA ms per forward+backward by kernel: "
                 + ", ".join(f"{k} {ms:.3f}" for k, ms in kernel_breakdown(make_inputs, make_call)))
    # The expanded DPLR baseline autotunes for minutes per shape, so it comes last.
    if not args.no_dplr:
        for i_shape in args.shapes:
            make_inputs = lambda i_shape=i_shape: dplr_inputs(*SHAPES[i_shape], 3)  # noqa: E731
            time_row((i_shape, "fla DPLR, 3x expanded (PRISM L=3)", make_inputs, dplr_call), bases, times, emit)
        for i_shape in args.shapes:
            dplr, prism = (times.get((i_shape, n)) for n in ("fla DPLR, 3x expanded (PRISM L=3)", "PRISM Triton L=3"))
            if dplr and prism:
                emit(f"PRISM L=3 at {SHAPES[i_shape]}: forward+backward {dplr / prism:.2f}x faster than the expanded "
                     "DPLR path")


def time_row(run, bases, times, emit):
    """Times one (shape index, name, make_inputs, make_call) and emits its table row, with ratios against
    the first row timed at that shape; keeps its forward+backward ms in times[(shape index, name)]."""
    i_shape, name, make_inputs, make_call = run
    shape = ", ".join(map(str, SHAPES[i_shape]))
    log.info("timing %s at %s", name, shape)
    try:
        fwd, both, peak = measure(make_inputs, make_call)
    except torch.OutOfMemoryError:
        emit(f"| {shape} | {name} | out of memory | | | | | |")
        return
    times[i_shape, name] = both
    base = bases.setdefault(i_shape, (fwd, both, peak))
    emit(f"| {shape} | {name} | {fwd:.3f} | {both:.3f} | {fwd / base[0]:.2f} | {both / base[1]:.2f} "
         f"| {peak:.2f} | {peak / base[2]:.2f} |")


if __name__ == "__main__":
    main()
