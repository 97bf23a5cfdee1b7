"""The kernel layer of cl_core: the kernels that sweep data and their launchers (native C
for CPU, Triton for GPU), installed as ``cl_core.kernels``.

Launchers take tensors, int64 tables and scalars; nothing here imports the engine
(cl_core/dema) or anything else of cl_core outside this package. Importing this package
does not import triton; each Triton kernel module does, so the CPU-only parts of cl_core
work where triton is not installed.
"""
