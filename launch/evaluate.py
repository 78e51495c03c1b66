"""The validation loss: the mean over the same held-out samples at every evaluation and at every
data-parallel size (split over the DP ranks), so that the val curve compares like with like, also
across a resume at another layout."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from prism_megatron.launch import preemption
from prism_megatron.launch.engine import forward


class Evaluator:
    """Evaluates `engine` over one pass of `loader` (a DistributedBatchLoader built with drop_last=False,
    or a progress bar over one), which hands every rank the same number of rounds: each round checks
    for a stop request, a collective."""

    def __init__(self, loader: Iterable[dict | None], engine, dp_group, stop: preemption.StopRequest,
                 watchdog: preemption.Watchdog):
        self.loader, self.engine, self.dp_group = loader, engine, dp_group
        self.stop, self.watchdog = stop, watchdog

    def __call__(self) -> float | None:
        """The mean validation loss; None if a stop request cut the evaluation short."""
        total = torch.zeros(2, dtype=torch.float64, device=self.engine.device)  # loss x samples, samples
        self.engine.eval()
        try:
            with torch.no_grad():
                for batch in self.loader:
                    self.watchdog.beat("an evaluation batch")
                    if self.stop.requested(self.engine.device):
                        return None
                    if batch is None:  # this rank's samples ran out before the others'
                        continue
                    samples = len(batch["tokens"])
                    loss = forward(self.engine, batch).double()
                    total += torch.stack([loss * samples, total.new_tensor(float(samples))])
        finally:
            self.engine.train()
        dist.all_reduce(total, group=self.dp_group)
        return (total[0] / total[1]).item()
