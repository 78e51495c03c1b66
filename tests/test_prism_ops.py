"""The PRISM op: the chunk-form torch backend against the token-loop spec, and the op's contract."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prism_megatron.kernels.prism.chunk_torch import chunk_prism_recurrence_torch
from prism_megatron.kernels.prism.naive import naive_prism_recurrence
from prism_megatron.kernels.prism import prism_recurrence


def make_inputs(B, T, H, K, V, L, dtype=torch.float64, g_range=(-1.0, 0.0), beta_range=(0.0, 1.0), seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "q": F.normalize(randn(B, T, H, K), dim=-1),
        "k": F.normalize(randn(B, T, H, K), dim=-1),
        "d": randn(B, T, H, L, V),
        "kx": F.normalize(randn(B, T, H, L - 1, K), dim=-1) if L > 1 else None,
        "beta": uniform(*beta_range, B, T, H, L),
        "g": uniform(*g_range, B, T, H),
    }
    return {name: x.to(dtype) if x is not None else None for name, x in inputs.items()}


def run_with_grads(fn, inputs, initial_state, cu_seqlens, **kwargs):
    """Outputs, final state and the gradients of a fixed random loss w.r.t. every input."""
    leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items() if x is not None}
    if initial_state is not None:
        leaves["initial_state"] = initial_state.detach().clone().requires_grad_()
    args = {n: leaves.get(n) for n in inputs}
    o, final = fn(**args, initial_state=leaves.get("initial_state"), output_final_state=True, cu_seqlens=cu_seqlens, **kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=final.dtype)).sum()
    loss.backward()
    return o, final, {n: x.grad for n, x in leaves.items()}


def assert_matches_naive(inputs, initial_state=None, cu_seqlens=None, chunk_size=16):
    """Outputs, final state and every gradient agree with the token loop to 1e-10 (float64)."""
    ref = run_with_grads(naive_prism_recurrence, inputs, initial_state, cu_seqlens)
    if chunk_size is None:  # the backend's default, through the public op
        got = run_with_grads(prism_recurrence, inputs, initial_state, cu_seqlens, backend="torch")
    else:
        got = run_with_grads(chunk_prism_recurrence_torch, inputs, initial_state, cu_seqlens, chunk_size=chunk_size)
    torch.testing.assert_close(got[0], ref[0], atol=1e-10, rtol=1e-10, msg="output")
    torch.testing.assert_close(got[1], ref[1], atol=1e-10, rtol=1e-10, msg="final state")
    assert ref[2].keys() == got[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], atol=1e-10, rtol=1e-10, msg=f"grad of {name}")


@pytest.mark.parametrize(
    "B, T, H, K, V, L, with_state, chunk_size",
    [
        (2, 37, 2, 8, 5, 1, False, 16),
        (2, 50, 2, 6, 8, 2, True, 16),
        (1, 33, 3, 8, 4, 3, True, 16),
        (2, 20, 2, 4, 6, 4, False, 16),
        (2, 16, 1, 4, 3, 3, True, 16),
        (3, 1, 2, 4, 5, 2, True, 16),
        (1, 150, 2, 6, 4, 2, True, 64),
        (2, 100, 2, 6, 4, 3, True, None),
    ],
)
def test_torch_matches_naive(B, T, H, K, V, L, with_state, chunk_size):
    inputs = make_inputs(B, T, H, K, V, L, seed=T + L)
    state = torch.randn(B, H, K, V, dtype=torch.float64) if with_state else None
    assert_matches_naive(inputs, state, chunk_size=chunk_size)


@pytest.mark.parametrize("L, with_state", [(1, False), (3, True)])
def test_torch_matches_naive_varlen(L, with_state):
    torch.manual_seed(0)
    cu_seqlens = torch.tensor([0, 1, 38, 43, 133])
    inputs = make_inputs(1, 133, 2, 6, 5, L, seed=L)
    state = torch.randn(4, 2, 6, 5, dtype=torch.float64) if with_state else None
    assert_matches_naive(inputs, state, cu_seqlens)


def test_empty_sequences():
    """T = 0, and zero-length pieces of a packed batch, pass the initial state through."""
    torch.manual_seed(0)
    for backend in ("naive", "torch"):
        state = torch.randn(2, 2, 4, 3, dtype=torch.float64)
        o, final = prism_recurrence(**make_inputs(2, 0, 2, 4, 3, 2), initial_state=state, output_final_state=True, backend=backend)
        assert o.shape == (2, 0, 2, 3)
        assert torch.equal(final, state)
    state = torch.randn(4, 2, 4, 3, dtype=torch.float64)
    assert_matches_naive(make_inputs(1, 21, 2, 4, 3, 2), state, torch.tensor([0, 0, 21, 21, 21]))


@pytest.mark.parametrize(
    "g_range, beta_range",
    [((-1e-9, 0.0), (1 - 1e-9, 1.0)), ((-60.0, -20.0), (0.0, 1e-9)), ((-1e-9, 0.0), (0.0, 1e-9)), ((-60.0, -20.0), (1 - 1e-9, 1.0))],
    ids=["no-decay-full-beta", "strong-decay-tiny-beta", "no-decay-tiny-beta", "strong-decay-full-beta"],
)
def test_hard_gates(g_range, beta_range):
    torch.manual_seed(0)
    inputs = make_inputs(2, 40, 2, 6, 5, 3, g_range=g_range, beta_range=beta_range)
    assert_matches_naive(inputs, torch.randn(2, 2, 6, 5, dtype=torch.float64))


def test_float32_and_bfloat16_inputs():
    """Lower-precision inputs keep their dtype for o and get a float32 state, close to the float64 spec
    run on the same (rounded) inputs."""
    torch.manual_seed(0)
    inputs = make_inputs(2, 45, 2, 8, 6, 3)
    state = torch.randn(2, 2, 8, 6, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        low = {n: x.to(dtype) if x is not None else None for n, x in inputs.items()}
        o, s = chunk_prism_recurrence_torch(**low, initial_state=state.float(), output_final_state=True, chunk_size=16)
        assert o.dtype == dtype and s.dtype == torch.float32
        rounded = {n: x.double() if x is not None else None for n, x in low.items()}
        ref_low_o, ref_low_s = naive_prism_recurrence(**rounded, initial_state=state, output_final_state=True)
        torch.testing.assert_close(o.double(), ref_low_o, atol=tol, rtol=tol)
        torch.testing.assert_close(s.double(), ref_low_s, atol=tol, rtol=tol)


def test_gated_deltanet_special_case():
    """L = 1 with d = v is Gated DeltaNet, written here independently of the spec."""
    torch.manual_seed(0)
    B, T, H, K, V = 2, 70, 2, 8, 6
    inputs = make_inputs(B, T, H, K, V, 1)
    q, k, v, beta, g = inputs["q"], inputs["k"], inputs["d"][:, :, :, 0], inputs["beta"][..., 0], inputs["g"]
    scale = 0.3
    S = torch.zeros(B, H, K, V, dtype=torch.float64)
    outputs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    expected = torch.stack(outputs, 1)
    for backend in ("auto", "naive"):
        o, final = prism_recurrence(**inputs, scale=scale, output_final_state=True, backend=backend)
        torch.testing.assert_close(o, expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(final, S, atol=1e-12, rtol=1e-12)


def test_contract_errors():
    good = make_inputs(2, 5, 2, 4, 3, 2)

    def call(**changes):
        prism_recurrence(**{**good, **changes}, backend="torch")

    with pytest.raises(ValueError, match="k must have shape"):
        call(k=good["k"][:, :, :, :3])
    with pytest.raises(ValueError, match="d must be"):
        call(d=good["d"][:, :4])
    with pytest.raises(ValueError, match="kx .* required"):
        call(kx=None)
    with pytest.raises(ValueError, match="kx must have shape"):
        call(kx=good["kx"].repeat(1, 1, 1, 2, 1))
    with pytest.raises(ValueError, match="kx must be None when L = 1"):
        call(d=good["d"][:, :, :, :1], beta=good["beta"][..., :1])
    with pytest.raises(ValueError, match="beta must have shape"):
        call(beta=good["beta"][..., :1])
    with pytest.raises(ValueError, match="g must have shape"):
        call(g=good["g"][..., None])
    with pytest.raises(ValueError, match="B = 1"):
        call(cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        call(initial_state=torch.zeros(3, 2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown PRISM backend"):
        prism_recurrence(**good, backend="cuda")

    packed = {n: x[:1] for n, x in good.items()}
    with pytest.raises(ValueError, match="rise from 0 to T = 5"):
        prism_recurrence(**packed, cu_seqlens=torch.tensor([0, 3, 4]))
    with pytest.raises(ValueError, match="rise from 0 to T = 5"):
        prism_recurrence(**packed, cu_seqlens=torch.tensor([0, 3, 2, 5]))
    with pytest.raises(ValueError, match="1-D integer"):
        prism_recurrence(**packed, cu_seqlens=torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        prism_recurrence(**packed, cu_seqlens=torch.tensor([0, 3, 5]), initial_state=torch.zeros(1, 2, 4, 3))
