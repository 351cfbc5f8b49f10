#!/usr/bin/env bash
# One GPU chunk of toy-base work (run by the lent GPU machine from the repository root; results under $OUT).
#   bash toyworld/gpu_toy.sh evaluator SECONDS TOTAL    train the evaluator, then chunk 0 of the base
#   bash toyworld/gpu_toy.sh resume SECONDS TOTAL       continue from .toyckpt/ (the previous chunk's output)
#   bash toyworld/gpu_toy.sh decoder STEPS              then refine the VAE decoder (the shipped base: 16000 steps,
#                                                    320 s on an H200) into $OUT/decoder/vae
# EVAL_STEPS sets the evaluator's steps (default 6000); COMPILE=1 compiles the UNet; CONFLICT=P passes
# --conflict P, PARTS=P --parts P, PAIRS=Q --parts-pairs Q; BENCH=1 then measures the new weights with
# toyworld/quality.py (perfusion only, on the GPU) and packs its results into $OUT/quality.tar; SPREAD=SEEDS runs
# toyworld/experiments/spread.py on them for those training seeds ($OUT/spread-toy-<date>.json, written after every seed).
set -eu
export PYTHONUNBUFFERED=1
bash bench/gpu_setup.sh
mode=$1; seconds=$2; total=${3:-}
if [ "$mode" = decoder ]; then
  python3 -m toyworld.decoder --out "$OUT/decoder" --steps "$seconds" --probe-every 2000 --workers 16 2>&1 \
    | grep -v "should be kept in float32\|requires torchvision\|accelerate\|^\`\`\`\|^\.$"
  exit 0
fi
if [ "$mode" = evaluator ]; then
  python3 -m toyworld.evaluator --out "$OUT/evaluator" --steps "${EVAL_STEPS:-6000}" --workers 16 2>&1 | tail -4
  ev="$OUT/evaluator"; init=()
else
  ev=toyworld/data/evaluator; init=(--init .toyckpt)
fi
python3 -m toyworld.base_train --out "$OUT/toy" "${init[@]}" --images 200000 --seconds "$seconds" \
  --total-seconds "$total" --save-every 100 --workers 16 ${COMPILE:+--compile} \
  ${CONFLICT:+--conflict "$CONFLICT"} ${PARTS:+--parts "$PARTS"} ${PAIRS:+--parts-pairs "$PAIRS"} --evaluator "$ev" 2>&1 | grep -v "Writing model shards\|should be kept in float32\|requires torchvision"
if [ -n "${BENCH:-}${SPREAD:-}" ]; then
  cand=/tmp/toy-candidate
  rm -rf "$cand" && cp -r perfusion_hub/data/toy "$cand" && rm -rf "$cand"/{covariance.safetensors,unet,text_encoder}
  cp -r "$OUT/toy/unet" "$OUT/toy/text_encoder" "$cand/"
fi
if [ -n "${BENCH:-}" ]; then
  q=/tmp/quality && rm -rf "$q"
  python3 -m toyworld.quality --base "$cand" --device cuda --methods perfusion --out "$q" 2>&1 | grep -v Warn || true
  tar -cf "$OUT/quality.tar" -C "$q" .
fi
if [ -n "${SPREAD:-}" ]; then
  python3 -m toyworld.experiments.spread --base "$cand" --device cuda --seeds "$SPREAD" --out "$OUT" 2>&1 | grep -v Warn || true
fi
