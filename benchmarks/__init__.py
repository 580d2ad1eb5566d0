"""Benchmarks: one script per question; results as JSON + Markdown (+ PNG) in benchmarks/results/."""
