# Sourced by round2_cifar10.sh and round2_cifar10_lt.sh after they set OUT, CK (start checkpoint),
# START (its diagnosis and alpha.json) and STATS (heldout_stats.py flags: which images, which
# dataset). Defines the fine-tuning every arm shares (FINETUNE) and the arms (ARM); run_arms then
# runs every name of ORDER (<arm>_s<seed>) with COMMON, PAR at a time, each followed once by its
# held-out statistic. A run whose folder holds DONE is skipped.

# The plan of docs/results.md: 64 SGD steps (8 "epochs" of 1,024 images, batch 128), lr 0.01
# cosine per update to 0, no warm-up, one evaluation at the end, the start point's diagnosis.
FINETUNE=(--initial-checkpoint "$CK" --epochs 8 --sampler-epoch-length 1024 --val-interval 8
  --lr 0.01 --warmup-epochs 0 --md --md-diagnosis "$START/diagnosis.safetensors"
  --no-md-eval-before --no-md-report)
A_SHARE=$("$PY" -c "import json; print(json.load(open('$START/alpha.json'))['alpha_share'])")
declare -A ARM=(
  [ctl]="--md-alpha 0 --md-monitor"
  [official]="--md-loss official --md-alpha 0.078"
  [share]="--md-loss share --md-alpha $A_SHARE"
  [trueonly]="--md-loss true_only --md-alpha 0.078"
)

stats() {  # stats NAME CHECKPOINT: the irrelevant share on images no run fit, once
  [[ -f "$OUT/$1.heldout.json" ]] && return
  "$PY" experiments/heldout_stats.py --checkpoint "$2" --out "$OUT/$1.heldout.json" \
    --diagnosis "$START/diagnosis.safetensors" --data-dir "$DATA" "${STATS[@]}" \
    >>"$OUT/$1.log" 2>&1
}

job() {  # job NAME ARGS...: one run, its held-out statistic, the load at start and end
  local t0=$SECONDS
  if [[ -f "$OUT/$1/DONE" ]]; then # finished earlier: keep its load record
    stats "$1" "$OUT/$1/last.pth.tar"
    return
  fi
  echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)" >"$OUT/$1.load"
  run "$@"
  echo "train wall $((SECONDS - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/$1.load"
  stats "$1" "$OUT/$1/last.pth.tar"
  echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg); wall $((SECONDS - t0)) s" >>"$OUT/$1.load"
}

busy() {  # our running jobs, plus runs started by an earlier invocation that are not finished
  local n
  n=$(jobs -rp | wc -l)
  for r in ${EXTERNAL:-}; do [[ -f "$OUT/$r.heldout.json" ]] || n=$((n + 1)); done
  echo "$n"
}

run_arms() {
  local name arm
  for name in $ORDER; do
    [[ " ${EXTERNAL:-} " == *" $name "* ]] && continue
    while (($(busy) >= PAR)); do
      sleep 15 # polling, not `wait -n`: a run of an earlier invocation may free the slot
    done
    arm=${name%_s*}
    # shellcheck disable=SC2086
    job "$name" ${ARM[$arm]} --seed "${name##*_s}" &
    sleep 2
  done
  wait
  echo "[$(date -Is)] all runs done"
}
