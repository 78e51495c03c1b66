"""Numerical kernels of PRISM: references (the spec) and fast paths.

Installed as ``prism_megatron.kernels``.
"""
