#!/usr/bin/env bash
# GPU check, one script: on a CUDA machine
#   (i)  builds the fused CUDA bias_act with ninja (CTSYNTH_FUSED_OPS=1: a failed build is an
#        error, not a silent fallback) and runs the parity tests (tests/test_gan_ops.py) plus CUDA
#        parity of the fused op and of the whole training step against the reference path;
#   (ii) measures s/kimg at 256 px with the `stylegan2` preset, batch 8, for the reference path
#        (fused ops off, grouped modulated convs, float32) and the fast path with the top 4
#        resolutions in bfloat16 (the reference implementation's fp16 layers on GPU), after a
#        warm-up; prints everything.
# No `pip install -e .`: PYTHONPATH=src. Needs torch (any recent CUDA build), numpy, pillow, tqdm,
# pytest, ninja; installs the missing ones with pip if it can.
#
#   bash benchmarks/gpu_check.sh                 # full check (~5-8 minutes on one modern GPU)
#   bash benchmarks/gpu_check.sh --dry-run       # CPU smoke test: tiny preset, 16 minibatches
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export CTSYNTH_EXT_DIR=${CTSYNTH_EXT_DIR:-$PWD/.ext_build}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

echo "== machine"
date -u; uname -m; nproc
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
command -v nvcc >/dev/null && nvcc --version | tail -1
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

for pkg in numpy PIL tqdm pytest ninja pandas; do
  $PY -c "import $pkg" 2>/dev/null || { name=$pkg; [ $pkg = PIL ] && name=pillow; $PY -m pip install -q "$name" || echo "could not install $name"; }
done

status=0
if [ $DRY = 1 ]; then
  echo "== dry run (CPU, tiny): parity tests and a 16-minibatch benchmark of both paths"
  $PY -m pytest -q -x tests/test_gan_ops.py -k "not bf16_run" || status=1
  $PY benchmarks/gan_throughput.py --preset tiny --resolution 32 --batch 4 --reference --arms bf16 \
    --num-bf16-res 2 --warmup 1 --steps 16 --device cpu --threads 2 || status=1
  echo "== dry run exit status $status"
  exit $status
fi

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device"; exit 1; }

echo "== (i) build the fused CUDA op (ninja) and parity tests"
CTSYNTH_FUSED_OPS=1 $PY - <<'EOF' || status=1
import time, torch
from ctsynth.gan.ops import fused, reference
t0 = time.time()
ext = fused.load_extension()
print(fused.extension_status(), f"({time.time() - t0:.0f} s)")
assert ext is not None and "cuda" in fused.extension_status(), "CUDA kernels not built"
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
    for channels_last in (False, True):
        x = torch.randn(4, 32, 16, 16, device="cuda", dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        b = torch.randn(32, device="cuda", dtype=dtype, requires_grad=True)
        y = fused.fused_bias_act(x, b, 1, "lrelu", 0.2, 2 ** 0.5, 1.0)
        r = reference.bias_act(x, b, act="lrelu", clamp=1.0)
        dy = torch.randn_like(y)
        gx, gb = torch.autograd.grad(y, [x, b], dy)
        rx, rb = torch.autograd.grad(r, [x, b], dy)
        # Relative to the largest reference value: bf16 keeps 8 bits of mantissa, so an absolute
        # tolerance would fail on any output larger than ~1 while the op is exact to its precision.
        rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
        errs = [rel(y, r), rel(gx, rx), rel(gb, rb)]
        print(f"cuda bias_act {dtype} channels_last={channels_last}: max relative errors fwd/dx/db {errs}")
        assert max(errs) < tol, errs
print("CUDA parity of the fused op: ok")
EOF
$PY -m pytest -q tests/test_gan_ops.py || status=1
echo "-- training-step parity on CUDA (fast vs reference path, float32)"
$PY - <<'EOF' || status=1
import os, torch
from pathlib import Path
import tempfile
from ctsynth.gan.networks import set_speed_options
from ctsynth.gan.presets import make_config
from ctsynth.gan.train import GANTrainer, TrainingData, TrainOptions
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

def grads(env, grouped, channels_last):
    os.environ["CTSYNTH_FUSED_OPS"] = env
    cfg = make_config("tiny", 32, c_dim=2, batch=4, mbstd=2, fixed_p=0.5, seed=5, channels_last=channels_last)
    data = TrainingData(torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1, torch.arange(16) % 2)
    with tempfile.TemporaryDirectory() as tmp:
        t = GANTrainer(cfg, data, TrainOptions(out_dir=Path(tmp), classes=["a", "b"], mlflow=False, progress=False, device="cuda"))
        for net in (t.G, t.D):
            set_speed_options(net, 0, channels_last, grouped_modconv=grouped)
        real, rc = t._real_batch()
        rc = rc.cuda()
        out = {}
        for phase in ("Gmain", "Greg", "Dmain", "Dreg"):
            m = t.G if phase.startswith("G") else t.D
            t.G.requires_grad_(phase.startswith("G")); t.D.requires_grad_(not phase.startswith("G"))
            torch.manual_seed(123)
            z, c = t._gen_inputs()
            m.zero_grad(set_to_none=True)
            o = t.loss.compute(phase, real, rc, z, c.cuda())
            o.loss.backward()
            out[phase] = (float(o.loss.detach()), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        return out

fast, ref = grads("1", False, True), grads("0", True, False)
ok = True
for phase in ref:
    rel_loss = abs(fast[phase][0] - ref[phase][0]) / max(abs(ref[phase][0]), 1e-6)
    rel_grad = ((fast[phase][1] - ref[phase][1]).abs().max() / ref[phase][1].abs().max()).item()
    print(f"{phase}: loss rel diff {rel_loss:.2e}, grad max diff / max |grad| {rel_grad:.2e}")
    ok &= rel_loss < 1e-4 and rel_grad < 1e-3
print("training-step parity on CUDA:", "ok" if ok else "FAILED")
raise SystemExit(0 if ok else 1)
EOF

echo "== (ii) s/kimg at 256 px, stylegan2 preset, batch 8 (reference path, then fast path with bf16 top 4 resolutions)"
$PY benchmarks/gan_throughput.py --preset stylegan2 --resolution 256 --batch 8 --reference --arms fp32,bf16 \
  --num-bf16-res 4 --warmup 8 --steps 64 --device cuda || status=1
echo "== gpu_check exit status $status"
exit $status
