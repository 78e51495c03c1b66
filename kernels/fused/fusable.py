"""The torch.compile glue of the elementwise ops: `Fusable` pairs a PyTorch function (the reference)
with its compiled form, and `upcast` is the float32 arithmetic those functions share."""
from __future__ import annotations

import functools

import torch
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for the float64 reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Fusable:
    """fn (the PyTorch reference) and fn through torch.compile, which fuses its elementwise chain and
    float32 round trips into a kernel or two each way; called as f(fused, *args)."""

    def __init__(self, fn):
        functools.update_wrapper(self, fn)
        self.eager = fn
        self.compiled = torch.compile(fn)

    def __call__(self, fused: bool, *args, **kwargs):
        if not fused:
            return self.eager(*args, **kwargs)
        # Parameters go in as plain views. Inductor takes a parameter for a static input: if the first
        # one it compiled with was 16-byte aligned, its kernel assumes every later one is and skips the
        # check (and copy) it does for other inputs. DeepSpeed packs the parameters into one flat buffer,
        # so one that follows, say, A_log of 6 heads is not aligned, and the GPU faults on it
        # ("misaligned address").
        args = [a.view_as(a) if isinstance(a, nn.Parameter) else a for a in args]
        return self.compiled(*args, **kwargs)
