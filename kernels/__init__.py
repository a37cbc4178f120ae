"""Fused GPU kernels (Triton): flash attention forward and backward."""
from kernels.flash_attention import flash_attention

__all__ = ["flash_attention"]
