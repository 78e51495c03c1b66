"""Fused model-level ops: the chunked linear cross-entropy, l2norm, and the torch.compile glue of the
elementwise ops (fusable.py), each next to the plain PyTorch code it is tested against."""
