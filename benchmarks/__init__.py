"""Benchmarks: step time, memory and FLOPs of every method (``python -m benchmarks.step``)."""
