"""StyleGAN2-ADA training throughput, FLOPs and machine efficiency, measured in one run.

For each arm it trains a preset (default ``bench64``: 64 px, batch 16, conditional on 2 classes,
ADA bgc at fixed p 0.2, the full lazy schedule) on random images for a warm-up and then a fixed
number of minibatches (a multiple of 16, so every lazy phase is represented in its true
proportion: Greg on 4 of 16 minibatches, Dreg on 1), and prints:

* real images/s and s/kimg, peak memory (process RSS; ``torch.cuda.max_memory_allocated`` on GPU);
* FLOPs of one training minibatch: forward passes counted with ``torch.utils.flop_counter``
  (conv / matmul FLOPs), backward and regularisation passes derived from them (formula printed);
* achieved FLOP/s and the ratio to this machine's matmul FLOP/s, measured right before the arm
  with the same thread count (2048 x 2048 fp32 matmuls; bf16 too for the bf16 arm);
* images/s for generation alone (G_ema, no grad, the same batch).

Arms: ``reference`` (``--reference``): the plain pure-PyTorch path -- fused ops off
(CTSYNTH_FUSED_OPS=0), grouped modulated convs, NCHW, float32. ``fp32``: our fast path in float32
(fused bias_act, batched modulated convs while training, channels-last). ``bf16``: the fast path
with the top ``--num-bf16-res`` resolutions in bfloat16 (only where the hardware supports it).

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/gan_throughput.py --reference
    PYTHONPATH=src python benchmarks/gan_throughput.py --preset cpu64 --set c_dim=2 --set fixed_p=0.2
    PYTHONPATH=src python benchmarks/gan_throughput.py --preset tiny --resolution 32 --steps 16 --warmup 1  # smoke
    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/gan_throughput.py --goals              # both goals, one run
    PYTHONPATH=src python benchmarks/gan_throughput.py --preset cpu64 --set c_dim=2 --profile 4  # where time goes
    PYTHONPATH=src python benchmarks/gan_throughput.py --preset cpu64 --set c_dim=2 --set fixed_p=0.2 --levers 4

``--goals`` runs the fast float32 path of ``bench64`` and of ``cpu64`` (conditional on 2 classes,
p fixed at 0.2) one after the other in one process and prints each as a percentage of the fp32
matmul FLOP/s measured right before it, against the goals (bench64 >= 60 %, cpu64 >= 50 %), with
the CPU model. ``--profile N`` runs N training minibatches of the fp32 arm under
``torch.profiler`` and prints the operators by self CPU time, and how many operator calls one
minibatch makes (the Python / dispatch overhead that small channel counts expose). ``--levers R``
times the preset's float32 step with the speed levers switched on one after another (FIR kernels,
channels-last, fused bias_act), one trainer per variant in interleaved blocks, and prints each
variant's s/kimg and its ratio to the first.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from ctsynth.device import cpu_model
from ctsynth.gan import ops
from ctsynth.gan.networks import bf16_supported, set_speed_options
from ctsynth.gan.ops import extension_status, fused_ops_enabled, reference
from ctsynth.gan.ops.fused import load_extension
from ctsynth.gan.presets import GANConfig, make_config
from ctsynth.gan.train import GANTrainer, TrainingData, TrainOptions

# How the FLOPs of one minibatch are derived from counted forward FLOPs (printed with the result).
# A conv / matmul's backward is two ops of its forward's size (input grad, weight grad); a
# frozen network needs only the input grad. A regulariser that differentiates a gradient
# (create_graph) costs forward 1 + first backward 1 (input grads only) + backward through both
# graphs 4 (each of the two products has an input and a weight grad) = 6 forwards.
FLOP_FORMULA = (
    "Gmain = F_G(B) + F_D(B) + backward [2 F_G(B) (weights+inputs) + 1 F_D(B) (D frozen: inputs)]\n"
    "  Dmain = F_G(B) (no grad) + 2 F_D(B) + backward 2 x 2 F_D(B)\n"
    "  Greg  = 6 F_G(B/pl_batch_shrink) every pl_interval;  Dreg = 6 F_D(B) every r1_interval\n"
    "  (F_G, F_D: torch.utils.flop_counter forward FLOPs incl. mapping and augmentation; "
    "elementwise ops not counted)"
)


def random_trainer(cfg: GANConfig, device: torch.device, out_dir: Path, images: int = 256) -> GANTrainer:
    """A trainer on uniform-noise images with balanced labels: the step's work does not depend on
    what the images show."""
    data = TrainingData(torch.rand(images, cfg.img_channels, cfg.resolution, cfg.resolution) * 2 - 1,
                        torch.arange(images) % max(cfg.c_dim, 1))
    options = TrainOptions(out_dir=out_dir, classes=[f"c{i}" for i in range(max(cfg.c_dim, 1))],
                           mlflow=False, progress=False, device=str(device))
    return GANTrainer(cfg, data, options)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sustained_flops(fn, flops_per_call: float, device: torch.device, seconds: float) -> float:
    for _ in range(2):
        fn()
    sync(device)
    count, start = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        if count % 2 == 0:
            sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return flops_per_call * count / elapsed


def matmul_flops_by_library(device: torch.device, dtype: torch.dtype, size: int = 2048,
                            seconds: float = 2.0) -> dict[str, float]:
    """Sustained FLOP/s of size x size x size matrix products, per library that PyTorch calls.

    On the CPU, ``torch.mm`` goes to the BLAS PyTorch was built with (MKL) and convolutions go to
    oneDNN. MKL picks a slow code path on AMD CPUs: on a Zen 5 VM ``torch.mm`` reached 179
    GFLOP/s while oneDNN ran the same product (a 1x1 convolution over 2048 pixels, channels-last)
    at 370. The machine's matmul rate is the faster of the two, or every convolution-heavy step
    would score above 100 %.
    """
    if device.type == "cuda":
        size = 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    rates = {"blas": _sustained_flops(lambda: a @ b, 2 * size**3, device, seconds)}
    if device.type == "cpu":
        side = int(size**0.5)  # size pixels as a side x (size // side) image
        pixels = torch.randn(1, size, side, size // side, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(size, size, 1, 1, dtype=dtype)
        rates["onednn"] = _sustained_flops(lambda: torch.nn.functional.conv2d(pixels, weight),
                                           2 * size**2 * side * (size // side), device, seconds)
    return rates


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The machine's practical matmul peak for this thread count: the fastest library's rate."""
    return max(matmul_flops_by_library(device, dtype).values())


def forward_flops(trainer: GANTrainer) -> tuple[float, float, float]:
    """Counted forward FLOPs: F_G(B), F_G(B / pl_batch_shrink), F_D(B) (with augmentation)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = trainer.cfg
    batch = trainer.batch_per_rank
    real, c = trainer._real_batch()
    c = c.to(trainer.device) if c is not None else None
    z = torch.randn(batch, cfg.z_dim, device=trainer.device)

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    # The FIR filters run as depthwise convolutions on the fast path; the flop counter would count
    # them, and the reference slices not: count with the slices so the arms share one FLOP figure.
    with torch.enable_grad(), levers(fir_kernels=False, fused_bias_act=True):  # training form of the modulated convs
        f_g = count(lambda: trainer.loss.run_G(z, c))
        shrink = max(batch // cfg.pl_batch_shrink, 1)
        f_g_pl = count(lambda: trainer.loss.run_G(z[:shrink], c[:shrink] if c is not None else None))
        f_d = count(lambda: trainer.loss.run_D(real, c))
    return f_g, f_g_pl, f_d


def minibatch_flops(cfg: GANConfig, f_g: float, f_g_pl: float, f_d: float) -> float:
    g_main = f_g + f_d + 2 * f_g + f_d
    d_main = f_g + 2 * f_d + 2 * 2 * f_d
    g_reg = 6 * f_g_pl / cfg.pl_interval if cfg.pl_weight > 0 and cfg.pl_interval else 0.0
    d_reg = 6 * f_d / cfg.r1_interval if cfg.gamma > 0 and cfg.r1_interval else 0.0
    return g_main + d_main + g_reg + d_reg


@contextlib.contextmanager
def levers(fir_kernels: bool, fused_bias_act: bool):
    """Switch two of the fast path's levers off inside the block (for ``--levers``): the FIR
    forward kernels (depthwise convolution / banded matrices -> the reference's shifted slices)
    and the fused bias_act (-> the reference's PyTorch ops). Same maths either way."""
    saved = ops._upfirdn2d_forward, ops.fused_bias_act
    if not fir_kernels:
        def slices(x, f, up, down, padding, flip_filter, gain):
            return reference.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
        ops._upfirdn2d_forward = slices
    if not fused_bias_act:
        ops.fused_bias_act = lambda *args, **kwargs: None  # None: "cannot run here", the caller uses the reference
    try:
        yield
    finally:
        ops._upfirdn2d_forward, ops.fused_bias_act = saved


# Cumulative variants for --levers: (name, FIR kernels, channels-last, fused bias_act).
LEVERS = (
    ("before: slices FIR, NCHW, PyTorch bias_act", False, False, False),
    ("+ FIR as depthwise conv / banded matmul", True, False, False),
    ("+ channels-last", True, True, False),
    ("+ fused bias_act (C++)", True, True, True),
)


def run_levers(cfg: GANConfig, args: argparse.Namespace, device: torch.device, repeats: int) -> None:
    """Each lever's effect on the training step, measured in one process: one trainer per
    cumulative variant, timed in interleaved blocks of 16 minibatches (so slow phases of a busy
    machine hit every variant alike), median block per variant, ratio to the first."""
    print(f"# levers: preset {args.preset}, batch {cfg.batch}, c_dim {cfg.c_dim}, augment {cfg.augment} "
          f"p={cfg.fixed_p}, fp32, CPU {cpu_model()}, threads {args.threads}, {repeats} interleaved blocks of 16 "
          f"minibatches, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        variants = []
        for index, (name, fir, channels_last, fused) in enumerate(LEVERS):
            trainer = random_trainer(replace(cfg, num_bf16_res=0, channels_last=channels_last), device, Path(tmp) / str(index))
            with levers(fir, fused):
                trainer._train_step()  # warm-up
            variants.append((name, fir, fused, trainer, []))
        for _ in range(repeats):
            for name, fir, fused, trainer, times in variants:
                with levers(fir, fused):
                    start = time.perf_counter()
                    for _ in range(16):
                        trainer._train_step()
                    times.append(time.perf_counter() - start)
    first = statistics.median(variants[0][4])
    for name, _, _, _, times in variants:
        median = statistics.median(times)
        print(f"  {name:45s} {1000 * median / (16 * cfg.batch):6.1f} s/kimg (median; blocks "
              f"{min(times):.2f}-{max(times):.2f} s)  {first / median:.2f}x the first", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


class _ConvRecorder(torch.overrides.TorchFunctionMode):
    """Records the shape of every dense (groups = 1) convolution a block of code runs; the
    depthwise FIR convolutions are left out, as they are from the FLOP count."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d):
            names = ("stride", "padding", "output_padding", "groups") if func is torch.nn.functional.conv_transpose2d \
                else ("stride", "padding", "dilation", "groups")
            options = dict(zip(names, args[3:]), **{k: v for k, v in kwargs.items() if k in names})
            if options.get("groups", 1) == 1:
                self.calls.append((func, tuple(args[0].shape), tuple(args[1].shape), tuple(sorted(options.items()))))
        return func(*args, **kwargs)


def conv_ceiling(cfg: GANConfig, device: torch.device, repeats: int = 5) -> tuple[float, int, int]:
    """The FLOP/s that the step's own dense convolutions reach when timed alone: every distinct
    conv of one G and one D forward (training form, channels-last as configured), forward plus
    input and weight gradients, weighted by how often it occurs. No step made of these
    convolutions can run faster than this. Returns (FLOP/s, distinct shapes, calls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory() as tmp:
        trainer = random_trainer(cfg, device, Path(tmp), images=64)
        real, c = trainer._real_batch()
        c = c.to(trainer.device) if c is not None else None
        z = torch.randn(trainer.batch_per_rank, cfg.z_dim, device=trainer.device)
        recorder = _ConvRecorder()
        with torch.enable_grad(), recorder:
            trainer.loss.run_D(trainer.loss.run_G(z, c)[0], c)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    counts = collections.Counter(recorder.calls)
    total_flops = total_seconds = 0.0
    for (func, x_shape, w_shape, options), count in counts.items():
        x = torch.randn(x_shape, device=device).contiguous(memory_format=memory_format).requires_grad_()
        w = torch.randn(w_shape, device=device).requires_grad_()
        kwargs = dict(options)
        with FlopCounterMode(display=False) as counter:
            y = func(x, w, **kwargs)
        grad = torch.randn_like(y)
        flops = 3 * counter.get_total_flops()  # forward + input gradient + weight gradient

        def once():
            out = func(x, w, **kwargs)
            torch.autograd.grad(out, (x, w), grad)

        once()
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            once()
            sync(device)
            times.append(time.perf_counter() - start)
        total_flops += count * flops
        total_seconds += count * statistics.median(times)
    return total_flops / total_seconds, len(counts), len(recorder.calls)


@contextlib.contextmanager
def fused_ops(enabled: bool):
    old = os.environ.get("CTSYNTH_FUSED_OPS")
    os.environ["CTSYNTH_FUSED_OPS"] = "auto" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CTSYNTH_FUSED_OPS", None)
        else:
            os.environ["CTSYNTH_FUSED_OPS"] = old


def arm_config(cfg: GANConfig, arm: str, num_bf16_res: int, channels_last: bool) -> GANConfig:
    if arm == "reference":
        return replace(cfg, num_bf16_res=0, channels_last=False)
    if arm == "fp32":
        return replace(cfg, num_bf16_res=0, channels_last=channels_last)
    return replace(cfg, num_bf16_res=num_bf16_res, channels_last=channels_last)


def run_arm(arm: str, cfg: GANConfig, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, fused_ops(arm != "reference"):
        trainer = random_trainer(cfg, device, Path(tmp))
        grouped = arm == "reference"
        for net in (trainer.G, trainer.D, trainer.G_ema):
            set_speed_options(net, cfg.num_bf16_res, cfg.channels_last, grouped_modconv=grouped)

        matmul_rates = matmul_flops_by_library(device, torch.float32)
        peak_matmul = max(matmul_rates.values())
        peak_matmul_bf16 = matmul_flops(device, torch.bfloat16) if arm == "bf16" else float("nan")
        f_g, f_g_pl, f_d = forward_flops(trainer)
        flops = minibatch_flops(cfg, f_g, f_g_pl, f_d)

        for _ in range(args.warmup):
            trainer._train_step()
        # Any 16 consecutive minibatches hold exactly 4 Greg and 1 Dreg (intervals 4 and 16).
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer._train_step()
        sync(device)
        train_s = time.perf_counter() - start

        # Generation alone: G_ema at the training batch, no grad (grouped modulated convs).
        batch = trainer.batch_per_rank
        c = torch.nn.functional.one_hot(torch.arange(batch) % max(cfg.c_dim, 1), max(cfg.c_dim, 1)).float()
        c = c.to(device) if cfg.c_dim else None
        z = torch.randn(batch, cfg.z_dim, device=device)
        with torch.no_grad():
            trainer.G_ema(z, c)
            sync(device)
            gen_start, gen_batches = time.perf_counter(), 0
            while gen_batches < 3 or time.perf_counter() - gen_start < 3:
                trainer.G_ema(z, c)
                gen_batches += 1
            sync(device)
            gen_s = time.perf_counter() - gen_start

    images = args.steps * cfg.batch
    result = {
        "images_per_s": images / train_s,
        "s_per_kimg": train_s / images * 1000,
        "flops_per_minibatch": flops,
        "F_G": f_g, "F_G_pl": f_g_pl, "F_D": f_d,
        "achieved_flops": flops * args.steps / train_s,
        "matmul_flops": peak_matmul,
        "matmul_flops_blas": matmul_rates["blas"],
        "matmul_flops_onednn": matmul_rates.get("onednn", float("nan")),
        "matmul_flops_bf16": peak_matmul_bf16,
        "gen_images_per_s": gen_batches * batch / gen_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
    }
    result["efficiency"] = result["achieved_flops"] / peak_matmul
    return result


GOALS = (("bench64", {}, 0.60), ("cpu64", {"c_dim": 2, "fixed_p": 0.2}, 0.50))


def profile_arm(cfg: GANConfig, steps: int, device: torch.device, rows: int = 25) -> None:
    """Print the top operators by self CPU time over ``steps`` training minibatches."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = random_trainer(cfg, device, Path(tmp), images=64)
        trainer._train_step()  # warm-up (first-call allocations, oneDNN primitive creation)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                trainer._train_step()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    calls = sum(e.count for e in events)
    print(f"# profile: {steps} minibatches in {wall:.2f} s (under the profiler); {calls / steps:.0f} operator "
          f"calls per minibatch")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def run_goals(args: argparse.Namespace, device: torch.device) -> None:
    print(f"# goals run: CPU {cpu_model()}, device {device}, threads {args.threads}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    for preset, overrides, goal in GOALS:
        cfg = arm_config(make_config(preset, 64, **overrides), "fp32", 0, not args.no_channels_last)
        r = run_arm("fp32", cfg, args, device)
        met = "met" if r["efficiency"] >= goal else "NOT met"
        ceiling, shapes, calls = conv_ceiling(cfg, device)
        print(f"  {preset} fast fp32: {r['images_per_s']:.2f} img/s, {r['flops_per_minibatch'] / 1e9:.1f} GFLOP/minibatch, "
              f"achieved {r['achieved_flops'] / 1e9:.1f} GFLOP/s = {100 * r['efficiency']:.1f} % of the fp32 matmul "
              f"{r['matmul_flops'] / 1e9:.1f} GFLOP/s measured before it (BLAS {r['matmul_flops_blas'] / 1e9:.1f}, "
              f"oneDNN {r['matmul_flops_onednn'] / 1e9:.1f}; goal {100 * goal:.0f} %: {met})", flush=True)
        print(f"    its {calls} dense convolutions ({shapes} shapes) timed alone, forward + both gradients: "
              f"{ceiling / 1e9:.1f} GFLOP/s = {100 * ceiling / r['matmul_flops']:.1f} % of that matmul rate "
              f"(the ceiling for a step made of them)", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench64")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any GANConfig field (e.g. --set c_dim=2 --set fixed_p=0.2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="minibatches before the timed window")
    parser.add_argument("--steps", type=int, default=16, help="timed minibatches (a multiple of 16)")
    parser.add_argument("--arms", default="fp32,bf16", help="comma list of fp32, bf16 (reference: --reference)")
    parser.add_argument("--reference", action="store_true", help="also run the plain pure-PyTorch path first")
    parser.add_argument("--num-bf16-res", type=int, default=None,
                        help="bf16 arm: top N resolutions in bfloat16 (default: the preset's, else 2)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--goals", action="store_true", help="bench64 and cpu64 fast fp32 vs their goals, one run")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N minibatches of the fp32 arm (torch.profiler) instead of timing")
    parser.add_argument("--levers", type=int, default=0, metavar="R",
                        help="each speed lever's effect on the preset's step: R interleaved blocks per variant")
    args = parser.parse_args(argv)
    if args.steps < 16 or args.steps % 16:
        parser.error("--steps must be a positive multiple of 16 (so the lazy phases are represented)")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.goals:
        if fused_ops_enabled():
            load_extension()
        run_goals(args, device)
        return
    overrides: dict[str, object] = {"batch": args.batch} if args.batch else {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    base = make_config(args.preset, args.resolution, **overrides)
    num_bf16 = args.num_bf16_res if args.num_bf16_res is not None else (base.num_bf16_res or 2)
    arms = (["reference"] if args.reference else []) + [a for a in args.arms.split(",") if a]
    for arm in arms:
        if arm not in ("reference", "fp32", "bf16"):
            parser.error(f"unknown arm {arm!r}")
    bf16_ok = bf16_supported(device.type)
    if "bf16" in arms and not bf16_ok:
        print("# bf16 arm skipped: no native bfloat16 convolutions on this device", flush=True)
        arms = [a for a in arms if a != "bf16"]

    if fused_ops_enabled():
        load_extension()  # build once before any timing
    if args.levers:
        run_levers(base, args, device, args.levers)
        return
    if args.profile:
        print(f"# profile of preset {args.preset} fast fp32, CPU {cpu_model()}, threads {args.threads}", flush=True)
        profile_arm(arm_config(base, "fp32", 0, not args.no_channels_last), args.profile, device)
        return
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# gan_throughput: preset {args.preset} @ {args.resolution} px, batch {base.batch}, c_dim {base.c_dim}, "
          f"augment {base.augment} p={base.fixed_p}, device {device}, threads {args.threads}, torch {torch.__version__}")
    print(f"# {extension_status()}; bf16 supported: {bf16_ok}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"# warm-up {args.warmup} minibatches, timed {args.steps} minibatches; FLOPs per minibatch:\n  {FLOP_FORMULA}",
          flush=True)

    results: dict[str, dict[str, float]] = {}
    for arm in arms:
        cfg = arm_config(base, arm, num_bf16, not args.no_channels_last)
        r = run_arm(arm, cfg, args, device)
        results[arm] = r
        print(
            f"{arm:>9}: {r['images_per_s']:7.2f} img/s  {r['s_per_kimg']:8.1f} s/kimg  "
            f"{r['flops_per_minibatch'] / 1e9:7.1f} GFLOP/minibatch (F_G {r['F_G'] / 1e9:.2f}, "
            f"F_G_pl {r['F_G_pl'] / 1e9:.2f}, F_D {r['F_D'] / 1e9:.2f})  "
            f"achieved {r['achieved_flops'] / 1e9:6.1f} GFLOP/s = {100 * r['efficiency']:5.1f} % of fp32 matmul "
            f"{r['matmul_flops'] / 1e9:.1f} GFLOP/s"
            + (f" (bf16 matmul {r['matmul_flops_bf16'] / 1e9:.1f} GFLOP/s, "
               f"{100 * r['achieved_flops'] / r['matmul_flops_bf16']:.1f} % of it)" if arm == "bf16" else "")
            + f"  | generation {r['gen_images_per_s']:7.1f} img/s  | peak RSS {r['peak_rss_gib']:.2f} GiB"
            + (f", CUDA {r['cuda_peak_gib']:.2f} GiB" if device.type == "cuda" else ""),
            flush=True,
        )
    print("# ratios (same run):")
    if "reference" in results:
        for arm in arms:
            if arm != "reference":
                ratio = results[arm]["images_per_s"] / results["reference"]["images_per_s"]
                print(f"  {arm} / reference images/s: {ratio:.2f}x")
    if "fp32" in results and "bf16" in results:
        print(f"  bf16 / fp32 images/s: {results['bf16']['images_per_s'] / results['fp32']['images_per_s']:.2f}x")
    for arm in arms:
        print(f"  {arm}: achieved / fp32 matmul FLOP/s: {100 * results[arm]['efficiency']:.1f} %")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
