#!/usr/bin/env bash
# Round two, start point B: a CIFAR-10-LT (rho = 100) Balanced Softmax baseline trained from
# scratch with a stratified hold-out, then the four arms x 3 seeds of round2_cifar10.sh.
# The plan (fixed before any run) is in docs/results.md, "Start point B".
#
#     . .venv/bin/activate && bash experiments/round2_cifar10_lt.sh   # ~75 min on one core (measured)
#
# Outputs: experiments/runs/round2_cifar10_lt/{baseline,start,<arm>_s<seed>}/ and their logs.
# The test split is read once per run, at its end (test_results.json); the hold-out (1,000 of
# the 12,406 training images) selects nothing here but is where the irrelevant share is measured.
set -euo pipefail
. "$(dirname "$0")/common.sh"  # run(), PY, DATA, one thread

OUT=${OUT:-experiments/runs/round2_cifar10_lt}
PAR=${PAR:-1}
EPOCHS=${EPOCHS:-15}  # the plan's 15 epochs (docs/results.md, start point B)
HOLD=1000
mkdir -p "$OUT"
LT=(--dataset cifar10_lt --imb-ratio 100 --imb-seed 0 --data-dir "$DATA" --val-from-train "$HOLD"
  --data-seed 0 --loss balanced_softmax)
BASE=(--model resnet20_cifar "${LT[@]}" -b 128 --opt sgd --momentum 0.9 --weight-decay 5e-4
  --sched cosine --sched-on-updates --smoothing 0 --crop-padding 4 --color-jitter 0 --workers 0
  --no-progress --log-interval 0 --output "$OUT")

COMMON=("${BASE[@]}")
run baseline --epochs "$EPOCHS" --lr 0.1 --warmup-epochs 1 --seed 0
CK="$OUT/baseline/model_best.pth.tar" # chosen on the hold-out; its test row is test_results.json

START="$OUT/start"
if [[ ! -f "$START/alpha.json" ]]; then
  echo "[$(date -Is)] prepare (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$PY" experiments/prepare_start.py --checkpoint "$CK" --dataset cifar10_lt --data-dir "$DATA" \
    --val-from-train "$HOLD" --first 10000 --out "$START" 2>&1 | tee "$OUT/prepare.log"
fi
STATS=(--dataset cifar10_lt --val-from-train "$HOLD")
. "$(dirname "$0")/round2_arms.sh" # FINETUNE, ARM, stats, job, run_arms
COMMON=("${BASE[@]}" "${FINETUNE[@]}")

[[ -f "$OUT/start.heldout.json" ]] || stats start "$CK"
# Seeds before arms, in the plan's priority (control, share, official, true-class only): when time
# runs out, whole arms are missing, never seeds of an arm.
ORDER=${ORDER:-"ctl_s0 ctl_s1 ctl_s2 share_s0 share_s1 share_s2 official_s0 official_s1 official_s2 trueonly_s0 trueonly_s1 trueonly_s2"}
run_arms
