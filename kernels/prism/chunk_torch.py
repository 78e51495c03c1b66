"""Chunk-parallel PRISM recurrence in plain PyTorch (PRISM.md section 4); gradients by autograd.

Every chunk of C tokens is solved independently of the state at its start (the triangular solve,
the extra write keys, the intra-chunk outputs), batched over all chunks of all sequences. What is
left depends on the state linearly,

    S_next = P S + b,    O = Q_eff S + O_intra,

so the only sequential part is a loop of one K x K by K x V product per chunk.

Sequences (the rows of the batch, or the pieces of a packed cu_seqlens batch) are each padded to
a multiple of C and laid end to end as chunks; padding tokens carry g = 0 and beta = 0, so they
leave the state untouched, and their outputs are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_megatron.kernels.prism.naive import state_dtype


@dataclass
class ChunkLayout:
    """Where every token goes in the [num_chunks, C] chunk layout, and back."""

    token_of_slot: torch.Tensor  # [num_chunks * C] flat token index, or num_tokens for padding
    slot_of_token: torch.Tensor  # [num_tokens] flat slot index
    chunk_of_step: torch.Tensor  # [max_chunks, N] chunk each sequence is at, num_chunks once done
    num_chunks: int

    @classmethod
    def build(cls, batch: int, length: int, cu_seqlens: torch.Tensor | None, chunk_size: int, device) -> ChunkLayout:
        if cu_seqlens is None:
            starts = torch.arange(batch, device=device) * length
            lengths = torch.full((batch,), length, device=device)
        else:
            cu_seqlens = cu_seqlens.to(device=device, dtype=torch.long)
            starts, lengths = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]
        num_seqs, num_tokens = len(lengths), batch * length
        seq_ids = torch.arange(num_seqs, device=device)
        chunks_per_seq = (lengths + chunk_size - 1) // chunk_size
        first_chunk = torch.cumsum(chunks_per_seq, 0) - chunks_per_seq
        num_chunks = int(chunks_per_seq.sum())
        max_chunks = int(chunks_per_seq.max()) if num_seqs else 0

        seq_of_chunk = torch.repeat_interleave(seq_ids, chunks_per_seq)
        offset = (torch.arange(num_chunks, device=device) - first_chunk[seq_of_chunk])[:, None] * chunk_size
        offset = offset + torch.arange(chunk_size, device=device)
        in_seq = offset < lengths[seq_of_chunk, None]
        token_of_slot = torch.where(in_seq, starts[seq_of_chunk, None] + offset, num_tokens).flatten()

        seq_of_token = torch.repeat_interleave(seq_ids, lengths)
        token_ids = torch.arange(num_tokens, device=device)
        slot_of_token = first_chunk[seq_of_token] * chunk_size + token_ids - starts[seq_of_token]

        step = torch.arange(max_chunks, device=device)[:, None]
        chunk_of_step = torch.where(step < chunks_per_seq, first_chunk + step, num_chunks)
        return cls(token_of_slot, slot_of_token, chunk_of_step, num_chunks)

    def to_chunks(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, T, H, *rest] tokens -> [num_chunks, C, H, *rest] in `dtype`, zeros on padding."""
        flat = x.to(dtype).flatten(0, 1)
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        return flat[self.token_of_slot].unflatten(0, (self.num_chunks, -1))

    def to_tokens(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """[num_chunks, C, H, *rest] -> [B, T, H, *rest], padding dropped."""
        return x.flatten(0, 1)[self.slot_of_token].unflatten(0, (batch, -1))


def chunk_prism_recurrence_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    d: torch.Tensor,
    kx: torch.Tensor | None,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, H, K = q.shape
    L, V = d.shape[3], d.shape[4]
    C = chunk_size
    acc = state_dtype(q.dtype)
    scale = K**-0.5 if scale is None else scale
    layout = ChunkLayout.build(B, T, cu_seqlens, C, q.device)
    num_chunks = layout.num_chunks
    num_seqs = layout.chunk_of_step.shape[1] if cu_seqlens is not None else B

    # Chunk layout with heads ahead of time: [num_chunks, H, C, ...]; the L write keys and
    # write values are stacked along the time axis as L blocks of C rows: [num_chunks, H, L*C, ...].
    def chunked(x):
        return layout.to_chunks(x, acc).transpose(1, 2)

    q_c, k_c, g_c = chunked(q), chunked(k), chunked(g)
    beta_c = layout.to_chunks(beta, acc).permute(0, 2, 3, 1)  # [n, H, L, C]
    w = layout.to_chunks(d, acc).permute(0, 2, 3, 1, 4) * beta_c[..., None]  # b^l d^l: [n, H, L, C, V]
    b1 = beta_c[:, :, 0]
    keys = k_c if L == 1 else torch.cat([k_c, layout.to_chunks(kx, acc).permute(0, 2, 3, 1, 4).flatten(2, 3)], 2)

    # Log decay within each chunk, and decay factors only as exp of differences (all <= 0).
    g_cum = g_c.cumsum(-1)  # [n, H, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (g_cum[..., :, None] - g_cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # M incl.
    gamma = g_cum.exp()
    to_end = (g_cum[..., -1:] - g_cum).exp()  # gamma_C / gamma_r

    # Erasure-key products against all L write keys: block 1 gives A, blocks 2..L give B^l.
    strict = decay * (~causal.diagonal().diag_embed()).to(acc)  # M, strictly lower
    k_keys = (b1[..., None] * k_c @ keys.transpose(-1, -2)) * strict.repeat(1, 1, 1, L)  # [n, H, C, L*C]
    A, B_extra = k_keys[..., :C], k_keys[..., C:]
    rhs = torch.cat([w[:, :, 0] - B_extra @ w[:, :, 1:].flatten(2, 3), (b1 * gamma)[..., None] * k_c], -1)
    eye = torch.eye(C, dtype=acc, device=q.device)
    solved = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    u_free, w_hat = solved[..., :V], solved[..., V:]  # U~ and W^
    values = torch.cat([u_free, w[:, :, 1:].flatten(2, 3)], 2)  # [n, H, L*C, V], state-independent part

    q_keys = (q_c @ keys.transpose(-1, -2)) * decay.repeat(1, 1, 1, L)  # [n, H, C, L*C]
    o_intra = q_keys @ values
    q_eff = gamma[..., None] * q_c - q_keys[..., :C] @ w_hat

    gamma_end = gamma[..., -1, None, None]
    keys_to_end = keys * to_end.repeat(1, 1, L)[..., None]
    transition = gamma_end * torch.eye(K, dtype=acc, device=q.device) - keys_to_end[..., :C, :].transpose(-1, -2) @ w_hat
    state_in = keys_to_end.transpose(-1, -2) @ values

    # The inter-chunk scan; a finished sequence points at an appended identity chunk.
    transition = torch.cat([transition, torch.eye(K, dtype=acc, device=q.device).expand(1, H, K, K)])
    state_in = torch.cat([state_in, state_in.new_zeros(1, H, K, V)])
    if initial_state is None:
        state = q_c.new_zeros(num_seqs, H, K, V)
    else:
        state = initial_state.to(acc)
    chunk_states = []
    for chunk in layout.chunk_of_step:
        chunk_states.append(state)
        state = transition[chunk] @ state + state_in[chunk]
    if num_chunks:
        step_states = torch.stack(chunk_states).flatten(0, 1)  # [max_chunks * N, H, K, V]
        chunk_step = torch.full((num_chunks + 1,), 0, dtype=torch.long, device=q.device)
        chunk_step[layout.chunk_of_step.flatten()] = torch.arange(layout.chunk_of_step.numel(), device=q.device)
        start_states = step_states[chunk_step[:num_chunks]]
        o = scale * (q_eff @ start_states + o_intra)
    else:
        o = q_c.new_zeros(0, H, C, V)
    o = layout.to_tokens(o.transpose(1, 2), B).to(q.dtype)
    return o, (state if output_final_state else None)
