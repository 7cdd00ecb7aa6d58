#!/usr/bin/env bash
# GPU benchmark: the treatment and diagnosis benchmarks on CUDA in fp32, bf16 and fp16.
#
#   bash benchmarks/gpu.sh [--out DIR]      # on a CUDA machine, from the repository root
#   bash benchmarks/gpu.sh --dry-run        # the same pipeline on CPU with tiny sizes (CI)
#
# Installs nothing: it needs only the project's own environment (torch with CUDA, timm,
# md_plugin). It writes into DIR (default benchmarks/results/gpu/):
#   bench_treatment.txt  ratio tables vs a plain step + absolute img/s, per precision:
#                        ours, batched and the naive official reference (fp32; its per-sample
#                        host syncs are what a GPU pays for), and --md-every k = 1, 2, 4, 8;
#                        fp16 is the GradScaler path with scaled cotangents
#   bench_diagnosis.txt  diagnosis vs training throughput, per precision
#   bench_reads.txt      a pass of training steps with the old per-step host reads of the logged
#                        losses vs the device-side sums the trainer uses now
#   bench_ddp.txt        a 2-process DDP step (plain, Model Doctor, every 4), only with >= 2 GPUs
#   summary.txt          every table, without the RESULT json lines
# Each file ends with a `RESULT {json}` line holding every measured time. Under 8 minutes on one
# GPU (timed stages are printed); --dry-run takes well under a minute of CPU time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
OUT=benchmarks/results/gpu
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY=1; shift ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
AMP=fp32,bf16,fp16

if ((DRY)); then
  export OMP_NUM_THREADS=1
  DEV=cpu
  NGPU=2 # two gloo processes on CPU stand in for two GPUs
  TREAT=(--models resnet20_cifar --layers last_conv --batch-size 2 --steps 1 --warmup 0
    --spatial off --no-memory --md-every 1,2 --md-every-cycles)
  DIAG=(--models resnet20_cifar --layers last_conv --images 8 --batch-size 4 --per-class 2
    --repeats 1 --warmup 0 --no-memory)
  DDP=(--models resnet20_cifar --layers last_conv --batch-size 2 --steps 1 --warmup 0
    --md-every 2 --amp fp32 --device cpu)
  READS=(--model resnet20_cifar --batch-size 2 --steps 2 --repeats 1 --warmup 0)
else
  DEV=cuda
  if ! NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())') || ((NGPU < 1)); then
    echo "error: no CUDA device visible to torch (on CPU, use --dry-run)" >&2
    exit 2
  fi
  TREAT=(--steps 15 --warmup 2 --spatial both --md-every 1,2,4,8 --md-every-cycles)
  DIAG=(--images 4096 --repeats 5 --warmup 1)
  DDP=(--models resnet32_cifar,resnet18 --steps 15 --warmup 2 --md-every 4 --amp fp32,bf16
    --device cuda)
  READS=(--steps 50 --repeats 5 --warmup 1)
fi

stage() { # stage NAME CMD...: run, log to $OUT/NAME.txt, print its wall time
  local name=$1 t0=$SECONDS
  shift
  echo "[$(date -u +%H:%M:%S)] $name: $*"
  if ! "$@" >"$OUT/$name.txt" 2>&1; then
    echo "error: $name failed, see $OUT/$name.txt" >&2
    tail -n 20 "$OUT/$name.txt" >&2
    exit 1
  fi
  echo "  $name done in $((SECONDS - t0)) s"
}

T0=$SECONDS
stage bench_treatment "$PY" benchmarks/bench_treatment.py --device "$DEV" --amp "$AMP" \
  --variants batched,naive "${TREAT[@]}"
stage bench_diagnosis "$PY" benchmarks/bench_diagnosis.py --device "$DEV" --amp "$AMP" "${DIAG[@]}"
stage bench_reads "$PY" benchmarks/bench_reads.py --device "$DEV" "${READS[@]}"
if ((NGPU >= 2)); then
  stage bench_ddp "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
    benchmarks/bench_ddp.py "${DDP[@]}"
else
  echo "one GPU: no DDP step" | tee "$OUT/bench_ddp.txt"
fi
for f in bench_treatment bench_diagnosis bench_reads bench_ddp; do
  echo "##### $f"
  grep -v '^RESULT ' "$OUT/$f.txt" || true
done >"$OUT/summary.txt"
echo "all done in $((SECONDS - T0)) s; tables: $OUT/summary.txt"
