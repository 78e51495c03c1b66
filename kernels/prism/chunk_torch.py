"""Chunk-parallel PRISM recurrence in plain PyTorch (docs/PRISM.md section 4); gradients by autograd.

Every chunk of C tokens is solved independently of the state at its start (the triangular solve,
the extra write keys, the intra-chunk outputs), batched over all heads and all chunks of all
sequences. What is left depends on the chunk's start state S linearly,

    S_next = P S + b,    O = Q_eff S + O_intra,

so the only sequential part is one K x K by K x V product per chunk.

Sequences (the rows of the batch, or the pieces of a packed cu_seqlens batch) are each cut into
chunks, the last one padded; padding tokens get g = 0 and beta = 0, so they leave the state
untouched, and their outputs are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_megatron.kernels.prism.naive import state_dtype


@dataclass
class StepMajorChunkLayout:
    """Where every token goes in the [H, num_chunks, C] chunk layout, and back.

    Chunks are numbered step-major: the first chunk of every sequence, then every second chunk,
    and so on, with the sequences ranked longest first. The sequences still running at a step of
    the inter-chunk scan are then a prefix of the ranking, and that step's chunks one block.
    """

    token_of_slot: torch.Tensor  # [num_chunks * C] flat token index (token 0 on padding slots)
    in_sequence: torch.Tensor  # [num_chunks, C] False on padding slots
    slot_of_token: torch.Tensor  # [B * T] flat slot index
    seq_of_rank: torch.Tensor  # [N] the sequences, longest first
    rank_of_seq: torch.Tensor  # [N] inverse of seq_of_rank
    chunks_per_step: list[int]  # how many sequences are still running at each scan step

    @classmethod
    def build(cls, batch: int, length: int, cu_seqlens: torch.Tensor | None, chunk_size: int, device) -> StepMajorChunkLayout:
        C = chunk_size
        if cu_seqlens is None:
            starts = torch.arange(batch, device=device) * length
            lengths = torch.full((batch,), length, device=device)
        else:
            cu_seqlens = cu_seqlens.to(device=device, dtype=torch.long)
            starts, lengths = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]
        num_seqs = len(lengths)
        chunks_per_seq = (lengths + C - 1) // C
        seq_of_rank = torch.argsort(chunks_per_seq, descending=True, stable=True)
        rank_of_seq = torch.empty_like(seq_of_rank)
        rank_of_seq[seq_of_rank] = torch.arange(num_seqs, device=device)

        steps = torch.arange(int(chunks_per_seq.max()), device=device)
        chunks_per_step = (chunks_per_seq > steps[:, None]).sum(1)
        first_of_step = torch.cumsum(chunks_per_step, 0) - chunks_per_step
        step_of_chunk = torch.repeat_interleave(steps, chunks_per_step)
        chunk_ids = torch.arange(len(step_of_chunk), device=device)
        seq_of_chunk = seq_of_rank[chunk_ids - first_of_step[step_of_chunk]]
        offset = step_of_chunk[:, None] * C + torch.arange(C, device=device)  # position in its sequence
        in_sequence = offset < lengths[seq_of_chunk, None]
        token_of_slot = torch.where(in_sequence, starts[seq_of_chunk, None] + offset, 0).flatten()

        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths)
        offset = torch.arange(batch * length, device=device) - starts[seq_of_token]
        slot_of_token = (first_of_step[offset // C] + rank_of_seq[seq_of_token]) * C + offset % C
        return cls(token_of_slot, in_sequence, slot_of_token, seq_of_rank, rank_of_seq, chunks_per_step.tolist())

    def to_chunks(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, T, H, *rest] tokens -> [H, num_chunks, C, *rest] in `dtype` (padding slots hold junk)."""
        heads_first = x.movedim(2, 0).flatten(1, 2)
        return heads_first.index_select(1, self.token_of_slot).unflatten(1, self.in_sequence.shape).to(dtype)

    def to_tokens(self, x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """[H, num_chunks, C, *rest] -> [B, T, H, *rest], padding dropped."""
        tokens = x.flatten(1, 2).index_select(1, self.slot_of_token).unflatten(1, (batch, length))
        return tokens.movedim(0, 2).contiguous()


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
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PRISM recurrence (contract: docs/PRISM.md section 1); returns (o, final_state or None).

    The default chunk is 32 tokens, not 64: short packed documents pad less, and long ones run no
    slower (docs/PERFORMANCE.md).
    """
    B, T, H, K = q.shape
    L, V = d.shape[3], d.shape[4]
    C = chunk_size
    acc = state_dtype(q.dtype)
    scale = K**-0.5 if scale is None else scale
    num_seqs = B if cu_seqlens is None else len(cu_seqlens) - 1
    state = q.new_zeros(num_seqs, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    if B * T == 0:
        return q.new_zeros(B, T, H, V), (state if output_final_state else None)
    layout = StepMajorChunkLayout.build(B, T, cu_seqlens, C, q.device)

    # [H, n, C, ...] for n chunks; the L write keys (k first, then kx) and the L write values are
    # stacked as L blocks of C rows: [H, n, L*C, ...].
    q_c, k_c = layout.to_chunks(q, acc) * scale, layout.to_chunks(k, acc)
    g_c = layout.to_chunks(g, acc) * layout.in_sequence
    beta_c = layout.to_chunks(beta, acc) * layout.in_sequence[..., None]  # [H, n, C, L]
    w1, w_extra = (layout.to_chunks(d, acc) * beta_c[..., None]).transpose(2, 3).split([1, L - 1], 2)  # b^l d^l
    w1, w_extra = w1.squeeze(2), w_extra.flatten(2, 3)
    b1 = beta_c[..., 0]
    keys = k_c
    if L > 1:
        keys = torch.cat([k_c[:, :, None], layout.to_chunks(kx, acc).transpose(2, 3)], 2).flatten(2, 3)
    n = keys.shape[1]

    # Log decay within each chunk, and decay factors only as exp of differences (all <= 0).
    g_cum = g_c.cumsum(-1)  # [H, n, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (g_cum[..., :, None] - g_cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # M, incl.
    gamma = g_cum.exp()
    to_end = (g_cum[..., -1:] - g_cum).exp()  # gamma_C / gamma_r

    # Erasure keys against all L write keys: block 1 gives A, blocks 2..L give B^l.
    k_keys = ((b1[..., None] * k_c) @ keys.mT).view(H, n, C, L, C) * decay.tril(-1)[..., None, :]
    A, B_extra = k_keys.split([1, L - 1], 3)
    A, B_extra = A.squeeze(3), B_extra.flatten(-2)
    rhs = torch.cat([w1 - B_extra @ w_extra, (b1 * gamma)[..., None] * k_c], -1)
    solved = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # T = (I + A)^-1
    u_free, w_hat = solved.split([V, K], -1)  # U~ and W^
    values = torch.cat([u_free, w_extra], 2)  # [H, n, L*C, V]: the state-independent write values

    q_keys = (q_c @ keys.mT).view(H, n, C, L, C) * decay[..., None, :]
    o_intra = q_keys.flatten(-2) @ values
    q_eff = gamma[..., None] * q_c - q_keys[..., 0, :] @ w_hat

    keys_to_end = (keys.view(H, n, L, C, K) * to_end[:, :, None, :, None]).flatten(2, 3)
    transition = gamma[..., -1, None, None] * torch.eye(K, dtype=acc, device=q.device) - keys_to_end[:, :, :C].mT @ w_hat
    state_in = keys_to_end.mT @ values

    # The inter-chunk scan, over the still-running prefix of the ranked sequences at each step.
    state = state.movedim(1, 0).index_select(1, layout.seq_of_rank)  # [H, N, K, V]
    start_states = []
    steps = zip(transition.split(layout.chunks_per_step, 1), state_in.split(layout.chunks_per_step, 1))
    for step_transition, step_in in steps:
        running = state[:, : step_transition.shape[1]]
        start_states.append(running)
        state = torch.cat([step_transition @ running + step_in, state[:, running.shape[1] :]], 1)
    o = q_eff @ torch.cat(start_states, 1) + o_intra
    o = layout.to_tokens(o, B, T).to(q.dtype)
    final_state = state.index_select(1, layout.rank_of_seq).movedim(0, 1).contiguous()
    return o, (final_state if output_final_state else None)
