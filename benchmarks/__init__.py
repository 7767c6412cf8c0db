"""Measurements of guided sampling: the GPU acceptance check (``make gpu-check``, :mod:`benchmarks.gpu_check`) and
the guidance cost benchmark (:mod:`benchmarks.bench_guidance`); ``scripts/gpu_check.py`` and
``scripts/bench_guidance.py`` are their command lines."""
