"""The experiment app: Hydra configs (the repository's ``conf/``), datamodules, models, the training entry point and
the sweep collector. It uses the library (``lightning_gossip``) like any user project would; nothing in the library
imports it.

    python -m lightning_gossip.train [overrides]      # an alias of python -m lightning_gossip.train
    python -m lightning_gossip.sweep <sweep folder>    # an alias of python -m lightning_gossip.sweep
"""
