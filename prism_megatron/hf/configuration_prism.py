"""PrismConfig: an export's config.json (`prism-ckpt export`) as transformers reads it."""
from __future__ import annotations

from transformers import PreTrainedConfig

from prism_megatron.config import ModelConfig


class PrismConfig(PreTrainedConfig):
    """`model` holds the ModelConfig fields (what PrismLM is built from, and what load_exported reads);
    the names transformers and its users look for (vocab_size, hidden_size, num_hidden_layers,
    tie_word_embeddings) are derived from it, so the two never disagree."""

    model_type = "prism"

    model: dict | None = None
    step: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        model = self.model_config()
        self.vocab_size = model.vocab_size
        self.hidden_size = model.hidden_size
        self.num_hidden_layers = model.num_layers
        self.tie_word_embeddings = model.tie_embeddings

    def model_config(self) -> ModelConfig:
        model = ModelConfig(**(self.model or {}))
        model.validate()
        return model
