#!/usr/bin/env bash
# Model Doctor vs an alpha=0 control on CIFAR-10-LT (imbalance ratio 100, LDAM-DRW construction,
# 12,406 training images; balanced 10,000-image test set), resnet20_cifar, Balanced Softmax loss,
# compressed CPU schedule.
#
# Run from the repository root with the project's environment active:
#     . .venv/bin/activate && bash experiments/cifar10_lt.sh
# Outputs: experiments/runs/cifar10_lt/<run>/ and experiments/runs/cifar10_lt/<run>.log. A run
# whose folder holds DONE is skipped; an unfinished run is deleted and started again.
#
# Design (fixed before any result was seen; see docs/results.md):
#   1. baseline: resnet20_cifar from scratch, 12 epochs, SGD lr 0.1, 1 warm-up epoch, cosine per
#      update, batch 128, wd 5e-4, --loss balanced_softmax, pad-4 crop + flip, seed 0.
#   2. fine-tune the SAME baseline checkpoint for 2 epochs, lr 0.01, cosine per update, no
#      warm-up, same loss, seeds 0,1,2, in two arms that differ only by --md-alpha:
#        treatment  --md --md-alpha 0.078  (official alpha=10 at batch 128, per-sample normalised)
#        control    --md --md-alpha 0      (identical fine-tuning, no Model Doctor term)
#      The diagnosis (last conv, up to 50 high-confidence correctly classified TRAIN images per
#      class, theta 0.2) is made once by the first treatment run and reused by every other run.
#   Results are read at the final epoch only (CIFAR's validation split is its test split).
set -euo pipefail
. "$(dirname "$0")/common.sh"  # run(), PY, DATA, one thread

OUT=experiments/runs/cifar10_lt
mkdir -p "$OUT"

COMMON=(--model resnet20_cifar --dataset cifar10_lt --imb-ratio 100 --imb-seed 0 --data-dir "$DATA"
  -b 128 --opt sgd --momentum 0.9 --weight-decay 5e-4 --sched cosine --sched-on-updates
  --smoothing 0 --crop-padding 4 --color-jitter 0 --loss balanced_softmax --workers 2
  --no-progress --log-interval 0 --output "$OUT")
FT=(--initial-checkpoint "$OUT/baseline/last.pth.tar" --epochs 2 --lr 0.01 --warmup-epochs 0
  --md --md-layers last_conv --md-per-class 50 --md-theta 0.2 --no-md-report)
DIAG="$OUT/md_a0.078_s0/diagnosis.safetensors"

run baseline --epochs 12 --lr 0.1 --warmup-epochs 1 --seed 0
run md_a0.078_s0 "${FT[@]}" --md-alpha 0.078 --seed 0
run ctl_a0_s0 "${FT[@]}" --md-alpha 0 --seed 0 --md-diagnosis "$DIAG"
run md_a0.078_s1 "${FT[@]}" --md-alpha 0.078 --seed 1 --md-diagnosis "$DIAG"
run ctl_a0_s1 "${FT[@]}" --md-alpha 0 --seed 1 --md-diagnosis "$DIAG"
run md_a0.078_s2 "${FT[@]}" --md-alpha 0.078 --seed 2 --md-diagnosis "$DIAG"
run ctl_a0_s2 "${FT[@]}" --md-alpha 0 --seed 2 --md-diagnosis "$DIAG"
