"""``python -m lightning_gossip.train``: the experiment app's entry point (:mod:`lightning_gossip.app.train`)."""

from lightning_gossip.app.train import main

if __name__ == "__main__":
    main()
