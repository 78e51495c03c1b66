"""Context parallelism (CP): each sample's tokens are split into contiguous slices over the CP group,
and ranks exchange fixed-size summaries instead of activations (docs/PRISM.md section 6), so the CP size is
not capped by the number of heads.

- The recurrence is linear in (S, d) over value columns. One pass over a rank's slice from the
  augmented state [0 | I] (K x (V+K)) with directions [d | 0] ends in [E | M], where
  S_end = M S_start + E. The ranks all-gather their [E | M] (fp32), scan S_p = M_{p-1} S_{p-1} + E_{p-1}
  over their predecessors, and run the slice again from S_p. The first pass's outputs are discarded
  (one extra pass of the recurrence; the correction of docs/PRISM.md section 6 would avoid it). Gradients,
  dS_p back to earlier ranks included, come from autograd through a differentiable all-gather.
- The short convolution gets the previous rank's last W-1 inputs (a halo), and global positions
  within each document, so a document crossing into the rank carries over and one starting on it resets.
- Each rank's loss is the mean over its own tokens. Slices are equal, so the sample's mean is the
  mean over the CP ranks, and DeepSpeed's gradient average over its data-parallel group (DP x CP, see
  process_groups.py) is the gradient of the whole samples' mean loss.

The loader's batches stay whole; `slice_batch` cuts out this rank's tokens and labels and keeps the
sample's cu_seqlens: per-rank bounds alone could not tell a document starting at the rank's first
token (reset) from one carried over, so the model derives them (`ContextSlice`, the token layout
that the model hands its layers under CP: token_layout.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from prism_megatron.kernels.conv import short_conv
from prism_megatron.kernels.prism import prism_recurrence
from prism_megatron.process_groups import cp_group, cp_rank, cp_size
from prism_megatron.token_layout import TokenLayout, join_rows


class _GatherRanks(torch.autograd.Function):
    """x on every CP rank -> [P, *x.shape]; the backward sums all ranks' gradients and keeps this
    rank's part (all-reduce, as gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(cp_size())]
        dist.all_gather(parts, x.contiguous(), group=cp_group())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=cp_group())
        return grad[cp_rank()]


def gather_ranks(x: torch.Tensor) -> torch.Tensor:
    return _GatherRanks.apply(x)


def slice_batch(batch: dict) -> dict:
    """A collated batch (tokens, labels [B, T], cu_seqlens over the flat B*T) -> this CP rank's
    contiguous slice of every row; cu_seqlens stays the sample's (the model localises it)."""
    if cp_size() == 1:
        return batch
    T = batch["tokens"].shape[1]
    if T % cp_size():
        raise ValueError(f"data.seq_length {T} does not divide by parallel.context_parallel_size {cp_size()}")
    local = T // cp_size()
    part = slice(cp_rank() * local, (cp_rank() + 1) * local)
    return {**batch, "tokens": batch["tokens"][:, part], "labels": batch["labels"][:, part]}


@dataclass(frozen=True)
class ContextSlice(TokenLayout):
    """This rank's slice [r*T/P, (r+1)*T/P) of every row, as the mixer needs it: the local sequences
    are packed into one row, and each continues what the previous rank leaves (its convolution's
    last inputs and its state) where a document crosses into this rank.

    position: [B, T/P] each token's index within its document, counted from the document's start
    on whichever rank; cu_seqlens: the local sequences over the flat B*T/P tokens (a new one at each
    row and each document start); carries: [N] whether a local sequence continues a document from
    the previous rank; first, last: [B] each row's first and last local sequence.
    """

    position: torch.Tensor
    cu_seqlens: torch.Tensor
    carries: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor

    @classmethod
    def build(cls, position: torch.Tensor) -> ContextSlice:
        """position: [B, T] the whole samples' positions within their documents (model.token_positions)."""
        batch, length = position.shape
        local_length, device = length // cp_size(), position.device
        if bool((position[:, 0] != 0).any()):
            raise ValueError("context parallelism needs every row to start a document: cu_seqlens must "
                             "contain each multiple of the sequence length")
        position = position[:, cp_rank() * local_length:(cp_rank() + 1) * local_length]
        starts = position == 0
        sequence_start = starts.clone()
        sequence_start[:, 0] = True
        flat = sequence_start.reshape(-1)
        bounds = torch.cat([flat.nonzero().squeeze(1), torch.tensor([flat.numel()], device=device)])
        index = flat.long().cumsum(0) - 1  # each token's local sequence
        rows = torch.arange(batch, device=device) * local_length
        first, last = index[rows], index[rows + local_length - 1]
        carries = torch.zeros(bounds.numel() - 1, dtype=torch.bool, device=device)
        carries[first] = ~starts[:, 0]
        return cls(position, bounds.to(torch.int32), carries, first, last)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return join_rows(x)

    def conv_halo(self, x: torch.Tensor, size: int) -> torch.Tensor | None:
        """The previous rank's last `size` inputs of each row (zeros on rank 0; the convolution masks
        them out where the document starts on this rank)."""
        if size == 0:
            return None
        if x.shape[1] < size:
            raise ValueError(f"context parallelism needs at least conv_size - 1 = {size} tokens per rank, "
                             f"got {x.shape[1]}")
        halos = gather_ranks(x[:, -size:])
        # Indexed out of all ranks' halos, rank 0 included, so that every rank's backward reaches the
        # all-gather's (collective) backward.
        return torch.cat([torch.zeros_like(halos[:1]), halos[:-1]])[cp_rank()]

    def short_conv(self, fused: bool, x: torch.Tensor, weight: torch.Tensor, silu_channels: int,
                   halo: torch.Tensor | None) -> torch.Tensor:
        # The halo joins each row before the rows are packed.
        return self.pack(short_conv(fused, x, weight, self.position, silu_channels, halo))

    def recurrence(self, q: torch.Tensor, k: torch.Tensor, d: torch.Tensor, kx: torch.Tensor | None,
                   beta: torch.Tensor, g: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
        o, _ = context_parallel_recurrence(q, k, d, kx, beta, g, scale, self, backend)
        return o


def context_parallel_recurrence(q, k, d, kx, beta, g, scale: float, context: ContextSlice,
                                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """prism_recurrence over the packed local sequences of `context` (B = 1), each continuing
    document starting from the state the earlier ranks leave; returns o and each local sequence's
    final state [N, H, K, V] (a document's final state where the sequence ends it)."""
    N, H, K, V = context.carries.numel(), q.shape[2], q.shape[3], d.shape[-1]
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    augmented = torch.cat([d, d.new_zeros(d.shape[:-1] + (K,))], dim=-1)
    start = torch.zeros(N, H, K, V + K, dtype=state_dtype, device=q.device)
    start[context.carries, :, :, V:] = torch.eye(K, dtype=state_dtype, device=q.device)
    _, end = prism_recurrence(q, k, augmented, kx, beta, g, scale=scale, initial_state=start,
                              output_final_state=True, cu_seqlens=context.cu_seqlens, backend=backend)
    summaries = gather_ranks(end[context.last])  # [P, B, H, K, V+K]: [E | M] of each rank's rows
    # Every rank scans all ranks and takes its own state, so that every rank's backward (rank 0's
    # included) reaches the all-gather's collective backward.
    states = [torch.zeros_like(summaries[0, ..., :V])]
    for p in range(cp_size() - 1):
        states.append(summaries[p, ..., V:] @ states[-1] + summaries[p, ..., :V])
    state = torch.stack(states)[cp_rank()]
    # Rows whose first token starts a document take no state (carries is False there).
    carried = state * context.carries[context.first].to(state_dtype)[:, None, None, None]
    initial = torch.zeros(N, H, K, V, dtype=state_dtype, device=q.device).index_add(0, context.first, carried)
    return prism_recurrence(q, k, d, kx, beta, g, scale=scale, initial_state=initial, output_final_state=True,
                            cu_seqlens=context.cu_seqlens, backend=backend)
