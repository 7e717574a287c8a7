#!/usr/bin/env bash
# Compare CPU-preset candidates by quality per kimg, in parallel on one GPU (quality per kimg
# does not depend on the device; each candidate's CPU price comes from gan_throughput.py).
#   bash benchmarks/gan_convergence_gpu.sh OUT_DIR [DEADLINE_S] [KIMG]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} CTSYNTH_FUSED_OPS=0 PYTHONUNBUFFERED=1
OUT=${1:?out dir}; DEADLINE=${2:-300}; KIMG=${3:-60}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
run() {  # name, then --set pairs
  local name=$1; shift
  $PY benchmarks/gan_convergence.py --out "$OUT/$name" --preset cpu64 --kimg "$KIMG" --eval-kimg 4 \
    --device cuda --threads 1 --deadline-s "$DEADLINE" "$@" >"$OUT/$name.log" 2>&1 &
}
SIMPLE="--set pl_weight=0 --set style_mixing_prob=0"
run base
run simple $SIMPLE
run simple_lr5 $SIMPLE --set lr=0.005
run simple_ada100 $SIMPLE --set ada_kimg=100
run simple_gamma1 $SIMPLE --set gamma=1
run small $SIMPLE --set channel_base=1024
run small_b8 $SIMPLE --set channel_base=1024 --set batch=8 --set gamma=0.1
run wide $SIMPLE --set channel_base=4096 --set channel_max=256
wait
for f in "$OUT"/*/convergence.csv; do echo "== $f"; cat "$f"; done
