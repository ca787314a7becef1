"""Triton kernels, imported as ltri.kernels; each file holds a kernel, its launcher and a torch reference."""
