"""The mixer's short convolution: a causal depthwise convolution with document resets, then SiLU on
its leading channels. `naive.py` is the reference, `causal_conv.py` the Triton kernels, `short_conv`
the entry point."""
from __future__ import annotations

import torch

from .naive import causal_depthwise_conv


def short_conv(fused: bool, x: torch.Tensor, weight: torch.Tensor, position: torch.Tensor, silu_channels: int,
               halo: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, T, C], weight [C, W], position [B, T] (each token's index within its sequence) -> y [B, T, C]:
    the Triton kernel where fused, the reference otherwise.

    halo [B, W-1, C]: the inputs just before each row, where its first sequence began earlier (the
    previous context-parallel rank's last inputs; a decoding cache's). The taps reach into it as
    far as x's positions allow.
    """
    if halo is not None:
        x = torch.cat([halo, x], dim=1)
        # The taps are masked by the output token's position; the halo's own positions never matter.
        position = torch.cat([position[:, :1].expand(-1, halo.shape[1]), position], dim=1)
    if fused:
        # Imported here: Triton compiles (or, without a GPU, interprets) on first use.
        from .causal_conv import causal_conv

        y = causal_conv(x, weight, position, silu_channels)
    else:
        y = causal_depthwise_conv(x, weight, position, silu_channels)
    return y if halo is None else y[:, halo.shape[1]:]
