"""Benchmark: GoSGD gossip against Lightning's DDP, local SGD and single-process training (issue 4).

Run ``python -m experiments.benchmark --help``; see :mod:`experiments.benchmark.run`.
"""
