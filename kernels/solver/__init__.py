"""The solvers' elementwise passes: the PyTorch code (naive.py: prism's reference, split's through
torch.compile) and prism's pass in Triton (prism_steps.py)."""
from .naive import prism_outputs, split_outputs
from .prism_steps import prism_steps
