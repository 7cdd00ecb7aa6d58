#!/usr/bin/env bash
# Both experiments, one after the other (never two trainings at once on the shared 2-core box):
#     . .venv/bin/activate && nohup bash experiments/run_all.sh > experiments/runs/run_all.log 2>&1 &
set -euo pipefail
mkdir -p experiments/runs
echo "[$(date -Is)] run_all start"
bash experiments/cifar10.sh
bash experiments/cifar10_lt.sh
echo "[$(date -Is)] run_all end"
