#!/bin/sh
# The grid as it was run for experiments/results/mnist1d (see its README for what was and was not run), in order.
# Resumable: rerun it and only the runs without a JSON are run. Each line is independent; run any of them alone.
set -e
cd "$(dirname "$0")/../.."
export RUST_LOG=warn
python -m experiments.mnist1d.grid equivalence --workers 4 --seeds 1,2,3 --jobs 2
python -m experiments.mnist1d.grid peers --workers 4 --seeds 1,2,3 --jobs 2
python -m experiments.mnist1d.grid equivalence --workers 8 --seeds 1,2,3 --jobs 2
python -m experiments.mnist1d.grid exploration --workers 8 --seeds 1,2,3 --p 0,0.01,0.1,0.5 --jobs 2
python -m experiments.mnist1d.grid equivalence --workers 16 --seeds 1,2,3 --p 0.1,1 --jobs 2
python -m experiments.mnist1d.grid topology --workers 16 --seeds 1,2,3 --jobs 2
python -m experiments.mnist1d.grid equivalence --workers 16 --seeds 1,2,3 --p 0 --jobs 2
# session 2 of the grid (the MLP unless --model says otherwise)
python -m experiments.mnist1d.grid equivalence --workers 16 --seeds 1,2,3 --p 0.01,0.5 --jobs 2
python -m experiments.mnist1d.grid exploration --workers 4 --seeds 1,2,3 --jobs 2
python -m experiments.mnist1d.grid exploration --workers 8 --seeds 1,2,3 --p 1 --jobs 2
python -m experiments.mnist1d.grid exploration --workers 16 --seeds 1,2,3 --p 0,0.1,1 --jobs 2
python -m experiments.mnist1d.grid peers --workers 8 --seeds 1,2,3 --exclude lightning_ --jobs 2
python -m experiments.mnist1d.grid asynchronous --workers 4,8 --seeds 1,2,3 --jobs 2
python -m experiments.mnist1d.grid peers --workers 16 --seeds 1,2,3 --exclude lightning_ --jobs 2
python -m experiments.mnist1d.grid topology --workers 16 --seeds 1,2,3 --p 0.2 --jobs 2
python -m experiments.mnist1d.grid equivalence --workers 4 --seeds 1,2,3 --p 0,0.1,1 --model cnn --jobs 2
python -m experiments.mnist1d.grid exploration --workers 16 --seeds 1,2,3 --p 0.01,0.5 --jobs 2
python -m experiments.mnist1d.grid topology --workers 16 --seeds 1,2,3 --p 0.01 --jobs 2
# session 3 of the grid
python -m experiments.mnist1d.grid asynchronous --workers 16 --seeds 1,2,3 --jobs 2
python -m experiments.mnist1d.grid equivalence --workers 8 --seeds 1,2,3 --p 0,0.1,1 --model cnn --jobs 2
python -m experiments.mnist1d.grid exploration --workers 4 --seeds 1,2,3 --p 0,0.1,1 --model cnn --jobs 2
python -m experiments.mnist1d.grid equivalence --workers 16 --seeds 1,2,3 --p 0,0.1,1 --model cnn --jobs 2
python -m experiments.mnist1d.grid exploration --workers 8 --seeds 1,2,3 --p 0,0.1,1 --model cnn --jobs 2
python -m experiments.mnist1d.grid peers --workers 4 --seeds 1,2,3 --model cnn --exclude lightning_ --jobs 2
# issue 18: outer momentum (docs/outer.md); the tuning grid for the outer-momentum gossip and torchft's DiLoCo alike
python -m experiments.mnist1d.grid outer --workers 4 --seeds 1,2 --jobs 2
python -m experiments.mnist1d.grid outer --workers 8 --seeds 1,2 --jobs 2
python -m experiments.mnist1d.grid outer --workers 4 --seeds 1,2 --model cnn --jobs 2
python -m experiments.mnist1d.grid outer --workers 4,8 --seeds 3 --outer-lr 0.3 --periods 8 --jobs 2
python -m experiments.mnist1d.grid outer --workers 16 --seeds 1,2 --outer-lr 0.3,0.7 --periods 8,32 --jobs 2
python -m experiments.mnist1d.report
