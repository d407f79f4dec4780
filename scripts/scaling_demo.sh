#!/usr/bin/env bash
# Train four tiny LLaMA sizes on the built-in corpus, then fit a scaling law to all their
# checkpoints (eval.early adds log-spaced early points). Results: $OUT/fit.json, $OUT/fit.png.
#   bash scripts/scaling_demo.sh            (STEPS=300 OUT=runs/scaling_demo by default)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/scaling_demo}
STEPS=${STEPS:-300}
LEANLM=${LEANLM:-.venv/bin/leanlm}
# d_model n_layers n_heads ffn_dim
for spec in "64 2 2 172" "96 2 2 256" "128 3 4 344" "192 4 4 512"; do
  read -r d layers heads ffn <<<"$spec"
  run="$OUT/d$d"
  if [ -f "$run/scaling.jsonl" ] && [ -d "$run/checkpoints" ]; then
    echo "skip $run (done)"
    continue
  fi
  "$LEANLM" train configs/tiny.yaml model.d_model="$d" model.n_layers="$layers" model.n_heads="$heads" \
    model.ffn_dim="$ffn" train.steps="$STEPS" train.out_dir="$run" eval.every=50 eval.early=4 \
    eval.tokens=32768 checkpoint.every=0 checkpoint.keep=1 log.progress=false log.scaled_set=scaling_demo
done
"$LEANLM" fit "$OUT"/d* --grid full --budget 1e15 --predict 2e7 5e6 --plot "$OUT/fit.png" --json "$OUT/fit.json"
