#!/usr/bin/env bash
# CNNSplitter experiment, round two (issue 18; docs/splitter.md "Round two"): split both strong
# models with every method and seed, then measure the composed accuracy on the test split and
# patch the weak models (experiments/splitter_compare.py), then the tables and figure
# (experiments/summarize_splitter.py).
#
# Needs the runs of experiments/splitter_train.sh (strong_simcnn, weak0, weak2, weak4) in MODELS
# and the shared resnet20 strong model (../shared/checkpoints/resnet20_cifar10_c04_e30, the same
# classes 0-4 and --val-from-train 2500 --data-seed 0 hold-out as the SimCNN run).
# Usage: bash experiments/splitter_round2.sh [split|compare|summary]...   (env below)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:?set DATA_DIR to the folder holding cifar-10-batches-py}
MODELS=${MODELS:-output/splitter}
SPLITS=${SPLITS:-output/splitter_round2}
RESULTS=${RESULTS:-experiments/results/splitter/round2}
R20=${R20:-../shared/checkpoints/resnet20_cifar10_c04_e30/model_best.pth.tar}
export OMP_NUM_THREADS=1

split() {  # split NAME r20|simcnn [flags...]: one md-doctor split run, skipped when done
  local name=$1 strong=$2
  shift 2
  [[ -f $SPLITS/$name/modules.safetensors ]] && return 0
  local m=(--model resnet20_cifar --checkpoint "$R20")
  [[ $strong == simcnn ]] && m=(--model simcnn_cifar --model-kwargs width_mult=0.5
    --checkpoint "$MODELS/strong_simcnn_c04/model_best.pth.tar")
  echo "[$(date -Is)] start $name: md-doctor split ${m[*]} $*"
  python -m md_plugin split "${m[@]}" --dataset torch/cifar10 --data-dir "$DATA_DIR" \
    --class-map experiments/splitter/strong_0-4.txt --val-from-train 2500 --data-seed 0 \
    --classes 0 1 2 3 4 --workers 0 --no-progress --output "$SPLITS" --experiment "$name" "$@"
}

stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(split compare summary)
for what in "${stages[@]}"; do
  case $what in
    split)
      for s in r20 simcnn; do
        for seed in 0 1 2; do split "${s}_ga_affine_s$seed" "$s" --seed "$seed"; done   # the defaults
        split "${s}_grad_auto_affine_s0" "$s" --search gradient --mask-init auto
      done
      for seed in 0 1 2; do
        split "r20_grad_ones_affine_s$seed" r20 --search gradient --mask-init ones --seed "$seed"
        split "simcnn_grad_t60_affine_s$seed" simcnn --search gradient --mask-init ones \
          --target-kernels 0.6 --kernel-alpha 1 --seed "$seed"
      done
      split simcnn_grad_ones_affine_s0 simcnn --search gradient --mask-init ones
      split r20_grad_t60_affine_s0 r20 --search gradient --mask-init ones --target-kernels 0.6 \
        --kernel-alpha 1
      for s in r20 simcnn; do  # the same search as ${s}_grad_t60_affine_s0, uncalibrated
        split "${s}_grad_t60_none_s0" "$s" --search gradient --mask-init ones --target-kernels 0.6 \
          --kernel-alpha 1 --calibrate none
      done
      split r20_grad_t60e46_affine_s0 r20 --search gradient --mask-init ones --target-kernels 0.6 \
        --kernel-alpha 1 --epochs 46
      # grad_autov1_* (docs/splitter.md) came from the first sensitivity start, at commit 4bce11f:
      # split NAME STRONG --search gradient [--target-kernels 0.6] there (its default was auto)
      ;;
    compare)
      python experiments/splitter_compare.py --splits "$SPLITS" --models "$MODELS" --out "$RESULTS"
      for d in "$SPLITS"/*/; do  # each split's small files (not its search state)
        n=$(basename "$d")
        mkdir -p "$RESULTS/splits/$n"
        for f in args.yaml modules.safetensors modules.csv history.csv split.log sensitivity.csv; do
          [[ -f $d/$f ]] && cp "$d/$f" "$RESULTS/splits/$n/"
        done
      done ;;
    summary)
      python experiments/summarize_splitter.py --results "$RESULTS" \
        --figure docs/figures/splitter_round2.png ;;
    *) echo "unknown stage $what" >&2; exit 2 ;;
  esac
done
