"""Every rank's RNG states, as tensors and ints (nothing that needs pickle to load)."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


def gather_rng_states() -> list[dict]:
    """This process's Python, NumPy, torch (and CUDA) RNG states, gathered from every rank."""
    _, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": torch.tensor(mt, dtype=torch.int64), "python_gauss": gauss,
             "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "numpy_pos": int(pos),
             "numpy_gauss": [int(has_gauss), float(cached)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def set_rng_state(state: dict) -> None:
    """Restore one rank's entry of `gather_rng_states`."""
    random.setstate((3, tuple(state["python"].tolist()), state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
