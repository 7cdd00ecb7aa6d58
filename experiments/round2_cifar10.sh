#!/usr/bin/env bash
# Round two, start point A: the converged 30-epoch resnet20_cifar (90.47%), four arms x 3 seeds.
# The plan (fixed before any run) is in docs/results.md, "Round two: plan".
#
#     . .venv/bin/activate && DATA_DIR=../shared/data \
#         CK=../shared/checkpoints/resnet20_cifar10_e30/last.pth.tar nice -n 5 bash experiments/round2_cifar10.sh
#
# Outputs: experiments/runs/round2_cifar10/<run>/ and <run>.log; start/ holds the shared
# diagnosis and alpha.json. Two trainings at a time (PAR, default 2), each on one thread.
# A run whose folder holds DONE is skipped.
set -euo pipefail
. "$(dirname "$0")/common.sh"  # run(), PY, DATA, one thread

OUT=${OUT:-experiments/runs/round2_cifar10}
if [[ -z "${CK:-}" ]]; then
  echo "error: set CK to the start checkpoint (e.g. CK=../shared/checkpoints/resnet20_cifar10_e30/last.pth.tar)" >&2
  exit 2
fi
PAR=${PAR:-2}
mkdir -p "$OUT"
START="$OUT/start"
if [[ ! -f "$START/alpha.json" ]]; then
  echo "[$(date -Is)] prepare (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$PY" experiments/prepare_start.py --checkpoint "$CK" --data-dir "$DATA" \
    --first 10000 --out "$START" 2>&1 | tee "$OUT/prepare.log"
fi
STATS=(--split test --first 1000)
. "$(dirname "$0")/round2_arms.sh" # FINETUNE, ARM, stats, job, run_arms
COMMON=(--model resnet20_cifar --dataset torch/cifar10 --data-dir "$DATA" -b 128 --opt sgd
  --momentum 0.9 --weight-decay 5e-4 --sched cosine --sched-on-updates --smoothing 0
  --crop-padding 4 --color-jitter 0 --workers 1 --no-progress --log-interval 0 --output "$OUT"
  "${FINETUNE[@]}")

[[ -f "$OUT/start.heldout.json" ]] || stats start "$CK" &
# Seeds before arms: when time runs out, whole arms are missing, never seeds of an arm.
# Priority (fixed before any result): control, official, share, true-class only.
ORDER=${ORDER:-"ctl_s0 official_s0 ctl_s1 official_s1 ctl_s2 official_s2 share_s0 share_s1 share_s2 trueonly_s0 trueonly_s1 trueonly_s2"}
run_arms
