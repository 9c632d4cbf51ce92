# the Hydra multiruns behind these results (run from the repository root)
python -m lightning_gossip.train -m experiment=claims_exploration seed=1,2 data.split=iid,label_skew strategy.topology=random strategy.p=0,0.01,0.1,0.5 hydra.sweep.dir=logs/claims/exploration/random
python -m lightning_gossip.train -m experiment=claims_exploration seed=1,2 data.split=iid,label_skew strategy.topology=ring,exponential strategy.p=0.01,0.1 hydra.sweep.dir=logs/claims/exploration/topology
python -m lightning_gossip.train -m experiment=claims_exploration seed=1,2 data.split=iid,label_skew strategy=ddp hydra.sweep.dir=logs/claims/exploration/ddp
