"""Triton kernels (see issue: GPU kernels)."""
