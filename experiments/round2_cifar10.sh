#!/usr/bin/env bash
# Round two, start point A: the converged 30-epoch resnet20_cifar (90.47%), four arms x 3 seeds.
# The plan (fixed before any run) is in docs/results.md, "Round two: plan".
#
#     . .venv/bin/activate && nice -n 5 bash experiments/round2_cifar10.sh   # ~1 h, loaded 2-core CPU
#
# Outputs: experiments/runs/round2_cifar10/<run>/ and <run>.log; start/ holds the shared
# diagnosis and alpha.json. Two trainings at a time (PAR, default 2), each on one thread.
# A run whose folder holds DONE is skipped.
set -euo pipefail
. "$(dirname "$0")/common.sh"  # run(), PY, DATA, one thread

OUT=${OUT:-experiments/runs/round2_cifar10}
CK=${CK:-/work/shared/checkpoints/resnet20_cifar10_e30/last.pth.tar}
PAR=${PAR:-2}
mkdir -p "$OUT"
START="$OUT/start"
if [[ ! -f "$START/alpha.json" ]]; then
  echo "[$(date -Is)] prepare (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$PY" experiments/prepare_start.py --checkpoint "$CK" --data-dir "$DATA" \
    --first 10000 --out "$START" 2>&1 | tee "$OUT/prepare.log"
fi
A_SHARE=$("$PY" -c "import json; print(json.load(open('$START/alpha.json'))['alpha_share'])")

COMMON=(--model resnet20_cifar --dataset torch/cifar10 --data-dir "$DATA" -b 128 --opt sgd
  --momentum 0.9 --weight-decay 5e-4 --sched cosine --sched-on-updates --smoothing 0
  --crop-padding 4 --color-jitter 0 --workers 1 --no-progress --log-interval 0 --output "$OUT"
  --initial-checkpoint "$CK" --epochs 8 --sampler-epoch-length 1024 --val-interval 8
  --lr 0.01 --warmup-epochs 0 --md --md-diagnosis "$START/diagnosis.safetensors"
  --no-md-eval-before --no-md-report)

stats() {  # stats NAME CHECKPOINT: irrelevant share on the first 1,000 test images, once
  [[ -f "$OUT/$1.heldout.json" ]] && return
  "$PY" experiments/heldout_stats.py --checkpoint "$2" --out "$OUT/$1.heldout.json" \
    --diagnosis "$START/diagnosis.safetensors" --data-dir "$DATA" --split test --first 1000 \
    >>"$OUT/$1.log" 2>&1
}

job() {  # job NAME ARGS...: one run, its held-out statistic, the load at start and end
  local t0=$SECONDS
  echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)" >"$OUT/$1.load"
  run "$@"
  echo "train wall $((SECONDS - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/$1.load"
  stats "$1" "$OUT/$1/last.pth.tar"
  echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg); wall $((SECONDS - t0)) s" >>"$OUT/$1.load"
}

stats start "$CK" &
RUNS=()
for s in 0 1 2; do
  RUNS+=("ctl_s$s --md-alpha 0 --md-monitor --seed $s")
  RUNS+=("official_s$s --md-loss official --md-alpha 0.078 --seed $s")
  RUNS+=("share_s$s --md-loss share --md-alpha $A_SHARE --seed $s")
  RUNS+=("trueonly_s$s --md-loss true_only --md-alpha 0.078 --seed $s")
done
for r in "${RUNS[@]}"; do
  while (($(jobs -rp | wc -l) >= PAR)); do wait -n || true; done
  # shellcheck disable=SC2086
  job $r &
  sleep 2
done
wait
echo "[$(date -Is)] all runs done"
