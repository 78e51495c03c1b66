"""The Triton PRISM kernel against the float64 token loop (kernels/prism/naive.py), forward and
gradients. Under the CPU interpreter (TRITON_INTERPRET=1, set by conftest) it runs small shapes;
on CUDA the same tests run the full matrix (dtypes, L = 1..4, K = V up to 256, hard cases, a
1 + 3000 token varlen batch) and the comparison with fla's Gated DeltaNet kernel at L = 1."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prism_megatron.kernels.prism import launch_config
from prism_megatron.kernels.prism.chunk import chunk_prism_recurrence
from prism_megatron.kernels.prism.naive import naive_prism_recurrence

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# Relative RMSE bounds against the float64 loop run on the same (rounded) inputs, just above what each
# precision reaches (docs/PERFORMANCE.md, "Kernel test tolerances"):
# - float32: exact float32 products, float32 everywhere. Under the interpreter every output, state and
#   gradient of every case lies within 1.2e-6 (most 1e-7 to 6e-7); 1e-5 leaves room for the GPU's other
#   summation orders and its K = 256 cases, and fails a term off by 1e-4 of its size.
# - 16-bit: products take bfloat16 operands and intermediates are stored in the input dtype. The final
#   state is float32, but every scan step adds a product of bfloat16 operands (U and the decayed values)
#   to it, so its error is that of those roundings, as o's: 1.9e-3 to 2.8e-3 on random inputs, 4.0e-3
#   with decay and beta near 1 at K = V = 128 (o 4.2e-3, the worst gradient, dg, 7.9e-3).
TOLERANCE = {
    torch.float32: dict(o=1e-5, final_state=1e-5, grad=1e-5),
    torch.bfloat16: dict(o=5e-3, final_state=5e-3, grad=1e-2),
    torch.float16: dict(o=5e-3, final_state=5e-3, grad=1e-2),
}
# With decay near 0 (g down to -30), dg is about 1e6 times smaller than the other gradients (every path
# through a decay is scaled by it), and float32 rounding of its larger partials leaves it 3.6e-5 off
# relative to itself (3e-10 absolute, where dbeta is 1e-6 off); every other gradient there stays within 1e-7.
STRONG_DECAY_DG = 1e-4
NAMES = ("q", "k", "d", "kx", "beta", "g", "initial_state")


def make_inputs(B, T, H, K, V, L, dtype, n_seqs=None, g_range=(-0.5, -0.01), beta_range=(0.0, 1.0), seed=0,
                kx_norm=1.0):
    """Random PRISM inputs (unit keys, extra keys of norm kx_norm, g <= 0, beta in (0, 1)) rounded to
    dtype, as leaves on DEVICE."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)

    lo, hi = g_range
    blo, bhi = beta_range
    tensors = {
        "q": unit(B, T, H, K),
        "k": unit(B, T, H, K),
        "d": torch.randn(B, T, H, L, V, generator=gen, dtype=torch.float64),
        "kx": kx_norm * unit(B, T, H, L - 1, K) if L > 1 else None,
        "beta": blo + (bhi - blo) * rand(B, T, H, L),
        "g": lo + (hi - lo) * rand(B, T, H),
        "initial_state": torch.randn(B if n_seqs is None else n_seqs, H, K, V, generator=gen, dtype=torch.float64),
    }
    out = {}
    for name, x in tensors.items():
        if x is not None:
            x = x.to(DEVICE, torch.float32 if name == "initial_state" else dtype).requires_grad_()
        out[name] = x
    return out


def detached(inputs):
    return {n: None if x is None else x.detach() for n, x in inputs.items()}


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(fn, inputs, cu_seqlens, do, dht):
    o, ht = fn(inputs["q"], inputs["k"], inputs["d"], inputs["kx"], inputs["beta"], inputs["g"],
               initial_state=inputs["initial_state"], output_final_state=True, cu_seqlens=cu_seqlens)
    loss = (o.double() * do).sum() + (ht.double() * dht).sum()
    leaves = {n: inputs[n] for n in NAMES if inputs[n] is not None}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)  # with T = 0 only the state is used
    return o, ht, {n: torch.zeros_like(x) if dx is None else dx for (n, x), dx in zip(leaves.items(), grads)}


def check_against_naive(inputs, dtype, cu_seqlens=None, seed=1, dg_tolerance=None):
    """Relative RMSE of o, the final state and every gradient against the float64 token loop, within
    TOLERANCE[dtype] (dg within dg_tolerance where given)."""
    oracle = {n: None if x is None else x.double().requires_grad_() for n, x in detached(inputs).items()}
    gen = torch.Generator().manual_seed(seed)
    q, d, h0 = inputs["q"], inputs["d"], inputs["initial_state"]
    do = torch.randn(*q.shape[:3], d.shape[-1], generator=gen, dtype=torch.float64).to(DEVICE)
    dht = torch.randn(h0.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    o, ht, grads = run(chunk_prism_recurrence, inputs, cu_seqlens, do, dht)
    o_ref, ht_ref, grads_ref = run(naive_prism_recurrence, oracle, cu_seqlens, do, dht)
    assert o.dtype == dtype and ht.dtype == torch.float32
    errors = {"o": rel_rmse(o, o_ref), "final_state": rel_rmse(ht, ht_ref)}
    errors.update({f"d{n}": rel_rmse(grads[n], grads_ref[n]) for n in grads})
    for n in grads:
        assert grads[n].dtype == inputs[n].dtype, n
    bounds = {n: TOLERANCE[dtype].get(n, TOLERANCE[dtype]["grad"]) for n in errors}
    if dg_tolerance is not None:
        bounds["dg"] = dg_tolerance
    bad = {n: e for n, e in errors.items() if e > bounds[n]}
    assert not bad, f"relative RMSE over tolerance: {bad} (all: {errors})"


# (dtype, L, K, V, T): small under the interpreter, the full matrix on the GPU.
if ON_GPU:
    CASES = ([(torch.bfloat16, L, 128, 128, 300) for L in (1, 2, 3, 4)]
             + [(torch.bfloat16, 1, 64, 64, 300), (torch.bfloat16, 3, 64, 64, 300), (torch.bfloat16, 3, 256, 256, 200),
                (torch.float32, 1, 64, 64, 300), (torch.float32, 3, 128, 128, 300), (torch.float32, 2, 256, 256, 130),
                (torch.float16, 2, 128, 128, 300)])
    HARD_SHAPE = dict(B=2, T=300, H=2, K=128, V=128, L=3, dtype=torch.bfloat16)
else:
    # The interpreter rounds products' operands and stored intermediates as the GPU does, so the bfloat16
    # case at K = V = 128 checks the precision budget at a real head size.
    CASES = [(torch.float32, 1, 16, 32, 130), (torch.float32, 2, 32, 16, 70), (torch.float32, 3, 16, 16, 130),
             (torch.float32, 4, 16, 32, 64), (torch.bfloat16, 3, 32, 32, 100), (torch.float16, 2, 16, 16, 70),
             (torch.bfloat16, 3, 128, 128, 130)]
    HARD_SHAPE = dict(B=1, T=70, H=2, K=16, V=16, L=3, dtype=torch.float32)


@pytest.mark.parametrize("dtype,L,K,V,T", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_matches_token_loop(dtype, L, K, V, T):
    check_against_naive(make_inputs(2 if ON_GPU else 1, T, 2, K, V, L, dtype), dtype)


@pytest.mark.parametrize("multiprocessors", [1, 10**6], ids=["64-column-scans", "32-column-scans"])
def test_scan_value_blocks(monkeypatch, multiprocessors):
    """Both widths of the state scans' value blocks: the scans take 32 columns where 64 would leave
    multiprocessors idle (few sequences and heads), which the GPU matrix above does at its small batches."""
    monkeypatch.setattr(launch_config, "multiprocessors", lambda device: multiprocessors)
    K = 128 if ON_GPU else 64
    check_against_naive(make_inputs(2, 300 if ON_GPU else 100, 2, K, K, 3, torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("case", [
    dict(g_range=(-1e-4, 0.0)),                 # decay near 1
    dict(g_range=(-30.0, -10.0)),               # decay near 0
    dict(beta_range=(0.0, 1e-3)),               # beta near 0
    dict(beta_range=(1 - 1e-3, 1.0)),           # beta near 1
    dict(g_range=(-1e-4, 0.0), beta_range=(1 - 1e-3, 1.0)),
    dict(kx_norm=4.0),                          # unnormalised extra keys (the split solver's default)
], ids=["decay~1", "decay~0", "beta~0", "beta~1", "decay~1,beta~1", "kx-norm-4"])
def test_hard_cases(case):
    shape = dict(HARD_SHAPE)
    dtype = shape.pop("dtype")
    strong_decay = case.get("g_range", (0.0, 0.0))[1] < -1.0
    dg_tolerance = STRONG_DECAY_DG if strong_decay and dtype == torch.float32 else None
    check_against_naive(make_inputs(**shape, dtype=dtype, **case), dtype, dg_tolerance=dg_tolerance)


@pytest.mark.parametrize("T", [0, 1])
def test_empty_and_single_token(T):
    check_against_naive(make_inputs(2, T, 2, 16, 32, 2, torch.float32), torch.float32)


def test_varlen_resets_state_at_boundaries():
    lengths = [1, 3000, 1, 200] if ON_GPU else [1, 70, 0, 45, 1]
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    K = 128 if ON_GPU else 16
    cu_seqlens = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    inputs = make_inputs(1, sum(lengths), 2, K, K, 3, dtype, n_seqs=len(lengths))
    check_against_naive(inputs, dtype, cu_seqlens=cu_seqlens)


def test_no_state_in_or_out():
    inputs = make_inputs(1, 80, 1, 16, 16, 2, torch.float32)
    o, ht = chunk_prism_recurrence(inputs["q"], inputs["k"], inputs["d"], inputs["kx"], inputs["beta"], inputs["g"])
    o_ref, _ = naive_prism_recurrence(*(inputs[n].detach().double() for n in NAMES[:6]))
    assert ht is None and rel_rmse(o, o_ref) < TOLERANCE[torch.float32]["o"]
    o.sum().backward()
    assert inputs["initial_state"].grad is None and torch.isfinite(inputs["g"].grad).all()


def test_rejects_what_the_kernel_does_not_support():
    inputs = detached(make_inputs(1, 5, 2, 300, 16, 1, torch.float32))
    inputs.pop("initial_state")
    with pytest.raises(ValueError, match="K, V <= 256"):
        chunk_prism_recurrence(**inputs)
    with pytest.raises(TypeError, match="inputs, got torch.float64"):
        chunk_prism_recurrence(**{n: None if x is None else x.double() for n, x in inputs.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True])
def test_matches_fla_gated_deltanet_at_L1(varlen):
    """fla (the `gpu` extra) is imported, not skipped: on a GPU machine without it this test fails."""
    import fla.ops.gated_delta_rule as fla
    B, T, H, K = (1, 1500, 4, 128) if varlen else (2, 1000, 4, 128)
    inputs = detached(make_inputs(B, T, H, K, K, 1, torch.bfloat16))
    cu_seqlens = torch.tensor([0, 1, 700, 1500], device=DEVICE) if varlen else None
    if varlen:
        inputs["initial_state"] = torch.randn(3, H, K, K, device=DEVICE)
    v, beta = inputs["d"][:, :, :, 0], inputs["beta"][..., 0]
    o_ref, ht_ref = fla.chunk_gated_delta_rule(inputs["q"], inputs["k"], v, inputs["g"].float(), beta,
                                               initial_state=inputs["initial_state"], output_final_state=True,
                                               cu_seqlens=cu_seqlens)
    o, ht = chunk_prism_recurrence(inputs["q"], inputs["k"], inputs["d"], None, inputs["beta"], inputs["g"],
                                   initial_state=inputs["initial_state"], output_final_state=True,
                                   cu_seqlens=cu_seqlens)
    assert rel_rmse(o, o_ref.double()) < 5e-3 and rel_rmse(ht, ht_ref.double()) < 5e-3


def test_benchmark_script_runs_as_a_command():
    """The GPU benchmark (benchmarks/prism_kernel.py) starts and explains itself without a GPU."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "prism_kernel.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout and "Gated DeltaNet" in result.stdout


def test_gpu_check_script_explains_its_usage(tmp_path):
    """benchmarks/gpu_kernel_check.sh, run with a mode it does not have, says how to run it and exits 2
    before it installs or writes anything."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernel_check.sh"
    result = subprocess.run(["bash", str(script), str(tmp_path / "out"), "benchmark"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "tests|bench|all" in result.stderr and "sweep" in result.stderr
    assert not (tmp_path / "out").exists()
