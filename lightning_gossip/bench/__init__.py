"""Benchmark your own model: gossip (lock-step and asynchronous), DDP and Local SGD side by side, in one command.

    python -m lightning_gossip.bench --model my_project.models:Net --datamodule my_project.data:DataModule \\
        --workers 4 --epochs 2 --metric val_acc --target 0.9

``lightning-gossip-bench`` is the same command. See :mod:`lightning_gossip.bench.cli` for the options and
docs/benchmark.md for the table's columns and ``--compare``. The package's parts: :mod:`.cli` (options, plan, the
parent process), :mod:`.worker` (one rank), :mod:`.launch` (torchrun-style workers), :mod:`.netns` (tc-limited
links in network namespaces), :mod:`.strategies` (the rows), :mod:`.results` (table, files, comparison),
:mod:`.spec` (import paths and Hydra ``_target_``). Importing it does not import Lightning.
"""

from lightning_gossip.bench.cli import main

__all__ = ["main"]
