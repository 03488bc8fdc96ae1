"""Fused multi-tensor update kernels (Triton on CUDA, torch's fused/foreach kernels elsewhere)."""
