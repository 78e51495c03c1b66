"""The solvers' elementwise passes in Triton (reference: prism_megatron.solver)."""
