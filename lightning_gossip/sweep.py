"""``python -m lightning_gossip.sweep``: the experiment app's sweep collector (:mod:`lightning_gossip.app.sweep`)."""

from lightning_gossip.app.sweep import main

if __name__ == "__main__":
    main()
