"""Benchmarks of atlas_kernels: one training step of an open_clip image tower with learned task-vector
coefficients, against the paper's way (naive), a merge-once baseline, FusionBench's own layer-wise
wrapper (fusionbench, where fusion-bench is installed) and the plain model (floor).

``python -m bench`` runs the grid; ``python -m bench.plot FILE.jsonl`` redraws a plot;
``python -m bench.report FILE.jsonl`` prints a markdown headline table. See bench/README.md.
"""
