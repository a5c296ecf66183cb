#!/usr/bin/env bash
# Cheap recipe probes on the shared corpus, one lever changed at a time (README, results/README.md).
#
#   bash results/probe.sh pretrain NAME [pretrain.py flags]   # the tiny vanilla base recipe, flags override it
#   bash results/probe.sh transfer NAME CKPT [--full-only] [--all-tasks]   # fine-tune CKPT, one seed
#   bash results/probe.sh mode ALPHA                          # MoDE's α on pretraining curves only
#   bash results/probe.sh --help                              # this text
#
# pretrain: up to 6,000 steps (--stop-at 1500 unless a flag overrides it), curve in
# results/probes/NAME.jsonl, checkpoint $RUNS/probes/NAME.pt; the same command resumes it.
# transfer: the reproduction's fine-tuning (full lr 5e-5 and adapter-64 lr 3e-4, 10 epochs, dropout
# 0.1, SST-2 cut to 9,000 examples, seed 1) on SST-2 and STS-B into results/probes/transfer/NAME.json;
# --full-only skips the adapter runs (half the time; adapters trailed full fine-tuning in every
# probe so far); --all-tasks adds CoLA, MRPC and RTE, for the GLUE average of Tables 1-2.
# mode: the MoDE arm of run.sh (its recipe, 16 experts, λB 250, 256 tokens) with this α for 2 epochs of
# the 40-epoch schedule, curve in results/probes/mode/aALPHA.jsonl, then results/expert_spread.py on its
# last checkpoint into results/probes/mode/aALPHA-spread.json. No fine-tuning: α is chosen on these alone.
# RUNS (default: runs/ in this repository) and DATA (default: ../shared/data) move outputs and inputs.
set -euo pipefail
R=$(cd "$(dirname "$0")/.." && pwd)
D=${DATA:-$R/../shared/data}
RUNS=${RUNS:-$R/runs}
usage() { sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }
fail() { echo "probe.sh: error: $*" >&2; exit 2; }
case ${1:-} in
  -h|--help) usage; exit 0 ;;
  pretrain) [ $# -ge 2 ] || fail "pretrain needs a NAME (see --help)" ;;
  mode) [ $# -eq 2 ] || fail "mode needs one ALPHA (see --help)" ;;
  transfer) [ $# -ge 3 ] || fail "transfer needs a NAME and a CKPT (see --help)"
            for flag in "${@:4}"; do
              case $flag in --full-only|--all-tasks) ;; *) fail "transfer takes --full-only or --all-tasks, not '$flag'" ;; esac
            done ;;
  "") fail "no command: pretrain, transfer or mode (see --help)" ;;
  *) fail "unknown command '$1': pretrain, transfer or mode (see --help)" ;;
esac
command=$1 name=$2; shift 2
case $name in -*) fail "'$name' is not a probe NAME (see --help)" ;; esac
mkdir -p "$RUNS/probes" "$R/results/probes/transfer"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$command" = mode ]; then
  alpha=$name out=$RUNS/probes/mode-a$name.pt dir=$R/results/probes/mode
  mkdir -p "$dir"
  if [ -f "$out" ]; then
    python "$R/pretrain.py" --resume "$out" --stop-epochs 2
  else                                     # run.sh's RECIPE and arm flags (results/run.sh, stage 9)
    python "$R/pretrain.py" --data "$D/pretrain/train.txt" --valid "$D/pretrain/valid.txt" --preset tiny --bf16 \
      --batch-size 64 --lr 2e-3 --warmup-steps 300 --dropout 0 --beta2 0.98 --position-init sinusoid \
      --short-seq-len 32 --short-seq-steps 750 --epochs 40 --stop-epochs 2 --eval-every 250 --log-every 50 \
      --cache-dir "$RUNS/cache" --moe --experts 16 --lambda-b 250 --out "$out" \
      $([ "$alpha" = 0 ] || echo "--mode-alpha $alpha --mode-tokens 256")   # α = 0: the baseline itself
  fi
  cp "$RUNS/probes/mode-a$alpha.metrics.jsonl" "$dir/a$alpha.jsonl"
  python "$R/results/expert_spread.py" "$out" --valid "$D/pretrain/valid.txt" --out "$dir/a$alpha-spread.json" > /dev/null
  exit 0
fi
if [ "$command" = transfer ]; then
  ckpt=$1 modes=("--adapter 0 --lr 5e-5" "--adapter 64 --lr 3e-4") tasks="sst2 stsb"
  case " $* " in *" --full-only "*) modes=("${modes[0]}") ;; esac
  case " $* " in *" --all-tasks "*) tasks="sst2 stsb cola mrpc rte" ;; esac
  for mode in "${modes[@]}"; do
    python "$R/finetune.py" --ckpt "$ckpt" --data-dir "$D/glue" --task $tasks $mode --seeds 1 --epochs 10 \
      --max-train 9000 --bf16 --out "$R/results/probes/transfer/$name.json"
  done
  exit 0
fi
out=$RUNS/probes/$name.pt
if [ -f "$out" ]; then
  python "$R/pretrain.py" --resume "$out" "$@"
else
  python "$R/pretrain.py" --data "$D/pretrain/train.txt" --valid "$D/pretrain/valid.txt" --preset tiny \
    --bf16 --batch-size 64 --lr 2e-3 --warmup-steps 300 --dropout 0 --beta2 0.98 --max-steps 6000 --stop-at 1500 \
    --log-every 50 --eval-every 250 --cache-dir "$RUNS/cache" --out "$out" "$@"
fi
cp "$RUNS/probes/$name.metrics.jsonl" "$R/results/probes/$name.jsonl"
