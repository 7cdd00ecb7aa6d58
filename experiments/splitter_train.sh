#!/usr/bin/env bash
# CNNSplitter experiment, stage 1: the strong and the weak models (docs/splitter.md, "Experiment").
#   strong: resnet20_cifar on CIFAR-10 classes 0-4, 2,500 training images held out (500 per class)
#           for the best epoch and for the splitter (importance, search, ranges); 12 epochs
#           (STRONG_EPOCHS).
#   strong_simcnn: the paper's SimCNN (simcnn_cifar, width 0.5: 32-256 channels, no BN) on the
#           same classes and the same held-out images; 60 epochs (SIMCNN_EPOCHS), lr 0.05 after 3
#           warm-up epochs (no BN: a cold start at 0.05 can diverge).
#   weak:   simcnn_weak on classes 5-9 (-> 0-4) plus one target class (TC) from 0-4 (-> 5),
#           every class cut to 500 training images (seeded; the paper's CIFAR setup, where the
#           CIFAR-100 classes have 500 each), 20% of each class held out (the paper's 80/20), for
#           TC = 0, 2, 4 (fixed in advance); 30 epochs (WEAK_EPOCHS; the paper: 100, best on val).
# CIFAR's test split is read once per model at the end (test_results.json).
# Usage: bash experiments/splitter_train.sh [strong|strong_simcnn|weak0|weak2|weak4]...   (OUT, DATA_DIR env)
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
# launch NAME NPROC ARGS...: like run() in common.sh, under accelerate (DDP over NPROC CPU
# processes, the same total batch). Default 1 process: 8 processes (~700 MB each) plus the other
# sessions' jobs ran this 24 GB machine out of memory.
launch() {
  local name=$1 nproc=$2
  shift 2
  if [[ -f "$OUT/$name/DONE" ]]; then echo "skip $name (done)"; return; fi
  rm -rf "${OUT:?}/$name"
  local port=$((29500 + RANDOM % 400))
  echo "[$(date -Is)] start $name ($nproc processes): train_md.py ${COMMON[*]} $*" | tee "$OUT/$name.log"
  if [[ $nproc == 1 ]]; then
    "$PY" train_md.py "${COMMON[@]}" "$@" --experiment "$name" >>"$OUT/$name.log" 2>&1
  else
    ACCELERATE_USE_CPU=1 "$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$nproc" \
      --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port "$port" \
      train_md.py "${COMMON[@]}" "$@" --experiment "$name" >>"$OUT/$name.log" 2>&1
  fi
  touch "$OUT/$name/DONE"
  echo "[$(date -Is)] end $name" | tee -a "$OUT/$name.log"
}
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(strong weak0 weak2 weak4)
for what in "${stages[@]}"; do
  case $what in
    strong) launch strong_r20_c04 "${NPROC_STRONG:-1}" --model resnet20_cifar \
              --class-map $S/strong_0-4.txt --val-from-train 2500 \
              -b $((128 / ${NPROC_STRONG:-1})) --epochs "${STRONG_EPOCHS:-12}" --lr 0.1 \
              --warmup-epochs 0 ;;
    strong_simcnn) launch strong_simcnn_c04 1 --model simcnn_cifar \
              --model-kwargs width_mult="${SIMCNN_WIDTH:-0.5}" --class-map $S/strong_0-4.txt \
              --val-from-train 2500 --epochs "${SIMCNN_EPOCHS:-60}" --lr 0.05 --warmup-epochs 3 ;;
    weak[024]) tc=${what#weak}  # one process each, one after another (shared machine)
              run weak_tc$tc --model simcnn_weak --class-map $S/weak_tc$tc.txt --class-cap 500 \
                --val-from-train 0.2 -b 64 --epochs "${WEAK_EPOCHS:-30}" --lr 0.02 --weight-decay 1e-4 \
                --warmup-epochs 0 ;;
    *) echo "unknown stage $what" >&2; exit 2 ;;
  esac
done
