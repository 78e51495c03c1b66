"""Recurrent inference: a prompt prefilled with the chunk kernel, then a token at a time with the exact
recurrence (docs/PRISM.md Eq. 18), in memory and time per token independent of the position.

    cache = DecodeCache.for_model(model, num_sequences)
    logits = model(prompts, cu_seqlens=bounds, cache=cache)  # prefill: one document per sequence
    logits = model(next_tokens[:, None], cache=cache)        # then [N, 1] (or [N, T]) continuing each
    decode = DecodeStep(model, cache)                        # or, on a GPU, a token at a time as a CUDA graph
    logits = decode(next_tokens)                             #   (the gathered logits [N, vocab])

A DecodeCache holds, per layer, the float32 state [N, H_local, K, V] of each sequence and its short
convolution's last W-1 inputs [N, W-1, C_local]. For each forward it hands every layer a layout of its
own (CachedSequences, a TokenLayout: token_layout.py), so the mixer runs its one code path: the layout
gives the convolution the cached inputs and keeps the newest, starts the recurrence from the cached
state and keeps the final one.

Prompts of different lengths prefill together as documents packed into one row (cu_seqlens, a fresh
cache): each ends in its own state. A prefix shorter than the convolution is exact too: the cached
inputs from before a sequence's start are zeros that the taps never reach (the token's position
masks them, as it does at a document reset).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_megatron.kernels.prism import PackedSequences, prism_recurrence
from prism_megatron.kernels.prism.naive import state_dtype
from prism_megatron.model import token_positions
from prism_megatron.token_layout import WholeSequences, join_rows


@dataclass
class LayerMemory:
    """One layer's memory of N sequences: the recurrent state [N, H_local, K, V] (float32; float64 for a
    float64 model) and the short convolution's last W-1 inputs [N, W-1, C_local]."""

    state: torch.Tensor
    conv_inputs: torch.Tensor


@dataclass(frozen=True)
class CachedSequences(WholeSequences):
    """One layer's layout for a forward that continues the cached sequences: rows [N, T] (each row one
    sequence) or, on a fresh cache, documents packed over the flat tokens (cu_seqlens, one per sequence)."""

    memory: LayerMemory

    def conv_halo(self, x: torch.Tensor, size: int) -> torch.Tensor | None:
        # The cached inputs are updated in place (a captured DecodeStep replays on the same tensors), so the
        # halo handed out is the joined copy's.
        kept = self.memory.conv_inputs
        if self.packed is None:
            joined = torch.cat([kept, x[:, max(x.shape[1] - size, 0):]], dim=1)  # x's last inputs: it may be a prompt
            kept.copy_(joined[:, joined.shape[1] - size:])
            return joined[:, :size]
        # A fresh cache: nothing comes before the documents; keep each one's last inputs.
        bounds = self.packed.cu_seqlens.to(device=x.device, dtype=torch.long)
        index = bounds[1:, None] - size + torch.arange(size, device=x.device)
        inside = index >= bounds[:-1, None]
        taken = join_rows(x)[0, index.clamp(min=0)]
        kept.copy_(torch.where(inside[..., None], taken, torch.zeros_like(taken)))
        return None

    def recurrence(self, q: torch.Tensor, k: torch.Tensor, d: torch.Tensor, kx: torch.Tensor | None,
                   beta: torch.Tensor, g: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
        state = self.memory.state
        if self.packed is None and q.shape[1] == 1:
            if q.is_cuda:
                from prism_megatron.kernels.prism.fused_recurrent import fused_recurrent_prism

                return fused_recurrent_prism(q, k, d, kx, beta, g, scale, state)
            backend = "naive"
        o, final = prism_recurrence(q, k, d, kx, beta, g, scale=scale, initial_state=state, output_final_state=True,
                                    cu_seqlens=self.packed, backend=backend)
        state.copy_(final)
        return o


class DecodeCache:
    """Every layer's memory of N sequences, and how many tokens each has seen."""

    def __init__(self, layers: list[LayerMemory]):
        self.layers = layers
        first = layers[0].state
        self.lengths = torch.zeros(first.shape[0], dtype=torch.long, device=first.device)
        self.fresh = True

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_sequences: int) -> DecodeCache:
        """An empty cache of `num_sequences` for this TP rank's shard of a PrismLM."""
        layers = []
        for block in model.layers:
            mixer = block.mixer
            weight = mixer.conv_weight
            channels, width = weight.shape
            state = torch.zeros(num_sequences, mixer.heads, mixer.head_k_dim, mixer.head_v_dim,
                                dtype=state_dtype(weight.dtype), device=weight.device)
            conv_inputs = torch.zeros(num_sequences, width - 1, channels, dtype=weight.dtype, device=weight.device)
            layers.append(LayerMemory(state, conv_inputs))
        return cls(layers)

    @property
    def num_sequences(self) -> int:
        return self.lengths.shape[0]

    def select(self, index: torch.Tensor) -> None:
        """Keep the sequences at `index` [N'] (repeats allowed), in that order: how a search that
        forks or drops sequences (beam search) reorders the memory."""
        index = index.to(self.lengths.device)
        for memory in self.layers:
            memory.state = memory.state.index_select(0, index)
            memory.conv_inputs = memory.conv_inputs.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)

    def layouts(self, batch: int, length: int, cu_seqlens: torch.Tensor | None) -> list[CachedSequences]:
        """Each layer's layout for tokens [batch, length] continuing the sequences (cu_seqlens: documents
        over the flat tokens, one per sequence, on a fresh cache); counts the tokens as seen."""
        device = self.lengths.device
        if cu_seqlens is None:
            if batch != self.num_sequences:
                raise ValueError(f"the cache holds {self.num_sequences} sequences but the tokens have {batch} rows")
            position = self.lengths[:, None] + torch.arange(length, device=device)
            packed = None
            self.lengths += length
        else:
            if not self.fresh:
                raise ValueError("cu_seqlens (prompts packed as documents) needs a fresh cache: "
                                 "continue a cache's sequences with rows [N, T]")
            packed = PackedSequences(cu_seqlens.to(device), batch * length)
            if packed.num_seqs != self.num_sequences:
                raise ValueError(f"the cache holds {self.num_sequences} sequences but cu_seqlens has {packed.num_seqs} documents")
            position = token_positions(batch, length, cu_seqlens, device)
            self.lengths.copy_(packed.cu_seqlens.diff())
        self.fresh = False
        return [CachedSequences(position, packed, memory) for memory in self.layers]


class DecodeStep:
    """The decode forward of a model and its cache: tokens [N] (the next token of each sequence) -> the
    logits of the position after them [N, vocab], gathered on every TP rank.

    On a GPU the step is captured once as a CUDA graph and then replayed: a decoded token otherwise costs
    the host's launching of every layer's kernels, which at small batches takes longer than the kernels
    (docs/PERFORMANCE.md). The first step runs eagerly (compilation, autotuning and lazy initialisation
    happen there, as capturing needs), the second captures. The graph reads and updates the cache's
    tensors in place: while a DecodeStep is used its cache keeps its sequences (no select), and the
    logits it returns are overwritten by its next step."""

    def __init__(self, model: torch.nn.Module, cache: DecodeCache):
        self.model, self.cache = model, cache
        self.tokens: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.gather_logits(self.model(tokens, cache=self.cache))[:, 0]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape != (self.cache.num_sequences,):
            # The graph would replay whatever it was captured with: say so before it does.
            raise ValueError(f"the cache holds {self.cache.num_sequences} sequences but the step's tokens have "
                             f"shape {list(tokens.shape)}")
        tokens = tokens[:, None]
        if not tokens.is_cuda:
            return self.forward(tokens)
        if self.tokens is None:
            # On the current stream: a stream of its own would get a cuBLAS workspace of its own (32 MiB on
            # Hopper) that outlives the step.
            self.tokens = tokens.clone()
            return self.forward(self.tokens)
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.forward(self.tokens)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits: temperature 0 is greedy (the most likely token);
    otherwise softmax(logits / temperature) restricted to the top_k most likely tokens (0: all) and to
    the smallest set of them whose probability reaches top_p."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def draw(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """logits [N, vocab] -> tokens [N]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
            ordered = ordered.masked_fill(before >= self.top_p, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def generate(model, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, eos_id: int | None = None,
             generator: torch.Generator | None = None, on_tokens=None) -> list[list[int]]:
    """Each prompt's continuation of up to `max_new_tokens` (ending at eos_id, which it includes): the
    prompts prefilled together, then a token per step for all. on_tokens(step, tokens [N]) is called
    after each step. Prompts must not be empty. Every TP rank calls it with the same generator state."""
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    cache = DecodeCache.for_model(model, len(prompts))
    decode = DecodeStep(model, cache)
    tokens = torch.tensor([t for p in prompts for t in p], device=device)[None]
    bounds = torch.tensor([0] + lengths, device=device).cumsum(0)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with torch.no_grad():
        last = bounds[1:] - 1  # each prompt's last position in the packed row
        logits = model.gather_logits(model(tokens, cu_seqlens=bounds, cache=cache, logits_to_keep=last))[0]
        for step in range(max_new_tokens):
            new = sampling.draw(logits, generator)
            if on_tokens is not None:
                on_tokens(step, new)
            for n, t in enumerate(new.tolist()):
                if not done[n]:
                    out[n].append(t)
                    done[n] = t == eos_id
            if all(done) or step + 1 == max_new_tokens:
                break
            logits = decode(new)
    return out
