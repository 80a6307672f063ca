#!/usr/bin/env bash
# A real sweep on Fashion-MNIST for the README: Taylor channel pruning at two amounts, each with int8
# QAT and with 4-bit-weight LSQ QAT (four jobs, 3 epochs, two at a time through the joblib launcher), all recipes in
# one run per job (runs=[combined]); its summary table and Pareto plot are copied to results/sweep/.
#   apt-get install dataset-fashion-mnist
#   bash benchmarks/sweep_fashion_mnist.sh
set -euo pipefail
cd "$(dirname "$0")/.."
sweep="$(mktemp -d)/sweep"
lightning-compress -m experiment=fashion_mnist_cnn hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  'runs=[combined]' trainer.max_epochs=3 \
  compression/pruning=taylor_channel50 compression.pruning.amount=0.3,0.6 compression.pruning.end_epoch=1 \
  compression/quantization=int8_qat,w4a8_lsq compression.quantization.start_epoch=1 compression.quantization.freeze_bn_epoch=2 \
  hydra.sweep.dir="$sweep"
mkdir -p benchmarks/results/sweep
cp "$sweep"/summary.csv "$sweep"/summary.md "$sweep"/pareto.png benchmarks/results/sweep/
echo "copied the summary of $sweep to benchmarks/results/sweep/"
