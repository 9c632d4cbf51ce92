"""The experiment app's Hydra configs (``python -m lightning_gossip.train``).

This folder is the only copy. A wheel or ``pip install .`` ships it inside the package as ``lightning_gossip.conf``
(see ``[tool.setuptools]`` in pyproject.toml); this file makes it a package, which Hydra's ``pkg://`` search path
needs. Nothing imports it from a checkout.
"""
