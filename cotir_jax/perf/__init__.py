"""How fast a train step is and could be: FLOP counts, chip peaks, utilisations, XLA's estimate.

- `flop_count`: `FlopCount`, FLOPs by (component, kind), and the counting conventions.
- `hlo`: FLOPs of a compiled program from its HLO text, every loop iteration counted.
- `closed_form`: FLOPs of the CoTIR train step from a config (`analytic_flops`).
- `chips`: peak FLOP/s per chip (spec sheets), or a device's measured matmul rate.
- `utilization`: mfu and hfu, defined once.
- `cost_model`: XLA's TPU cost-model step time, compiled ahead of time on a CPU.
"""
