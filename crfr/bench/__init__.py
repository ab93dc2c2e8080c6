"""Benchmarks that print JSON numbers (``crfr bench ops|train|data|serve|gallery``), never timed tests."""
