"""prism-megatron: distributed pretraining for PRISM language models."""
