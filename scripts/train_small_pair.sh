#!/usr/bin/env bash
# Trains the small SpecDiff pair (models/small-target, small-mdlm, small-ar-drafter) on one
# GPU in about ten minutes, with this project's `specdiff-train` commands only:
#   1. four targets, one per dropout rate, side by side on the GPU, each sized to
#      TARGET_MINUTES and keeping its weights with the lowest development perplexity
#      (the held-out file's tokens after the 100,000 every target reports on);
#   2. the one with the lowest development perplexity becomes the target;
#   3. its MDLM drafter and AR baseline, distilled from it on the same data, each given
#      DRAFTER_MINUTES.
# The model cards quote the resulting commands. On a CPU this takes days, not minutes:
# DEVICE=cpu with small sizes is how the script itself is tested.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-runs/small-pair}
DEVICE=${DEVICE:-cuda}
TARGET_MINUTES=${TARGET_MINUTES:-3.25}
DRAFTER_MINUTES=${DRAFTER_MINUTES:-1.0}
DROPOUTS=${DROPOUTS:-"0.15 0.25 0.35 0.45"}
TARGET_SIZE=${TARGET_SIZE:-"--n-layer 11 --n-embd 512 --n-head 8"}
NUM_SEQUENCES=${NUM_SEQUENCES:-4096}
# The MDLM's step count is fixed: sized from its first steps (slow on a GPU: 0.29 s
# against 0.056 s later) the time budget planned 202 steps and left it untrained. 1000
# steps took 56 s on an H200, the AR drafter's budgeted minute (2319 steps, 58 s).
MDLM_STEPS=${MDLM_STEPS:-1000}
TRAIN="python -m vllm_specdiff.training.cli"
DATA=data/tinystories
ON_DEVICE="--device $DEVICE --bf16-autocast --save-dtype bfloat16 --seed 0 --no-progress"
mkdir -p "$RUNS"

for d in $DROPOUTS; do
  $TRAIN target $ON_DEVICE $TARGET_SIZE --dropout "$d" \
    --corpus $DATA/tinystories_v1_train_head_2MiB.txt $DATA/tinystories_v2gpt4_train_head_10k_lines.txt \
    --valid $DATA/tinystories_v1_valid_head.txt --tokenizer models/tiny-target \
    --out "$RUNS/target-dropout$d" --n-positions 1024 --block-size 1024 --batch-size 16 \
    --lr 1e-3 --warmup-steps 50 --time-budget-minutes "$TARGET_MINUTES" --eval-every 50 \
    --checkpoint-every 100000 \
    > "$RUNS/target-dropout$d.log" 2>&1 &
done
wait

TARGET=$(python - "$RUNS" $DROPOUTS <<'PY'
import json, sys
runs, rates = sys.argv[1], sys.argv[2:]
rows = []
for d in rates:
    try:
        s = json.load(open(f"{runs}/target-dropout{d}/training_summary.json"))
    except FileNotFoundError:
        print(f"dropout {d}: no model (see {runs}/target-dropout{d}.log)", file=sys.stderr)
        continue
    rows.append((s["dev_ppl"], d, s))
    print(f"dropout {d}: {s['step']} steps, kept step {s['kept_step']}, development "
          f"perplexity {s['dev_ppl']:.2f}, held-out {s['valid_ppl']:.2f}", file=sys.stderr)
if not rows:
    sys.exit("no target finished")
print(f"{runs}/target-dropout{min(rows)[1]}")
PY
)
echo "target: $TARGET (lowest development perplexity)"

DISTILL="--target $TARGET --prompts $DATA/tinystories_v1_train_head_2MiB.txt \
  --generator transformers --gen-batch-size 512 --num-sequences $NUM_SEQUENCES --new-tokens 192 \
  --sampled-fraction 0.3 --distill-data $RUNS/distill.pt --kl-weight 1.0 --teacher-top-k 32 \
  --lr 1e-3 --time-budget-minutes $DRAFTER_MINUTES --checkpoint-every 100000 $ON_DEVICE"
$TRAIN drafter $DISTILL --max-steps "$MDLM_STEPS" --out "$RUNS/small-mdlm" \
  --attention block_causal --all-spans \
  --hidden-dim 256 --n-blocks 2 --n-heads 4 --cond-dim 64 --model-length 1024 \
  --context-window 256 --gammas 4,8,16 --batch-size 32 --warmup-steps 30 \
  > "$RUNS/small-mdlm.log" 2>&1
$TRAIN ar-drafter $DISTILL --out "$RUNS/small-ar-drafter" --mdlm "$RUNS/small-mdlm" \
  --n-embd 256 --n-head 4 --n-positions 1024 --seq-len 256 --batch-size 64 --warmup-steps 20 \
  > "$RUNS/small-ar-drafter.log" 2>&1
ln -sfn "$(basename "$TARGET")" "$RUNS/small-target"
echo "done: $RUNS/small-target, $RUNS/small-mdlm, $RUNS/small-ar-drafter"
