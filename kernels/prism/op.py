"""The functional PRISM op and its backend dispatch (contract: docs/PRISM.md section 1)."""
from __future__ import annotations

import functools

import torch

from .chunk_torch import chunk_prism_recurrence_torch
from .naive import naive_prism_recurrence

BACKENDS = ("naive", "torch", "triton")


def _check_shape(name: str, x: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"prism_recurrence: {name} must have shape {meaning} = {list(expected)}, got {list(x.shape)}")


class PackedSequences:
    """cu_seqlens of one packed batch, checked once: the model builds it once per batch and hands it
    to every layer, so no layer reads the bounds back from the device (a host sync per layer). The
    Triton kernel's chunk table, which reads its chunk count back, is built on first use and kept."""

    def __init__(self, cu_seqlens: torch.Tensor, total: int):
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"prism_recurrence: cu_seqlens must be a 1-D integer tensor [N+1], got {cu_seqlens.dtype} {list(cu_seqlens.shape)}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != total or any(e < s for s, e in zip(bounds, bounds[1:])):
            raise ValueError(f"prism_recurrence: cu_seqlens must rise from 0 to T = {total}, got {bounds}")
        self.cu_seqlens = cu_seqlens
        self.total = total
        self.num_seqs = len(bounds) - 1

    @functools.cached_property
    def chunk_table(self):
        from .launch_config import PackedChunkTable

        return PackedChunkTable(self.cu_seqlens.to(torch.int64))


def check_contract(q, k, d, kx, beta, g, initial_state, cu_seqlens) -> PackedSequences | None:
    """Raise ValueError naming the first argument that breaks the op's shape contract; return the
    packed layout (cu_seqlens checked, unless it came as a PackedSequences already)."""
    if q.dim() != 4:
        raise ValueError(f"prism_recurrence: q must be [B, T, H, K], got shape {list(q.shape)}")
    B, T, H, K = q.shape
    _check_shape("k", k, (B, T, H, K), "[B, T, H, K]")
    if d.dim() != 5 or tuple(d.shape[:3]) != (B, T, H) or d.shape[3] < 1:
        raise ValueError(f"prism_recurrence: d must be [B, T, H, L, V] with L >= 1 and B, T, H = {[B, T, H]}, got {list(d.shape)}")
    L, V = d.shape[3], d.shape[4]
    if L == 1 and kx is not None:
        raise ValueError("prism_recurrence: kx must be None when L = 1 (d has one direction per token)")
    if L > 1:
        if kx is None:
            raise ValueError(f"prism_recurrence: kx (the extra write keys) is required when L = {L} > 1")
        _check_shape("kx", kx, (B, T, H, L - 1, K), "[B, T, H, L-1, K]")
    _check_shape("beta", beta, (B, T, H, L), "[B, T, H, L]")
    _check_shape("g", g, (B, T, H), "[B, T, H]")
    N, packed = B, cu_seqlens
    if packed is not None:
        if B != 1:
            raise ValueError(f"prism_recurrence: cu_seqlens needs a packed batch of B = 1, got B = {B}")
        if not isinstance(packed, PackedSequences):
            packed = PackedSequences(packed, T)
        if packed.total != T:
            raise ValueError(f"prism_recurrence: cu_seqlens must rise from 0 to T = {T}, got bounds up to {packed.total}")
        N = packed.num_seqs
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (N, H, K, V), "[N, H, K, V]")
    return packed


def prism_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    d: torch.Tensor,
    kx: torch.Tensor | None,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | PackedSequences | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o = scale * S_t^T q_t under the PRISM state update; returns (o, final_state or None).

    backend "auto" picks "triton" for CUDA tensors and "torch" otherwise. cu_seqlens given as a
    PackedSequences is trusted as checked (no host sync); a tensor is checked here.
    """
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown PRISM backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    packed = check_contract(q, k, d, kx, beta, g, initial_state, cu_seqlens)
    args = (q, k, d, kx, beta, g, scale, initial_state, output_final_state, packed and packed.cu_seqlens)
    if backend == "naive":
        return naive_prism_recurrence(*args)
    if backend == "torch":
        return chunk_prism_recurrence_torch(*args)
    # Imported here: Triton compiles (or, without a GPU, interprets) on first use.
    from .chunk import chunk_prism_recurrence

    return chunk_prism_recurrence(*args, table=packed and packed.chunk_table)
