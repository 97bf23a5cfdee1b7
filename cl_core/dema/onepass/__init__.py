"""The one-pass optimizer+DEMA step (docs/design.md §3 "One pass, exact", §7): its
protocols (protocols.py: OnePassStep, FusedDriver, the data they pass), the step that
DEMAOptimizer hands the engine (step.py: FusedStep) and the drivers of one engine group
each (cpu_driver.py: CpuFusedDriver on the native C kernels; triton_driver.py:
TritonFusedDriver on the Triton kernels)."""
