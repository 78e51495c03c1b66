"""The fused recurrent PRISM step (kernels/prism/fused_recurrent.py) against the token loop
(kernels/prism/naive.py), and decoding as a chain: the chunk form over a prompt, then steps, equals the
chunk form over all tokens. The kernel runs under the CPU interpreter at small shapes (conftest), and at a
real head size in bfloat16 and float16 on CUDA."""
from __future__ import annotations

import pytest
import torch

from prism_megatron.kernels.prism.chunk_torch import chunk_prism_recurrence_torch
from prism_megatron.kernels.prism.fused_recurrent import fused_recurrent_prism
from prism_megatron.kernels.prism.naive import naive_prism_recurrence, state_dtype
from test_prism_triton import DEVICE, detached, make_inputs, rel_rmse

INPUTS = ("q", "k", "d", "kx", "beta", "g")


def reference_step(q, k, d, kx, beta, g, scale, state):
    """The step's CPU path: the token loop from `state`, written back into it."""
    o, final = naive_prism_recurrence(q, k, d, kx, beta, g, scale, initial_state=state, output_final_state=True)
    state.copy_(final)
    return o


def step_inputs(B, T, H, K, V, L, dtype, seed=0):
    """Random inputs of one step (rounded to dtype, on DEVICE) and a different random state per row."""
    inputs = detached(make_inputs(B, T, H, K, V, L, dtype, seed=seed))
    state = inputs.pop("initial_state").to(state_dtype(dtype))
    return inputs, state


def fused_and_reference(inputs, state, scale=None):
    """o and the updated state of the fused step, and of the token loop in float64 on the same inputs."""
    exact = {n: None if x is None else x.cpu().double() for n, x in inputs.items()}
    exact_state = state.cpu().double().clone()
    o_ref = reference_step(**exact, scale=scale, state=exact_state)
    before = state.data_ptr()
    o = fused_recurrent_prism(**inputs, scale=scale, state=state)
    assert state.data_ptr() == before and o.dtype == inputs["q"].dtype
    return o.cpu(), state.cpu(), o_ref, exact_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_step_matches_token_loop(L, T, dtype):
    """Two rows with their own states, K != V and V not a multiple of the kernel's value block."""
    inputs, state = step_inputs(B=2, T=T, H=2, K=16, V=20, L=L, dtype=dtype, seed=10 * L + T)
    o, new_state, o_ref, state_ref = fused_and_reference(inputs, state, scale=0.375)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(o.double(), o_ref, atol=tol, rtol=tol, msg="output")
    torch.testing.assert_close(new_state.double(), state_ref, atol=tol, rtol=tol, msg="state")


def test_step_over_four_directions_and_default_scale():
    inputs, state = step_inputs(B=1, T=2, H=1, K=16, V=8, L=4, dtype=torch.float64)
    o, new_state, o_ref, state_ref = fused_and_reference(inputs, state)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(new_state, state_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("step", [reference_step, fused_recurrent_prism], ids=["reference", "fused"])
def test_prompt_then_steps_equals_parallel_forward(step):
    """Decoding: the chunk form over a prompt with its final state, then steps of 1, 1 and 3 tokens from that
    state, give the outputs and final state of the chunk form over all tokens, in float64."""
    P, steps, L = 37, (1, 1, 3), 3
    inputs, _ = step_inputs(B=2, T=P + sum(steps), H=2, K=16, V=12, L=L, dtype=torch.float64, seed=3)
    o_all, state_all = chunk_prism_recurrence_torch(**inputs, output_final_state=True)

    def tokens(start, end):
        return {n: inputs[n][:, start:end] for n in INPUTS}

    o_prompt, state = chunk_prism_recurrence_torch(**tokens(0, P), output_final_state=True)
    outputs, t = [o_prompt], P
    for n in steps:
        outputs.append(step(**tokens(t, t + n), scale=None, state=state))
        t += n
    torch.testing.assert_close(torch.cat(outputs, 1), o_all, atol=1e-10, rtol=1e-10, msg="outputs")
    torch.testing.assert_close(state, state_all, atol=1e-10, rtol=1e-10, msg="final state")


def test_step_refuses_what_it_cannot_do():
    inputs, state = step_inputs(B=1, T=1, H=1, K=8, V=8, L=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"inference-only .* require grad \(q\): call it under torch.no_grad"):
        fused_recurrent_prism(**{**inputs, "q": inputs["q"].clone().requires_grad_()}, scale=None, state=state)
    with pytest.raises(TypeError, match="state must be torch.float32 for torch.float32 inputs"):
        fused_recurrent_prism(**inputs, scale=None, state=state.double())
    with pytest.raises(ValueError, match="state must be contiguous"):
        fused_recurrent_prism(**inputs, scale=None, state=state.transpose(2, 3))
    with pytest.raises(TypeError, match="inputs, got torch.int32"):
        fused_recurrent_prism(**{n: x.int() for n, x in inputs.items()}, scale=None, state=state)
    with torch.no_grad():  # leaves that require grad are fine where no graph is recorded
        fused_recurrent_prism(**{**inputs, "q": inputs["q"].clone().requires_grad_()}, scale=None, state=state)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("T", [1, 4])
def test_step_16bit_on_gpu(dtype, T):
    """At a real head size: the state is summed in float32 and only o is rounded to 16 bits."""
    inputs, state = step_inputs(B=3, T=T, H=4, K=128, V=128, L=3, dtype=dtype)
    o, new_state, o_ref, state_ref = fused_and_reference(inputs, state)
    assert rel_rmse(o, o_ref) < 5e-3 and rel_rmse(new_state, state_ref) < 1e-5
