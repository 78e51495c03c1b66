"""The PRISM language model: vocab-parallel embedding, pre-norm residual blocks of a PRISM mixer and
a SwiGLU MLP, a final RMSNorm, a column-parallel LM head and vocab-parallel cross-entropy.

    model = PrismLM(cfg, parallel)                 # after process_groups.initialize_parallel
    loss = model(tokens, labels, cu_seqlens=None)  # mean token cross-entropy, float32 (under CP: of this
                                                   # rank's slice; context_parallel.py says why that is right)
    logits = model(tokens)                         # [B, T, padded vocab / TP], padding at -inf
    logits = model(tokens, cache=cache)            # the same, continuing a decoding cache's sequences
                                                   # (decoding.py: prefill, then a token at a time)

Each forward describes once how the batch's tokens lie on this rank (batch_layout: a TokenLayout of
token_layout.py) and hands that to every layer; with a cache, each layer gets a layout of its own.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
from megatron.core import ModelParallelConfig, tensor_parallel
from torch import nn
from torch.utils.checkpoint import checkpoint

from prism_megatron.config import ModelConfig, ParallelConfig
from prism_megatron.context_parallel import ContextSlice
from prism_megatron.kernels.fused.linear_cross_entropy import linear_cross_entropy
from prism_megatron.kernels.prism import PackedSequences
from prism_megatron.layers import (ColumnParallelLinear, RMSNorm, SwiGLUMLP, megatron_config_for, no_megatron_init,
                                   use_fused)
from prism_megatron.mixer import PrismMixer
from prism_megatron.process_groups import cp_size, tp_group, tp_rank, tp_size
from prism_megatron.sequence_parallel import scatter_sequence
from prism_megatron.sharding import (
    add_tp_grad_sum_hooks,
    draw_parameters,
    normal_init,
    padded_vocab_size,
    set_init,
    shard_spec,
    tag_vocab_parallel,
)
from prism_megatron.token_layout import TokenLayout, WholeSequences

if TYPE_CHECKING:
    from prism_megatron.decoding import DecodeCache


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, *, megatron_config: ModelParallelConfig, sequence_parallel: bool):
        super().__init__()
        out_init_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5  # GPT-2: residual branches scaled
        # Under SP a norm sees only this rank's slice of the sequence: partial weight gradients.
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, megatron_config, partial_input=sequence_parallel,
                                  fused_ops=cfg.fused_ops)
        self.mixer = PrismMixer(cfg, megatron_config=megatron_config, sequence_parallel=sequence_parallel,
                                out_init_std=out_init_std)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, megatron_config, partial_input=sequence_parallel,
                                fused_ops=cfg.fused_ops)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.ffn_hidden_size, megatron_config=megatron_config,
                             init_std=cfg.init_std, out_init_std=out_init_std, sequence_parallel=sequence_parallel,
                             fused_ops=cfg.fused_ops)

    def forward(self, x: torch.Tensor, sequences: TokenLayout) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), sequences)
        return x + self.mlp(self.mlp_norm(x))


class PrismLM(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig, seed: int | None = None):
        """Build this TP rank's shard. Weights are drawn from `seed` (default: the seed given to
        initialize_parallel) as global tensors and split, so they do not depend on the TP size."""
        super().__init__()
        cfg.validate()
        if tp_size() != parallel.tensor_model_parallel_size:
            raise ValueError(f"parallel.tensor_model_parallel_size={parallel.tensor_model_parallel_size} but the "
                             f"process groups have TP size {tp_size()}: call initialize_parallel with this config")
        if cp_size() != parallel.context_parallel_size:
            raise ValueError(f"parallel.context_parallel_size={parallel.context_parallel_size} but the "
                             f"process groups have CP size {cp_size()}: call initialize_parallel with this config")
        self.cfg = cfg
        self.sequence_parallel = parallel.sequence_parallel and tp_size() > 1
        megatron_config = megatron_config_for(tp_size())
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, tp_size())

        self.embedding = tensor_parallel.VocabParallelEmbedding(
            self.padded_vocab_size, cfg.hidden_size, init_method=no_megatron_init, config=megatron_config)
        tag_vocab_parallel(self.embedding.weight, cfg.vocab_size)
        set_init(self.embedding.weight, normal_init(cfg.init_std))
        self.layers = nn.ModuleList(
            Block(cfg, megatron_config=megatron_config, sequence_parallel=self.sequence_parallel)
            for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, megatron_config,
                                  partial_input=self.sequence_parallel, fused_ops=cfg.fused_ops)
        self.lm_head = ColumnParallelLinear(cfg.hidden_size, self.padded_vocab_size, megatron_config=megatron_config,
                                            init=normal_init(cfg.init_std), sequence_parallel=self.sequence_parallel,
                                            skip_weight_param_allocation=cfg.tie_embeddings)
        if not cfg.tie_embeddings:
            tag_vocab_parallel(self.lm_head.weight, cfg.vocab_size)
        self.reset_parameters(torch.initial_seed() if seed is None else seed)
        add_tp_grad_sum_hooks(self)

    def reset_parameters(self, seed: int) -> None:
        draw_parameters(self, seed)

    @property
    def device(self) -> torch.device:
        """Where the weights are (what a training engine's .device says; the Evaluator asks either)."""
        return self.embedding.weight.device

    def num_parameters(self) -> int:
        """Parameters of the whole model (all TP ranks, without vocabulary padding)."""
        total = 0
        for p in self.parameters():
            total += torch.Size(shard_spec(p).global_shape(p.shape, tp_size())).numel()
        return total

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: DecodeCache | None = None,
                logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        """The mean loss of `labels`, or (labels None) logits: of the last `logits_to_keep` positions (0:
        all), or of the positions a 1-D tensor names, as transformers means it. A prefill needs only its
        sequences' last positions, not T x vocab logits."""
        B, T = tokens.shape
        if self.sequence_parallel and T % tp_size():
            raise ValueError(f"sequence length {T} does not divide by the tensor-parallel size {tp_size()}, "
                             "which sequence parallelism needs")
        every_position = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if not every_position and (self.sequence_parallel or cp_size() > 1):
            raise ValueError("logits_to_keep needs each rank to hold whole sequences: sequence and context "
                             "parallelism off")
        if cache is None:
            layouts = itertools.repeat(batch_layout(B, T, cu_seqlens, tokens.device))
        else:
            self._check_decoding(labels)
            layouts = cache.layouts(B, T, cu_seqlens)
        x = self.embedding(tokens)
        if self.sequence_parallel:
            x = scatter_sequence(x)
        for layer, sequences in zip(self.layers, layouts):
            if self.cfg.recompute == "full":
                x = checkpoint(layer, x, sequences, use_reentrant=False)
            else:
                x = layer(x, sequences)
        head_weight = self.embedding.weight if self.cfg.tie_embeddings else self.lm_head.weight
        if labels is None:
            if every_position:
                kept = x
            elif isinstance(logits_to_keep, int):
                # A copy of the last positions, not a view: a view's strides and offset follow T, and the
                # compiled rms_norm would be compiled again for prompt lengths until torch.compile gave up.
                kept = x[:, -logits_to_keep:].clone(memory_format=torch.contiguous_format)
            else:
                kept = x[:, logits_to_keep]
            return self._mask_vocab_padding(self.lm_head(self.final_norm(kept), head_weight))
        x = self.final_norm(x)
        x = self.lm_head.parallel_input(x)
        # Under CP the mean over this rank's equal slice: the mean over CP ranks is the samples' mean.
        return linear_cross_entropy(x.flatten(0, 1), head_weight, labels.flatten(), self.cfg.vocab_size,
                                    tp_group(), tp_rank(), tp_size(), fused=use_fused(self.cfg.fused_ops, x)).mean()

    def _check_decoding(self, labels: torch.Tensor | None) -> None:
        """What a forward with a decoding cache needs."""
        if labels is not None:
            raise ValueError("a forward with a decoding cache gives logits: labels must be None")
        if torch.is_grad_enabled():
            # The cache is updated as the layers run: a recomputation in a backward would update it again.
            raise RuntimeError("decoding with a cache is inference-only: call it under torch.no_grad()")
        if self.sequence_parallel or cp_size() > 1:
            raise ValueError("decoding with a cache needs sequence and context parallelism off "
                             "(build the model with parallel.sequence_parallel false and context_parallel_size 1)")

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Padded vocabulary entries get -inf logits: they never win the softmax nor get a gradient."""
        if self.padded_vocab_size == self.cfg.vocab_size:
            return logits
        local = logits.shape[-1]
        index = torch.arange(local, device=logits.device) + tp_rank() * local
        return logits.masked_fill(index >= self.cfg.vocab_size, float("-inf"))

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [..., padded vocab / TP] -> [..., vocab] on every rank (a collective)."""
        if tp_size() > 1:
            parts = [torch.empty_like(logits) for _ in range(tp_size())]
            torch.distributed.all_gather(parts, logits.contiguous(), group=tp_group())
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.cfg.vocab_size]


def batch_layout(batch: int, length: int, cu_seqlens: torch.Tensor | None, device) -> TokenLayout:
    """How `batch` rows of `length` tokens lie on this rank: whole, or under context parallelism each
    this rank's slice of a sample's row. cu_seqlens: the whole samples' documents over their flattened
    rows (None: a row is one sequence)."""
    if cp_size() > 1:
        return ContextSlice.build(token_positions(batch, length * cp_size(), cu_seqlens, device))
    position = token_positions(batch, length, cu_seqlens, device)
    if cu_seqlens is None:
        return WholeSequences(position, None)
    # Checked once here, not in every layer.
    return WholeSequences(position, PackedSequences(cu_seqlens.to(device), batch * length))


def token_positions(batch: int, length: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[B, T]: each token's index within its sequence (a row, or a packed document of cu_seqlens
    over the flattened B*T tokens)."""
    if cu_seqlens is None:
        return torch.arange(length, device=device).expand(batch, length)
    flat = torch.arange(batch * length, device=device)
    bounds = cu_seqlens.to(device=device, dtype=torch.long)
    start = bounds[torch.searchsorted(bounds, flat, right=True) - 1]
    return (flat - start).reshape(batch, length)
