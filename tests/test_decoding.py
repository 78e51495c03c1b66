"""Recurrent inference (prism_megatron/decoding.py): prompts prefilled with the chunk form, then a token at a
time with the token loop, give the parallel forward's logits at every position, in float64 on the CPU."""
from __future__ import annotations

import pytest
import torch

from prism_megatron.config import ModelConfig, ParallelConfig
from test_tensor_parallel import run_distributed

SMALL = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, head_v_dim=8,
             ffn_hidden_size=48, conv_size=4)
# Each model of the tests: every solver, L = 1 and 3, tied and untied embeddings.
MODELS = {"prism-L3": dict(solver="prism", solver_steps=3), "prism-L1-tied": dict(solver="prism", solver_steps=1,
                                                                                   tie_embeddings=True),
          "split-L2": dict(solver="split", solver_steps=2), "none-tied": dict(solver="none", tie_embeddings=True)}
# The longest sequence; the others are shorter, so their prompts are too.
LENGTH = 12
SHORTER_BY = (0, 4, 9)


def _model(overrides: dict, parallel: ParallelConfig = ParallelConfig()):
    from prism_megatron.model import PrismLM

    return PrismLM(ModelConfig(**{**SMALL, **overrides}), parallel, seed=0).double()


def _sequences() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, SMALL["vocab_size"], (LENGTH - less,), generator=gen) for less in SHORTER_BY]


def _packed(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences -> one row of documents and its cu_seqlens."""
    bounds = torch.tensor([0] + [len(p) for p in parts]).cumsum(0).to(device=parts[0].device, dtype=torch.int32)
    return torch.cat(parts)[None], bounds


def parallel_logits(model, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each sequence's logits [T_n, vocab] from one parallel forward over the documents packed."""
    tokens, bounds = _packed(sequences)
    with torch.no_grad():
        logits = model.gather_logits(model(tokens, cu_seqlens=bounds))[0]
    return list(logits.split(bounds.diff().tolist()))


def prefill_then_decode(model, sequences: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """Each sequence's logits: all but its last `steps` tokens (at least none) prefilled together, then a
    token at a time (decoding.DecodeStep: on a GPU a CUDA graph from the second step), all sequences in step
    (one that has ended is fed token 0, its logits dropped)."""
    from prism_megatron.decoding import DecodeCache, DecodeStep

    cache = DecodeCache.for_model(model, len(sequences))
    decode = DecodeStep(model, cache)
    prompt_lengths = [max(len(s) - steps, 0) for s in sequences]
    out: list[list[torch.Tensor]] = [[] for _ in sequences]
    with torch.no_grad():
        if any(prompt_lengths):
            tokens, bounds = _packed([s[:n] for s, n in zip(sequences, prompt_lengths)])
            logits = model.gather_logits(model(tokens, cu_seqlens=bounds, cache=cache))[0]
            for n, part in enumerate(logits.split(prompt_lengths)):
                out[n].append(part)
        for step in range(steps):
            index = [n + step for n in prompt_lengths]
            tokens = torch.stack([s[i] if i < len(s) else s.new_zeros(()) for s, i in zip(sequences, index)])
            logits = decode(tokens)
            for n, (s, i) in enumerate(zip(sequences, index)):
                if i < len(s):
                    out[n].append(logits[n:n + 1].clone())  # the next step overwrites a graph's logits
    return [torch.cat(parts) for parts in out]


@pytest.mark.usefixtures("single_process")
@pytest.mark.parametrize("name", MODELS)
def test_prefill_then_decode_equals_the_parallel_forward(name):
    """At every split point, prompts of different lengths (some shorter than the convolution, some
    empty) packed as documents: the state and the convolution reset at each."""
    model = _model(MODELS[name])
    sequences = _sequences()
    want = parallel_logits(model, sequences)
    for split in range(LENGTH + 1):
        got = prefill_then_decode(model, sequences, LENGTH - split)
        for n, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=lambda m: f"split {split}, sequence {n}: {m}")


# The GPU test's shape: head dimensions the fused kernels take, prompts over several chunks.
GPU_SHAPE = dict(vocab_size=512, hidden_size=256, num_layers=2, num_heads=2, head_k_dim=64, head_v_dim=64,
                 ffn_hidden_size=512, conv_size=4)
GPU_LENGTHS = (300, 200, 3)


@pytest.mark.gpu
@pytest.mark.usefixtures("single_process")
@pytest.mark.parametrize("steps", [1, 40, 300])
@pytest.mark.parametrize("name", MODELS)
def test_bf16_decoding_on_gpu_within_bf16_rounding(name, steps):
    """In bf16 on a GPU (the chunk kernel prefills, the fused step decodes) every position's logits are
    about as far from the float64 forward's as the bf16 parallel forward's are: decoding adds no error
    beyond bf16 rounding. The prompts end `steps` tokens before each sequence does."""
    from prism_megatron.model import PrismLM

    # Two draws of one seed: the same weights (a deep copy would copy the layers' process groups). The
    # float64 one runs the PyTorch forms (the Triton kernels take 16- and 32-bit inputs).
    exact, model = (PrismLM(ModelConfig(**{**GPU_SHAPE, **MODELS[name], **backend}), ParallelConfig(), seed=0).cuda()
                    for backend in (dict(kernel_backend="torch", fused_ops="off"), {}))
    exact, model = exact.double(), model.bfloat16()
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, GPU_SHAPE["vocab_size"], (n,), generator=gen).cuda() for n in GPU_LENGTHS]
    want = torch.cat(parallel_logits(exact, sequences))
    parallel_error = (torch.cat(parallel_logits(model, sequences)).double() - want).abs().max()
    decode_error = (torch.cat(prefill_then_decode(model, sequences, steps)).double() - want).abs().max()
    assert decode_error <= 1.5 * parallel_error, (decode_error.item(), parallel_error.item())


@pytest.mark.gpu
@pytest.mark.usefixtures("single_process")
@pytest.mark.parametrize("name", ["prism-L3", "none-tied"])
def test_captured_decode_step_equals_the_eager_forward(name):
    """DecodeStep's CUDA graph, replayed, gives what the eager forward gives from the same cache, step after
    step: it reads and updates the cache's state, convolution inputs and lengths in place, not the
    tensors it was captured with. float32, so that only the order of sums could part them."""
    from prism_megatron.decoding import DecodeCache, DecodeStep

    model = _gpu_model(MODELS[name])
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, GPU_SHAPE["vocab_size"], (n,), generator=gen).cuda() for n in (37, 5)]
    tokens, bounds = _packed(prompts)
    caches = [DecodeCache.for_model(model, len(prompts)) for _ in range(2)]
    decode = DecodeStep(model, caches[0])
    with torch.no_grad():
        for cache in caches:
            model(tokens, cu_seqlens=bounds, cache=cache, logits_to_keep=bounds[1:] - 1)
        for _ in range(6):
            step = torch.randint(0, GPU_SHAPE["vocab_size"], (len(prompts),), generator=gen).cuda()
            want = model(step[:, None], cache=caches[1])[:, 0]
            torch.testing.assert_close(decode(step), want, atol=1e-4, rtol=1e-4)
    assert decode.graph is not None
    with pytest.raises(ValueError, match="the cache holds 2 sequences but the step's tokens have shape \\[3\\]"):
        decode(step.new_zeros(3))
    torch.testing.assert_close(caches[0].lengths, caches[1].lengths, atol=0, rtol=0)
    for captured, eager in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(captured.state, eager.state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(captured.conv_inputs, eager.conv_inputs, atol=0, rtol=0)


def _gpu_model(overrides: dict):
    from prism_megatron.model import PrismLM

    return PrismLM(ModelConfig(**{**GPU_SHAPE, **overrides}), ParallelConfig(), seed=0).cuda()


@pytest.mark.usefixtures("single_process")
def test_rows_continue_the_cache_in_chunks():
    """A forward of several tokens per row continues the cached state and convolution inputs (the
    chunk form from an initial state), as a decode step does token by token."""
    from prism_megatron.decoding import DecodeCache

    model = _model(MODELS["prism-L3"])
    sequences = [s[:6] for s in _sequences()[:2]]
    want = parallel_logits(model, sequences)
    cache = DecodeCache.for_model(model, 2)
    rows = torch.stack(sequences)
    with torch.no_grad():
        got = torch.cat([model(rows[:, :1], cache=cache), model(rows[:, 1:3], cache=cache),
                         model(rows[:, 3:], cache=cache)], 1)
    torch.testing.assert_close(model.gather_logits(got), torch.stack(want), atol=1e-10, rtol=1e-10)


@pytest.mark.usefixtures("single_process")
def test_cache_misuse_is_refused():
    from prism_megatron.decoding import DecodeCache, DecodeStep

    model = _model(MODELS["none-tied"])
    cache = DecodeCache.for_model(model, 2)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        model(tokens, cache=cache)
    with torch.no_grad():
        with pytest.raises(ValueError, match="3 rows"):
            model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
        model(tokens, cache=cache)
        with pytest.raises(ValueError, match="fresh cache"):
            model(tokens.reshape(1, 6), cu_seqlens=torch.tensor([0, 3, 6]), cache=cache)
        with pytest.raises(ValueError, match="holds 2 sequences but the step's tokens have shape \\[3\\]"):
            DecodeStep(model, cache)(torch.zeros(3, dtype=torch.long))


def _tensor_parallel_worker(overrides: dict):
    from megatron.core import parallel_state

    from prism_megatron.process_groups import initialize_parallel

    sequences = _sequences()
    initialize_parallel(ParallelConfig(1), seed=0)
    want = prefill_then_decode(_model(overrides), sequences, steps=LENGTH - 5)
    parallel_state.destroy_model_parallel()
    initialize_parallel(ParallelConfig(2), seed=0)
    got = prefill_then_decode(_model(overrides, ParallelConfig(2)), sequences, steps=LENGTH - 5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.usefixtures("single_process")
def test_prompts_of_many_lengths_keep_the_fused_ops_compiled():
    """Prompts of many lengths at batch 1 and 3, each followed by decoding, then forwards without a cache,
    all with the fused ops (torch.compile): no compiled function reaches torch.compile's recompile limit,
    past which it runs eagerly for every new shape. The final norm once took a view of the last positions,
    whose strides and offset follow the prompt's length, and was compiled again for each."""
    from prism_megatron.decoding import DecodeCache

    torch._dynamo.reset()  # earlier tests' compilations count against the same limit
    model = _model(dict(MODELS["prism-L3"], fused_ops="on")).float()
    gen = torch.Generator().manual_seed(0)
    tokens = lambda batch, length: torch.randint(0, SMALL["vocab_size"], (batch, length), generator=gen)  # noqa: E731
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), torch.no_grad():
        for batch in (1, 3):
            for length in (6, 11, 3, 16, 9):
                cache = DecodeCache.for_model(model, batch)
                model(tokens(batch, length), cache=cache, logits_to_keep=1)
                model(tokens(batch, 1), cache=cache, logits_to_keep=1)
                model(tokens(batch, length), logits_to_keep=1)


@pytest.mark.parametrize("name", ["prism-L3", "split-L2"])
def test_tensor_parallel_decoding_equals_tp1(name):
    """At TP=2 each rank decodes its heads; the gathered logits equal TP=1's."""
    run_distributed(2, _tensor_parallel_worker, MODELS[name])
