"""The short convolution's reference in PyTorch: what the Triton kernel (causal_conv.py) is tested
against, and what the model runs where its ops are not fused."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, position: torch.Tensor,
                          silu_channels: int = 0) -> torch.Tensor:
    """y_t = act(sum_s weight[:, W-1-s] * x_{t-s} over the taps s with position_t >= s), act = SiLU on
    the first silu_channels channels.

    x: [B, T, C]; weight: [C, W]; position: [B, T], each token's index within its sequence,
    so the window never reaches into the previous packed document (cu_seqlens) or row.
    """
    W = weight.shape[1]
    y = x * weight[:, W - 1]
    for s in range(1, min(W, x.shape[1])):
        shifted = F.pad(x[:, :-s], (0, 0, s, 0))
        y = y + (shifted * (position >= s)[..., None].to(x.dtype)) * weight[:, W - 1 - s]
    return torch.cat([F.silu(y[..., :silu_channels]), y[..., silu_channels:]], -1)
