#!/usr/bin/env bash
# Scaling points from one WSD run plus cooldowns vs cosine runs of matched length (issue 25, part 4).
# For each of three tiny sizes on the built-in corpus: one WSD run of STEPS steps (its decay: the
# last 20%) saving its constant phase, two cooldowns branched from it at STEPS/4 and STEPS/2 (each
# decaying for a quarter of its branch point: 20% of its own length), and three cosine runs of the
# same three lengths. Both point sets are fitted; the step counts say what each cost.
#   bash scripts/wsd_scaling_demo.sh          (STEPS=240 OUT=runs/wsd_demo by default)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/wsd_demo}
STEPS=${STEPS:-240}
LEANLM=${LEANLM:-.venv/bin/leanlm}
A=$((STEPS / 4)); B=$((STEPS / 2))
COMMON="train.batch_size=8 optim.warmup_steps=10 eval.tokens=32768 log.progress=false"
for spec in "64 2 2 172" "96 2 2 256" "128 3 4 344"; do
  read -r d layers heads ffn <<<"$spec"
  shape="model.d_model=$d model.n_layers=$layers model.n_heads=$heads model.ffn_dim=$ffn"
  wsd="$OUT/wsd/d$d"
  if [ ! -f "$wsd/scaling.jsonl" ]; then
    # shellcheck disable=SC2086
    "$LEANLM" train configs/tiny.yaml $shape $COMMON optim.schedule=wsd train.steps="$STEPS" \
      train.out_dir="$wsd" eval.every=0 checkpoint.every="$A" checkpoint.keep=0 log.scaled_set=wsd
  fi
  for at in "$A" "$B"; do
    n=$((at / 4))
    [ -f "$OUT/wsd/d$d-cooldown-$at+$n/scaling.jsonl" ] || "$LEANLM" cooldown "$wsd" --at "$at" --steps "$n" log.scaled_set=wsd
  done
  for total in $((A + A / 4)) $((B + B / 4)) "$STEPS"; do
    run="$OUT/cosine/d$d-$total"
    [ -f "$run/scaling.jsonl" ] && continue
    # shellcheck disable=SC2086
    "$LEANLM" train configs/tiny.yaml $shape $COMMON train.steps="$total" train.out_dir="$run" \
      eval.every=0 checkpoint.every=0 checkpoint.keep=1 log.scaled_set=cosine
  done
done
echo "steps: WSD + cooldowns $((STEPS + A / 4 + B / 4)) per size; cosine $((A + A / 4 + B + B / 4 + STEPS)) per size"
"$LEANLM" fit "$OUT"/wsd/* --grid small --json "$OUT/fit_wsd.json" --plot "$OUT/fit_wsd.png"
"$LEANLM" fit "$OUT"/cosine/* --grid small --json "$OUT/fit_cosine.json" --plot "$OUT/fit_cosine.png"
