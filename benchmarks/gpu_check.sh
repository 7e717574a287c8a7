#!/usr/bin/env bash
# GPU acceptance run, one script, one person, one CUDA GPU, at most 10 minutes; it ends with ONE
# Markdown table (part, what was measured, value, unit, status ok / FAILED / skipped).
#
#   (i)   fused CUDA bias_act built with ninja (CTSYNTH_FUSED_OPS=1: a failed build is an error,
#         not a silent fallback) and its parity with the reference op (fp32, bf16, fp16; NCHW and
#         NHWC); tests/test_gan_ops.py; one training step's losses and gradients, fast path vs
#         reference path, on CUDA;
#   (ii)  s/kimg at 256 px, `stylegan2` preset, batch 8 (4 warm-up, 32 timed minibatches): reference path (fused ops off, grouped
#         modulated convs, float32) vs the fast path in float32 and with the top 4 resolutions in
#         bfloat16 (the reference implementation's fp16 layers on GPU), after a warm-up;
#   (iii) generation: images/s of ctsynth.gan.generate.generate_images (PNG files written) and of
#         its synthesis function alone, freshly built networks at 256 px `stylegan2` and 64 px
#         `cpu64`, batch = the generate params' default (32);
#   (iv)  classifier sweep items with classifier.device cuda, seconds per item: the default small
#         CNN at 64 px (arms synthetic and classic, ratio 0.5, seed 0) and the reference study's
#         frozen ResNet50 at 224 px (random weights file; cold, then warm feature cache);
#   (v)   `cpu64` (conditional, 2 classes) trained for a wall-clock budget (default 180 s;
#         CTSYNTH_GAN_BUDGET_S or --gan-budget-s) on the phantom set: kimg reached, KID and pixel
#         KID against their real-vs-real floors (benchmarks/gan_convergence.py's feature space).
# The python parts are benchmarks/gpu_acceptance.py (one subcommand each).
#
# Time budget (each part runs under `timeout`; a part over its budget is a FAILED row):
#   phantom data + synthetic stand-in 40 s | (i) build + op parity 90 s, op tests 40 s, step
#   parity 30 s | (ii) 90 s | (iii) 30 s | (iv) 60 s | (v) GAN budget + 30 s (210 s)
#   = 590 s, plus a few seconds for the machine summary (missing packages installed with pip first
#   are not counted). A longer --gan-budget-s lengthens (v) alone.
#
# No `pip install -e .`: PYTHONPATH=src. Needs torch (any recent CUDA build), torchvision, numpy,
# pillow, tqdm, pytest, ninja, pandas; installs the missing ones with pip if it can. Data and
# outputs go to a fresh temporary folder (mktemp -d), removed at the end unless CTSYNTH_GPU_CHECK_KEEP=1.
#
#   bash benchmarks/gpu_check.sh                      # the acceptance run (CUDA)
#   bash benchmarks/gpu_check.sh --gan-budget-s 600   # (v) with 10 minutes of training
#   bash benchmarks/gpu_check.sh --dry-run            # CPU, tiny configurations, same table (~2 min on 2 cores)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src:.${PYTHONPATH:+:$PYTHONPATH}
export CTSYNTH_EXT_DIR=${CTSYNTH_EXT_DIR:-$PWD/.ext_build}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

DRY=0
GAN_BUDGET=${CTSYNTH_GAN_BUDGET_S:-180}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --gan-budget-s) GAN_BUDGET=$2; shift ;;
    --gan-budget-s=*) GAN_BUDGET=${1#*=} ;;
    *) echo "unknown argument $1 (--dry-run, --gan-budget-s S)"; exit 2 ;;
  esac
  shift
done

echo "== machine"
date -u; uname -m; nproc
command -v lscpu >/dev/null && lscpu | grep -m1 "Model name"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
command -v nvcc >/dev/null && nvcc --version | tail -1
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

for pkg in numpy PIL tqdm pytest ninja pandas torchvision; do
  $PY -c "import $pkg" 2>/dev/null || { name=$pkg; [ $pkg = PIL ] && name=pillow; $PY -m pip install -q "$name" || echo "could not install $name"; }
done

WORK=$(mktemp -d -t ctsynth-gpu-check.XXXXXX)
RESULTS=$WORK/results.jsonl
[ "${CTSYNTH_GPU_CHECK_KEEP:-0}" = 1 ] && echo "keeping $WORK" || trap 'rm -rf "$WORK"' EXIT
ACC=("$PY" -m benchmarks.gpu_acceptance)
status=0

if [ $DRY = 1 ]; then
  # The dry run checks that every part runs and fills its rows; its budgets only stop a hang, so
  # they are 3x the GPU ones (a 2-core machine shared with other work is several times slower).
  DEVICE=cpu; SIZE=(--dry-run); GAN_BUDGET=${CTSYNTH_GAN_BUDGET_S:-20}; SCALE=${CTSYNTH_GPU_CHECK_BUDGET_SCALE:-3}
  echo "== dry run: CPU, tiny configurations (results in $WORK)"
else
  DEVICE=cuda; SIZE=(); SCALE=${CTSYNTH_GPU_CHECK_BUDGET_SCALE:-1}
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device (try --dry-run)"; exit 1; }
fi

# part <id> <budget s> <what> -- command ...: runs the command under `timeout`; a command that
# breaks without recording its own FAILED row (exit status other than 0 and 3) gets one here.
part() {
  local id=$1 limit=$(($2 * SCALE)) what=$3; shift 4
  echo "== ($id) $what (budget $limit s)"
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@"; rc=$?
  if [ $rc != 0 ]; then
    status=1
    if [ $rc != 3 ]; then
      local why="exit status $rc"
      { [ $rc = 124 ] || [ $rc = 137 ]; } && why="stopped at its budget of $limit s"
      "${ACC[@]}" mark --results "$RESULTS" --part "$id" --what "$what" --status FAILED --note "$why"
    fi
  fi
  echo "-- ($id) $((SECONDS - start)) s"
}

part data 40 "phantom prepared set and synthetic stand-in" -- "${ACC[@]}" data --workdir "$WORK" "${SIZE[@]}"
if [ $DRY = 1 ]; then
  "${ACC[@]}" mark --results "$RESULTS" --part i --what "fused CUDA bias_act build and parity" --status skipped --note "dry run: needs CUDA"
  part i 40 "tests/test_gan_ops.py" -- "${ACC[@]}" op-tests --results "$RESULTS" --dry-run
else
  part i 90 "fused CUDA bias_act build and parity" -- env CTSYNTH_FUSED_OPS=1 "${ACC[@]}" op-parity --results "$RESULTS"
  part i 40 "tests/test_gan_ops.py" -- "${ACC[@]}" op-tests --results "$RESULTS"
fi
part i 30 "training-step parity, fast vs reference path" -- "${ACC[@]}" step-parity --results "$RESULTS" --device $DEVICE "${SIZE[@]}"
part ii 90 "GAN training s/kimg, reference vs fast path" -- "${ACC[@]}" throughput --results "$RESULTS" --device $DEVICE "${SIZE[@]}"
part iii 30 "generation throughput" -- "${ACC[@]}" generation --results "$RESULTS" --workdir "$WORK" --device $DEVICE "${SIZE[@]}"
part iv 60 "classifier sweep items" -- "${ACC[@]}" sweep --results "$RESULTS" --workdir "$WORK" --device $DEVICE "${SIZE[@]}"
part v $((${GAN_BUDGET%.*} / SCALE + 30)) "GAN quality after a ${GAN_BUDGET} s training budget" -- \
  "${ACC[@]}" quality --results "$RESULTS" --workdir "$WORK" --device $DEVICE --budget-s "$GAN_BUDGET" "${SIZE[@]}"

echo
echo "== acceptance table ($( [ $DRY = 1 ] && echo "dry run, CPU" || echo "CUDA" ), $(date -u '+%Y-%m-%d %H:%M UTC'))"
"${ACC[@]}" table --results "$RESULTS" || status=1
echo "== gpu_check exit status $status"
exit $status
