#!/usr/bin/env bash
# Round three: the share penalty at an alpha chosen on start point B's hold-out (issue 22).
# The plan (fixed before any run) is in docs/results.md, "Round three: plan".
#
#     . .venv/bin/activate && DATA_DIR=../shared/data bash experiments/round3_share_alpha.sh
#
# Needs start point B (experiments/round2_cifar10_lt.sh: baseline, start/, ctl_s0..2) in $OUT.
# Stage 1 (grid): share at the grid's alphas, seed 0. Stage 2: the alpha chosen on the hold-out
# (experiments/choose_alpha.py; reads only summary.csv's held-out top-1, never a test file),
# seeds 1 and 2. Every run reads the test set once at its end, as the round-two runs do; those
# files are read only after stage 2, for the report.
set -euo pipefail
. "$(dirname "$0")/common.sh"  # run(), PY, DATA, one thread

OUT=${OUT:-experiments/runs/round2_cifar10_lt}
PAR=${PAR:-1}
HOLD=1000
CK="$OUT/baseline/model_best.pth.tar"
START="$OUT/start"
for f in "$CK" "$START/alpha.json" "$OUT/ctl_s0/summary.csv"; do
  [[ -f $f ]] || { echo "error: $f missing: run experiments/round2_cifar10_lt.sh first" >&2; exit 2; }
done
LT=(--dataset cifar10_lt --imb-ratio 100 --imb-seed 0 --data-dir "$DATA" --val-from-train "$HOLD"
  --data-seed 0 --loss balanced_softmax)
BASE=(--model resnet20_cifar "${LT[@]}" -b 128 --opt sgd --momentum 0.9 --weight-decay 5e-4
  --sched cosine --sched-on-updates --smoothing 0 --crop-padding 4 --color-jitter 0 --workers 0
  --no-progress --log-interval 0 --output "$OUT")
STATS=(--dataset cifar10_lt --val-from-train "$HOLD")
. "$(dirname "$0")/round2_arms.sh" # FINETUNE, ARM, stats, job, run_arms
COMMON=("${BASE[@]}" "${FINETUNE[@]}")
# The grid: the rule's alpha (round two's share arm, alpha.json) down to a tenth of it, log-spaced
# (x1, /2.15, /4.64, /10), two significant digits (fixed before any run; amended 2026-12-04).
read -r -a GRID <<<"$("$PY" -c "
a = $A_SHARE
print(' '.join(f'{v:.2g}' for v in (a, a / 2.15, a / 4.64, a / 10)))")"
echo "[$(date -Is)] grid: ${GRID[*]} (rule: $A_SHARE)"
for a in "${GRID[@]}"; do
  ARM[sharea${a/./p}]="--md-loss share --md-alpha $a"
done

# Stage 1: the grid at seed 0 (the rule's alpha is round two's share_s0: the same command, re-used).
ORDER=""
for a in "${GRID[@]:1}"; do ORDER+=" sharea${a/./p}_s0"; done
run_arms
# Stage 2: the alpha the hold-out chooses, seeds 1 and 2 (seed 0 is its grid run).
CHOSEN=$("$PY" experiments/choose_alpha.py --runs "$OUT" --grid "${GRID[@]}" \
  --rule-alpha "${GRID[0]}" --out "$OUT/chosen_alpha.json")
echo "[$(date -Is)] chosen alpha (hold-out): $CHOSEN"
if [[ $CHOSEN != "${GRID[0]}" ]]; then
  ORDER="sharea${CHOSEN/./p}_s1 sharea${CHOSEN/./p}_s2"
  run_arms
fi
