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
    conv = _conv_kernel(fused)
    if halo is None:
        return conv(x, weight, position, silu_channels)
    # Only the first W-1 outputs reach into the halo: they are formed from a window of the halo and
    # x's first inputs, and the rest from x itself, which is not copied (x is a prompt's or a context-
    # parallel rank's whole convolution input).
    head = min(halo.shape[1], x.shape[1])
    window = torch.cat([halo, x[:, :head]], dim=1)
    # The taps are masked by the output token's position; the halo's own positions never matter.
    window_position = torch.cat([position[:, :1].expand(-1, halo.shape[1]), position[:, :head]], dim=1)
    y_head = conv(window, weight, window_position, silu_channels)[:, halo.shape[1]:]
    if head == x.shape[1]:
        return y_head
    y = conv(x, weight, position, silu_channels)
    y[:, :head] = y_head
    return y


def _conv_kernel(fused: bool):
    if fused:
        # Imported here: Triton compiles (or, without a GPU, interprets) on first use.
        from .causal_conv import causal_conv

        return causal_conv
    return causal_depthwise_conv
