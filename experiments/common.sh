# Sourced by experiments/cifar10.sh and cifar10_lt.sh (which set OUT and COMMON first).
# One BLAS/OpenMP thread: the 2-core machine is shared, and with 2 threads PyTorch slowed to
# 40-170 img/s whenever another process held a core (measured), against ~270 img/s with 1.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PYTHON:-python}
if [[ -z "${DATA_DIR:-}" ]]; then
  echo "error: set DATA_DIR to the folder that holds cifar-10-batches-py (e.g. DATA_DIR=../shared/data)" >&2
  exit 2
fi
DATA=$DATA_DIR

run() {  # run NAME ARGS...: one training, logged to $OUT/NAME.log
  local name=$1
  shift
  if [[ -f "$OUT/$name/DONE" ]]; then
    echo "skip $name (done)"
    return
  fi
  rm -rf "${OUT:?}/$name"
  echo "[$(date -Is)] start $name: $PY train_md.py ${COMMON[*]} $* --experiment $name" | tee "$OUT/$name.log"
  "$PY" train_md.py "${COMMON[@]}" "$@" --experiment "$name" >>"$OUT/$name.log" 2>&1
  touch "$OUT/$name/DONE"
  echo "[$(date -Is)] end $name" | tee -a "$OUT/$name.log"
}
