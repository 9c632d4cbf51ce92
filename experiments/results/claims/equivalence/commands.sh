# the Hydra multiruns behind these results (run from the repository root)
python -m lightning_gossip.train -m experiment=claims_equivalence seed=1,2,3 strategy.p=0,0.01,0.1,0.5,1 hydra.sweep.dir=logs/claims/equivalence/gossip
python -m lightning_gossip.train -m experiment=claims_equivalence seed=1,2,3 strategy=ddp hydra.sweep.dir=logs/claims/equivalence/ddp
python -m lightning_gossip.train -m experiment=claims_equivalence seed=1,2,3 strategy=single data.batch_size=64 hydra.sweep.dir=logs/claims/equivalence/single
