"""Models whose weights stay in quantized blocks (GGUF files): the blocks' kernels and the layers that use them."""
