"""Layer 3: C source from a formula and a reduction. `emit` is shared by every compiled target; `cpu` is the
CPU driver (OpenMP + SIMD loops around the emitted body)."""
