#!/usr/bin/env bash
# CNNSplitter experiment, stage 1: the strong and the weak models (docs/splitter.md, "Experiment").
#   strong: resnet20_cifar on CIFAR-10 classes 0-4, 2,500 training images held out (500 per class)
#           for the best epoch and for the splitter (importance, search, ranges).
#   weak:   simcnn_weak on classes 5-9 (-> 0-4) plus one target class (TC) from 0-4 (-> 5),
#           the TC cut to 500 training images (seeded), 20% of each class held out (the paper's
#           80/20), for TC = 0, 2, 4 (fixed in advance).
# CIFAR's test split is read once per model at the end (test_results.json).
# Usage: bash experiments/splitter_train.sh [strong|weak0|weak2|weak4]...   (OUT, DATA_DIR env)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/splitter}
mkdir -p "$OUT"
source experiments/common.sh
COMMON=(--dataset torch/cifar10 --data-dir "$DATA" --output "$OUT" -b 128 --opt sgd
        --momentum 0.9 --weight-decay 5e-4 --sched cosine --sched-on-updates --smoothing 0
        --crop-padding 4 --color-jitter 0 --workers 0 --no-progress --log-interval 0 --seed 0
        --data-seed 0)
S=experiments/splitter
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(strong weak0 weak2 weak4)
for what in "${stages[@]}"; do
  case $what in
    strong) run strong_r20_c04 --model resnet20_cifar --class-map $S/strong_0-4.txt \
              --val-from-train 2500 --epochs 4 --lr 0.1 --warmup-epochs 0 ;;
    weak[024]) tc=${what#weak}
              run weak_tc$tc --model simcnn_weak --class-map $S/weak_tc$tc.txt --class-cap 5=500 \
                --val-from-train 0.2 --epochs 4 --lr 0.01 --weight-decay 1e-4 --warmup-epochs 0 ;;
    *) echo "unknown stage $what" >&2; exit 2 ;;
  esac
done
