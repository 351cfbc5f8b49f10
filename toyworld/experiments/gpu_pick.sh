#!/usr/bin/env bash
# toyworld/experiments/sample_pick.py on the lent GPU (run from the repository root; everything comes back in $OUT/pick.tar,
# rewritten after each stage, since at most 8 files come back):
#   SEEDS="4 5 6" bash toyworld/experiments/gpu_pick.sh [DRAWS]
# trains both concepts at SEEDS (one process per seed), screens every pair of the draws (DRAWS: a folder of
# earlier draws to add, e.g. carried from a CPU run), confirms the finalists (TOP, RANDOM_N) and measures them on
# the README prompt (BATCHES), in SHARDS processes each, then picks.
set -u
export PYTHONUNBUFFERED=1
bash bench/gpu_setup.sh
D=/tmp/pick; rm -rf $D; mkdir -p $D; [ -n "${1:-}" ] && cp "$1"/* $D/
start=$(date +%s); t() { echo $(( $(date +%s) - start )); }
pack() { tar -cf "$OUT/pick.tar" -C $D . ; echo "$1 done at $(t) s"; }
sp() { python3 -m toyworld.experiments.sample_pick "$@" --device cuda --threads 1 --dir $D 2>&1 | grep -v "Warn\|torchvision"; }
N=${SHARDS:-16}
for s in ${SEEDS:-}; do sp train --seed $s | cut -c1-200 & done; wait; pack train
for m in $(ls $D | sed -n 's/^cat-mittens-\([0-9]*\)\.safetensors$/\1/p'); do sp screen --mittens $m >/dev/null & done
wait; pack screen
for i in $(seq 0 $((N-1))); do sp confirm --shard $i --shards $N --top ${TOP:-16} --random ${RANDOM_N:-8} & done
wait; pack confirm
for i in $(seq 0 $((N-1))); do sp readme --shard $i --shards $N --batches ${BATCHES:-12} & done; wait; pack readme
sp pick | cut -c1-2000
pack pick
