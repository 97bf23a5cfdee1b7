"""The DEMA engine: config, state, backends, the engine, DEMAOptimizer, the fused step, distributed helpers."""
