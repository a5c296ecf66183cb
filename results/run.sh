#!/usr/bin/env bash
# The miniature reproduction of README "Miniature reproduction", from scratch, on 2 CPU cores.
# Run from an empty directory beside the repo: bash ../main/results/run.sh  (writes ckpt/, logs/, results/)
# Stage times on this machine are in the README.
set -euo pipefail
R=$(cd "$(dirname "$0")/.." && pwd)
D=$R/../shared/data
mkdir -p ckpt logs results
t() { local s=$(date +%s); "$@"; echo "TIME $(( $(date +%s) - s ))s: $*" >> times.txt; }

# 1. pretraining: tiny preset (H=128, 4 layers, 2 heads), 8 experts, the shared prose corpus, bf16
P="--data $D/pretrain/train.txt --valid $D/pretrain/valid.txt --preset tiny --batch-size 32 --lr 1e-3 --bf16
   --log-every 50 --eval-every 100000 --keep-epochs"
t python $R/pretrain.py $P --epochs 2 --out ckpt/vanilla.pt                          # teacher, Eq. 12
t python $R/pretrain.py $P --epochs 1 --moe --experts 8 --teacher ckpt/vanilla.pt \
    --relation-tokens 256 --out ckpt/moe_tcd.pt                                      # TCD, Eq. 13 (256 = 4096 * 32/512)
t python $R/pretrain.py $P --epochs 3 --moe --experts 8 --out ckpt/moe.pt             # baseline; keeps moe.epoch{1,2,3}.pt

# 2. fine-tuning: five GLUE tasks, full (lr 5e-5) and adapter-64 (lr 3e-4), seeds 1 2, 3 epochs,
#    at most 9,000 training examples per task (cuts SST-2 only); two one-thread jobs at a time
export OMP_NUM_THREADS=1
F="--data-dir $D/glue --task rte mrpc stsb cola sst2 --seeds 1 2 --epochs 3 --bf16 --max-train 9000"
for m in ckpt/vanilla.pt ckpt/moe_tcd.pt ckpt/moe.epoch1.pt ckpt/moe.epoch3.pt; do
  n=$(basename $m .pt)
  t python $R/finetune.py --ckpt $m $F --adapter 0 --lr 5e-5 --out results/finetune-$n-full.json > logs/$n-full.log 2>&1 &
  t python $R/finetune.py --ckpt $m $F --adapter 64 --lr 3e-4 --out results/finetune-$n-adapter.json > logs/$n-adapter.log 2>&1 &
  wait
done

# 3. OOD masked-LM evaluation on the Pile-format sample (Table 4)
t python $R/ood_eval.py --data $D/pile-ood/val.jsonl --bf16 --max-tokens-per-subset 100000 \
    --ckpt ckpt/vanilla.pt ckpt/moe_tcd.pt ckpt/moe.epoch1.pt ckpt/moe.epoch3.pt --out results/ood.json
