"""Fused model-level ops (loss, convolution, elementwise glue), each next to the plain PyTorch code it
is tested against."""
