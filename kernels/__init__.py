"""Triton kernels, installed as minicustom.kernels. Each has a pure-PyTorch twin in minicustom/."""
