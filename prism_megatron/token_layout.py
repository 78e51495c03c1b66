"""How a batch's tokens lie on this rank, as the mixer needs to know it. PrismLM.forward builds one
layout per batch (model.batch_layout) and hands it to every layer, so the mixer has one code path
whatever the layout.

The mixer's activations arrive as rows [B, T, ...]. A layout says how the rows join into the
sequences that the short convolution and the recurrence run over, and what comes before each
row's first token:
- WholeSequences (here): every sequence lies whole on this rank, nothing comes before a row;
- ContextSlice (context_parallel.py): this rank's slice of each sample under context parallelism,
  continuing the previous rank's inputs (the convolution's halo) and state.
- CachedSequences (decoding.py): sequences continuing a decoding cache (a prompt prefilled, then a
  token at a time); its conv_halo hands out the cached last W-1 inputs and keeps the newest ones, its
  recurrence starts from the cached state and keeps the final one. The cache belongs to one layer,
  so PrismLM.forward hands each layer a layout of its own.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from prism_megatron.kernels.conv import short_conv
from prism_megatron.kernels.prism import PackedSequences, prism_recurrence


def join_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows [B, T, ...] -> one packed row [1, B*T, ...]."""
    return x.reshape((1, -1) + x.shape[2:])


class TokenLayout(ABC):
    """What the mixer asks of a batch's layout. conv_halo runs outside the parts that the mixer forms
    again in the backward (it may communicate, and its output is kept); short_conv and recurrence run
    inside them, so in training they may run twice."""

    @abstractmethod
    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [B, T, ...] -> the form the recurrence takes: the same rows, or one packed row [1, B*T, ...]."""

    @abstractmethod
    def conv_halo(self, x: torch.Tensor, size: int) -> torch.Tensor | None:
        """The `size` inputs that come before each row of the short convolution's input x [B, T, C]:
        [B, size, C], or None where nothing does."""

    @abstractmethod
    def short_conv(self, fused: bool, x: torch.Tensor, weight: torch.Tensor, silu_channels: int,
                   halo: torch.Tensor | None) -> torch.Tensor:
        """kernels.conv.short_conv of the rows x [B, T, C] after their halo (conv_halo's), packed."""

    @abstractmethod
    def recurrence(self, q: torch.Tensor, k: torch.Tensor, d: torch.Tensor, kx: torch.Tensor | None,
                   beta: torch.Tensor, g: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
        """prism_recurrence's output o over the packed sequences, each from the state it continues."""


@dataclass(frozen=True)
class WholeSequences(TokenLayout):
    """Every sequence whole on this rank: each row one sequence (packed None) or, with cu_seqlens,
    documents packed over the flat B*T tokens, which the layers then treat as one row.

    position: [B, T] each token's index within its sequence (model.token_positions).
    """

    position: torch.Tensor
    packed: PackedSequences | None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.packed is None else join_rows(x)

    def conv_halo(self, x: torch.Tensor, size: int) -> None:
        return None

    def short_conv(self, fused: bool, x: torch.Tensor, weight: torch.Tensor, silu_channels: int,
                   halo: torch.Tensor | None) -> torch.Tensor:
        return short_conv(fused, self.pack(x), weight, self.pack(self.position), silu_channels, halo)

    def recurrence(self, q: torch.Tensor, k: torch.Tensor, d: torch.Tensor, kx: torch.Tensor | None,
                   beta: torch.Tensor, g: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
        o, _ = prism_recurrence(q, k, d, kx, beta, g, scale=scale, cu_seqlens=self.packed, backend=backend)
        return o
