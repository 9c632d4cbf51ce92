"""A stand-in for someone else's project: a LightningModule and a LightningDataModule the benchmark knows nothing
about (not lightning_gossip's, not the app's). The tests put this folder on PYTHONPATH and import it by path."""
