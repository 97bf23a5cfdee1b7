"""Triton GPU kernels of cl_core, installed as ``cl_core.kernels``.

Importing this package does not import triton; each kernel module does, so the
CPU-only parts of cl_core work where triton is not installed.
"""
