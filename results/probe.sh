#!/usr/bin/env bash
# One recipe probe of issue 13: the tiny teacher on the shared corpus, one lever changed at a time.
#   bash results/probe.sh NAME [pretrain.py flags that override the base]     (RUNS=/work/runs by default)
# Writes $RUNS/probes/NAME.metrics.jsonl (the curve; results/plot.py reads it) and NAME.pt.
set -euo pipefail
R=$(cd "$(dirname "$0")/.." && pwd)
D=${DATA:-$R/../shared/data}
RUNS=${RUNS:-/work/runs}
name=$1; shift
mkdir -p "$RUNS/probes"
rm -f "$RUNS/probes/$name.metrics.jsonl"
exec python "$R/pretrain.py" --data "$D/pretrain/train.txt" --valid "$D/pretrain/valid.txt" --preset tiny \
  --bf16 --batch-size 64 --lr 2e-3 --warmup-steps 300 --dropout 0 --beta2 0.98 --max-steps 6000 --stop-at 1500 \
  --log-every 50 --eval-every 250 --cache-dir "$RUNS/cache" --out "$RUNS/probes/$name.pt" "$@"
