"""prism_megatron.flops against independent counts: torch's FlopCounterMode over the model's weight
products and over the PyTorch chunk form, and the Triton kernels' own products counted as Triton's
interpreter runs them (docs/FLOPS.md)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from prism_megatron import flops, token_layout
from prism_megatron.config import ModelConfig, ParallelConfig
from prism_megatron.kernels.prism.chunk import chunk_prism_recurrence
from prism_megatron.kernels.prism.chunk_torch import chunk_prism_recurrence_torch
from prism_megatron.layers import ALIGN_COLUMNS
from prism_megatron.mixer import InProjLayout
from prism_megatron.model import PrismLM

C = 64  # the Triton kernels' chunk
SMALL = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, head_k_dim=16, head_v_dim=8,
                    ffn_hidden_size=48, solver_steps=3, kernel_backend="torch")
CONFIGS = {
    "prism-L3": SMALL,
    "prism-L2-tied": dataclasses.replace(SMALL, solver_steps=2, tie_embeddings=True),
    "solver-none": dataclasses.replace(SMALL, solver="none"),
    "split-L2": dataclasses.replace(SMALL, solver="split", solver_steps=2),
    # b^1 from x: one strength vector fewer in the solver, one part more in in_proj.
    "prism-L2-erase-from-input": dataclasses.replace(SMALL, solver_steps=2, solver_erase_strength="input"),
}


def recurrence_inputs(T: int, H: int, K: int, V: int, L: int, dtype=torch.float32, requires_grad=False) -> dict:
    gen = torch.Generator().manual_seed(0)

    def leaf(x):
        return x.to(dtype).requires_grad_(requires_grad)

    def unit(*shape):
        return leaf(F.normalize(torch.randn(*shape, generator=gen), dim=-1))

    return dict(q=unit(1, T, H, K), k=unit(1, T, H, K), d=leaf(torch.randn(1, T, H, L, V, generator=gen)),
                kx=unit(1, T, H, L - 1, K) if L > 1 else None, beta=leaf(torch.rand(1, T, H, L, generator=gen)),
                g=(-0.5 * torch.rand(1, T, H, generator=gen)).requires_grad_(requires_grad))


def elementwise_recurrence(q, k, d, kx, beta, g, scale, cu_seqlens, backend):
    """A stand-in for the recurrence without matrix products that still uses every input (so every
    weight gets its gradient)."""
    keys = (q * k).sum(-1)
    if kx is not None:
        keys = keys + (q[:, :, :, None] * kx).sum((-2, -1))
    return (d * beta[..., None]).sum(3) * (keys * g)[..., None], None


@pytest.mark.parametrize("name", CONFIGS)
def test_weight_products_cost_six_flops_per_weight(single_process, monkeypatch, name):
    """With the recurrence replaced by elementwise work, torch counts a forward and backward of the model
    at exactly gemm a token plus the LM head's logits, which the fused cross-entropy forms again in its
    backward, and the zero rows that align in_proj's width; and the parameters give N of 6N."""
    cfg = CONFIGS[name]
    model = PrismLM(cfg, ParallelConfig())
    monkeypatch.setattr(token_layout, "prism_recurrence", elementwise_recurrence)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens, tokens).backward()
    counted = flops.step_flops(cfg, 40)
    recomputed_logits = 2 * cfg.hidden_size * cfg.vocab_size
    in_proj_padding = 6 * cfg.num_layers * cfg.hidden_size * (-sum(InProjLayout.for_config(cfg).sizes) % ALIGN_COLUMNS)
    assert counter.get_total_flops() == tokens.numel() * (counted.gemm + recomputed_logits + counted.solver_extra
                                                          + in_proj_padding)

    embedding = 0 if cfg.tie_embeddings else model.embedding.weight.numel()
    assert counted.six_n == 6 * (model.num_parameters() - embedding)


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the products of Triton's CPU interpreter")
@pytest.mark.parametrize("L,K,V,T", [(1, 16, 32, 100), (3, 16, 32, 100), (2, 32, 16, 128)])
def test_recurrence_counts_the_triton_kernels_products(monkeypatch, L, K, V, T):
    """Every tl.dot of the forward and the backward kernels, as the interpreter runs them (a partial last
    chunk costs a whole one): the forward is chunk_flops' less the triangular inverse's row-by-row part,
    which is not a product; the backward is chunk_flops' backward plus what it recomputes."""
    from triton.runtime import interpreter

    counted = [0]
    create_dot = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, a, b, *args):
        (m, k), n = a.data.shape, b.data.shape[1]
        counted[0] += 2 * m * k * n
        return create_dot(self, a, b, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting_dot)
    H = 2
    x = recurrence_inputs(T, H, K, V, L, torch.bfloat16, requires_grad=True)
    o, _ = chunk_prism_recurrence(**x)
    forward, counted[0] = counted[0], 0
    o.float().sum().backward()

    chunk, chunks = flops.chunk_flops(K, V, L), H * -(-T // C)
    substitution = 4 * 15 * 2 * 16 * 16  # solve.py: each of 4 diagonal blocks of 16 rows, 15 rows below the first
    assert forward == chunks * (chunk.forward - substitution)
    assert counted[0] == chunks * (chunk.backward + chunk.recomputed)
    step = flops.step_flops(ModelConfig(num_layers=1, num_heads=H, head_k_dim=K, head_v_dim=V, solver_steps=L), T)
    assert step.recurrence_forward * T == pytest.approx(chunks * chunk.forward, rel=1e-12)


@pytest.mark.parametrize("L,K,V", [(1, 16, 32), (3, 16, 32), (2, 32, 16)])
def test_recurrence_forward_reconciles_with_the_torch_chunk_form(L, K, V):
    """The PyTorch chunk form at the kernels' chunk, counted by FlopCounterMode, shares the products of
    the output, the state's write terms and every extra key with the Triton forward, and differs by
    named products: the Triton kernels apply an explicit T = (I + A)^-1 (solve.py) to X and R and form
    U = U~ - W^ S_0 per chunk; the torch form forms A in full, solves triangular systems (which
    FlopCounterMode does not count), and carries the state through a K x K transition matrix
    (chunk_torch.py's q_eff, transition and scan)."""
    H, T = 2, 2 * C
    with FlopCounterMode(display=False) as counter:
        chunk_prism_recurrence_torch(**recurrence_inputs(T, H, K, V, L), chunk_size=C)
    p_k, p_v, p_s = 2 * C * C * K, 2 * C * C * V, 2 * C * K * V
    solve = 10 * 2 * 16 * 16 * K + 16 * 2 * 16**3 + 4 * 15 * 2 * 16 * 16  # A's blocks, block merges, substitution
    triton_only = solve + p_k + p_v + p_s  # T, T X, T R, W^ S_0
    torch_only = 2 * p_k + 2 * C * K * K + 2 * K * K * V  # A in full, Q K^T W^; the transition, the scan
    chunks = H * T // C
    assert counter.get_total_flops() == chunks * (flops.chunk_flops(K, V, L).forward - triton_only + torch_only)


def test_solver_none_runs_the_recurrence_of_prism_with_one_key():
    """Gated DeltaNet (solver none) and PRISM at L = 1 run the same recurrence; they differ in the weights
    only: the anchor's in_proj part and the solver's for PRISM, the strength logits' part for none."""
    prism_l1 = flops.step_flops(dataclasses.replace(SMALL, solver_steps=1), 4096)
    none = flops.step_flops(dataclasses.replace(SMALL, solver="none"), 4096)
    assert (none.recurrence_forward, none.recurrence_backward) == (prism_l1.recurrence_forward,
                                                                  prism_l1.recurrence_backward)
    D, H, V = SMALL.hidden_size, SMALL.num_heads, SMALL.head_v_dim
    per_layer = D * H * V + H * (V * V + V) - D * H
    assert prism_l1.gemm - none.gemm == 6 * SMALL.num_layers * per_layer
    assert flops.step_flops(SMALL, 4096).recurrence_forward > prism_l1.recurrence_forward
