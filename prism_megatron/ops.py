"""The functional PRISM op and its backend dispatch (contract: PRISM.md section 1)."""
from __future__ import annotations

import torch

BACKENDS = ("naive", "torch", "triton")


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
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o = scale * S_t^T q_t under the PRISM state update; returns (o, final_state or None)."""
    if backend == "naive":
        from prism_megatron.kernels.prism.naive import naive_prism_recurrence

        return naive_prism_recurrence(q, k, d, kx, beta, g, scale, initial_state, output_final_state, cu_seqlens)
    raise ValueError(f"unknown PRISM backend {backend!r}; choose one of {('auto',) + BACKENDS}")
