"""4-bit quantization, knowing no adapter: the NF4/FP4 format (nf4.py, bit-exact with bitsandbytes' bytes)
and the frozen 4-bit linear layer built on it (linear4bit.py: Linear4bit, quantize_model). The Triton kernels
in minicustom.kernels compute what these PyTorch twins compute, on CUDA."""

from . import nf4

__all__ = ["nf4"]
