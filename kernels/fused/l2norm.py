"""l2norm over the last dimension: the mixer's q and k, and the solvers' extra keys."""
from __future__ import annotations

import torch

from .fusable import Fusable, upcast


@Fusable
def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dimension (fla's l2norm)."""
    xf = upcast(x)
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)
