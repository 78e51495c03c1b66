"""prism-megatron: distributed pretraining for PRISM language models."""
from prism_megatron import quiet  # noqa: F401  (its filters must precede any import of megatron-core)
