"""The causal depthwise short convolution with document resets, in Triton (reference:
prism_megatron.layers.causal_depthwise_conv)."""
