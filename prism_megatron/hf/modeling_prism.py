"""PrismForCausalLM: PrismLM (model.py) and its recurrent decoding (decoding.py) behind transformers'
PreTrainedModel and GenerationMixin, so that generate() and the tools built on transformers (lm-eval) run it.

Padding. A recurrent model's padded positions must not enter the state. A forward whose attention_mask
has zeros packs each row's unmasked tokens as one document (cu_seqlens), where the recurrence and the
short convolution start afresh, and puts the logits back at their positions (padded positions get
logits of 0). Left padding (generate()'s batches) and right padding both give every row exactly the
logits of its own tokens. Padding can only come where the sequences start: in a forward without a
cache or in a cache's first one; every later forward continues all rows with real tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from prism_megatron.config import ParallelConfig
from prism_megatron.decoding import DecodeCache, DecodeStep
from prism_megatron.hf.configuration_prism import PrismConfig
from prism_megatron.model import PrismLM


class PrismCache(Cache):
    """The recurrent memory of generate()'s sequences, a DecodeCache (per layer the state and the short
    convolution's last inputs: a size that does not grow with the sequences), under transformers' Cache
    interface: what generate() asks of a cache (its length, reordering for beam search, selecting and
    repeating sequences). It holds no per-layer cache objects: transformers' LinearAttentionLayer
    expects the model's layers to call update_conv_state / update_recurrent_state, whereas PrismLM's
    mixer reads and writes the memory through its CachedSequences layout (decoding.py), the one path
    prism-generate also takes. A recurrent state cannot be rolled back, so crop() (assisted decoding)
    is refused. A token at a time it decodes as prism-generate does (decoding.DecodeStep: on a GPU a CUDA
    graph), until generate() reorders its sequences."""

    def __init__(self, memory: DecodeCache):
        super().__init__(layers=[])
        self.memory = memory
        self.step: DecodeStep | None = None

    def decode(self, model: PrismLM, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N] -> the float32 logits [N, vocab] after them, in a tensor of their own (the step's
        next replay overwrites its logits)."""
        if self.step is None:
            self.step = DecodeStep(model, self.memory)
        return self.step(tokens).to(torch.float32, copy=True)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.memory.lengths.max())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(torch.arange(self.memory.num_sequences).repeat_interleave(repeats))

    def _select(self, index: torch.Tensor) -> None:
        self.memory.select(index)
        self.step = None  # it holds the tensors the selection replaced

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PrismCache holds recurrent states, which cannot be rolled back to an earlier token")

    def reset(self) -> None:
        raise NotImplementedError("a PrismCache is made for its sequences: start a new one with a forward without cache")


class PrismForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PrismConfig
    base_model_prefix = "model"

    def __init__(self, config: PrismConfig, model: PrismLM | None = None):
        """Wrap `model` (default: a new PrismLM of the config, drawn from seed 0) at TP=1."""
        super().__init__(config)
        if model is None:
            single_process_groups()
            model = PrismLM(config.model_config(), ParallelConfig(), seed=0)
        self.model = model
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """PrismLM draws its own weights (sharding.draw_parameters), or they are loaded."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward makes its PrismCache

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config: PrismConfig | None = None,
                        dtype="auto", device_map=None, **options) -> PrismForCausalLM:
        """The model of an export folder (`prism-ckpt export`), in `dtype` ("auto": the weights' own) on the
        device `device_map` names (a device, or "auto": CUDA if there is one). The folder holds every
        parameter's global tensor, without the vocabulary padding PrismLM adds, so the weights are loaded
        as export.load_exported loads them, not by transformers' loader. Hub options (revision, cache_dir,
        trust_remote_code, ...) do not apply to a local folder; an option that would change the model is refused."""
        from prism_megatron.launch.checkpoint import CheckpointError, exported_weights
        from prism_megatron.launch.checkpoint.export import model_with_weights

        # transformers' Auto class passes adapter_kwargs (at least the revision) whenever peft is installed;
        # it names an adapter only where it found one in the folder.
        if (options.get("adapter_kwargs") or {}).get("_adapter_model_path"):
            raise ValueError(f"{pretrained_model_name_or_path} holds a PEFT adapter: PrismForCausalLM loads "
                             "`prism-ckpt export` folders, not adapters")
        options.pop("adapter_kwargs", None)
        changing = sorted(k for k, v in options.items() if v and k not in HUB_OPTIONS)
        if model_args or changing:
            raise ValueError(f"PrismForCausalLM.from_pretrained takes a folder, config, dtype and device_map; "
                             f"it cannot apply {', '.join(changing) or 'positional model arguments'}")
        folder = Path(pretrained_model_name_or_path)
        config = config or PrismConfig.from_pretrained(folder)
        try:
            weights = exported_weights(folder)
        except CheckpointError as e:
            raise OSError(str(e)) from None  # what transformers' loaders raise for a folder they cannot read
        single_process_groups()
        model = cls(config, model_with_weights(config.model_config(), weights))
        if dtype in (None, "auto"):
            dtype = next(iter(weights.values())).dtype
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        elif isinstance(device_map, dict) and set(device_map) == {""}:
            device_map = device_map[""]  # the whole model on one device
        elif isinstance(device_map, dict):
            raise ValueError(f"device_map {device_map}: PrismForCausalLM runs on one device (across GPUs, load "
                             "the folder into PrismLM at TP > 1 with checkpoint.load_exported)")
        model.to(device=device_map or "cpu", dtype=dtype)
        return model.eval()

    def save_pretrained(self, *args, **kwargs) -> None:
        raise NotImplementedError("PrismForCausalLM's folders are written by `prism-ckpt export` (global weights "
                                  "without vocabulary padding, which load at any TP); save_pretrained would write "
                                  "PrismLM's padded TP=1 shard, which from_pretrained cannot read")

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embedding

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: PrismCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] (float32) of input_ids [B, T], continuing `cache`'s sequences if given; with
        use_cache (default: config.use_cache, where no gradient is being recorded) the cache that continues
        them. logits_to_keep: only the last this many positions' logits (0: all), as generate() asks for a
        prompt. labels: next-token loss, transformers' convention (shifted inside, -100 ignored); the other
        keyword arguments are transformers' loss options (generate() passes a few that nothing here uses)."""
        if use_cache is None:
            use_cache = self.config.use_cache and not torch.is_grad_enabled()
        if use_cache and cache is None:
            cache = PrismCache(DecodeCache.for_model(self.model, input_ids.shape[0]))
        logits = self._logits(input_ids, attention_mask, cache, 0 if labels is not None else logits_to_keep)
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                cache: PrismCache | None, logits_to_keep: int) -> torch.Tensor:
        batch, length = input_ids.shape
        memory = None if cache is None else cache.memory
        # generate() passes the mask of every token so far; the last `length` columns are this forward's.
        real = None if attention_mask is None else attention_mask[:, -length:].bool()
        if real is None or bool(real.all()):
            if length == 1 and memory is not None and not memory.fresh:
                return cache.decode(self.model, input_ids[:, 0])[:, None]
            return self.model.gather_logits(self.model(input_ids, cache=memory, logits_to_keep=logits_to_keep)).float()
        if memory is not None and not memory.fresh:
            raise ValueError("attention_mask has zeros among tokens that continue a cache: padding can only come "
                             "where the sequences start (the cache's first forward)")
        bounds = F.pad(real.sum(1).cumsum(0), (1, 0))
        packed = self.model.gather_logits(self.model(input_ids[real][None], cu_seqlens=bounds, cache=memory))[0]
        logits = packed.new_zeros(batch, length, packed.shape[-1])
        logits[real] = packed
        return logits[:, -logits_to_keep:].float()


# from_pretrained's options that only say where to find a folder on the hub: nothing to do for a local one.
HUB_OPTIONS = frozenset({"revision", "cache_dir", "force_download", "local_files_only", "token", "proxies",
                         "trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "_from_auto"})


def single_process_groups() -> None:
    """PrismLM's layers are megatron-core's, which need its process groups: outside a launched job this
    process becomes rank 0 of 1, as in prism-generate. The global random state is left as it was."""
    from prism_megatron.process_groups import initialize_parallel

    if not parallel_state.model_parallel_is_initialized():
        with torch.random.fork_rng(devices=[]):
            initialize_parallel(ParallelConfig(), seed=0)
