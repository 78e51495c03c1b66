"""The PRISM recurrence (docs/PRISM.md sections 1 and 4): the op (op.py: its contract and backend dispatch)
and one module per backend, naive.py (the spec), chunk_torch.py and the Triton kernels (chunk.py)."""
from .op import PackedSequences, prism_recurrence
