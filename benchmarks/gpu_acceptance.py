"""The python parts of the GPU acceptance run (``benchmarks/gpu_check.sh``), one subcommand each.

Every part prints its own lines and appends one JSON line per measured figure to ``--results``
(part, what was measured, value, unit, status ok / FAILED / skipped, note); ``table`` turns that
file into the run's one Markdown table. A part exits 0 when every figure it measured is ok, 3 when
it recorded a FAILED figure itself (a parity over its tolerance), and anything else when it broke
before recording (an exception, or killed by the script's ``timeout``): the script then records
the FAILED row for it (``mark``).

    python -m benchmarks.gpu_acceptance data        --workdir W [--dry-run]
    python -m benchmarks.gpu_acceptance op-parity   --results R                  # (i)   CUDA only
    python -m benchmarks.gpu_acceptance op-tests    --results R [--dry-run]      # (i)   tests/test_gan_ops.py
    python -m benchmarks.gpu_acceptance step-parity --results R --device cuda    # (i)
    python -m benchmarks.gpu_acceptance throughput  --results R --device cuda    # (ii)  s/kimg at 256 px
    python -m benchmarks.gpu_acceptance generation  --results R --workdir W --device cuda   # (iii)
    python -m benchmarks.gpu_acceptance sweep       --results R --workdir W --device cuda   # (iv)
    python -m benchmarks.gpu_acceptance quality     --results R --workdir W --device cuda --budget-s 180  # (v)
    python -m benchmarks.gpu_acceptance mark        --results R --part iv --what ... --status FAILED --note ...
    python -m benchmarks.gpu_acceptance table       --results R

``--dry-run`` gives every part its tiny CPU configuration (``DRY`` below; ``GPU`` is the real one),
so the whole chain can be exercised on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks.*` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = ["normal", "squamous"]
RECORDED_FAILURE = 3  # exit status of a part that wrote its own FAILED row(s)


@dataclass(frozen=True)
class Sizes:
    """What each part runs: the GPU acceptance configuration or the CPU dry run's tiny one."""

    phantom_counts: dict | None  # None: the embedded default set (303 train, 28 valid, 144 test)
    # (ii): preset, resolution, batch, top resolutions in bf16, warm-up and timed minibatches
    throughput: tuple[str, int, int, int, int, int]
    generation: tuple[tuple[str, int], ...]  # (preset, resolution) of each freshly built network
    generate_per_class: int | None  # None: the generate params' default
    sweep_epochs: int | None  # None: params.yaml's classifier.epochs
    resnet_resolution: int
    resnet_epochs: int | None  # None: the reference study's
    quality: tuple[str, int]  # preset, resolution of the wall-clock-bounded GAN training
    quality_per_class: int
    threads: int | None  # torch CPU threads (None: torch's default)


GPU = Sizes(
    phantom_counts=None,
    throughput=("stylegan2", 256, 8, 4, 4, 32),
    generation=(("stylegan2", 256), ("cpu64", 64)),
    generate_per_class=None,
    sweep_epochs=None,
    resnet_resolution=224,
    resnet_epochs=None,
    quality=("cpu64", 64),
    quality_per_class=200,
    threads=None,
)
DRY = Sizes(
    phantom_counts={"train": {"normal": 12, "squamous": 12}, "valid": {"normal": 4, "squamous": 4}, "test": {"normal": 4, "squamous": 4}},
    throughput=("tiny", 32, 4, 2, 1, 16),
    generation=(("tiny", 32), ("cpu64", 64)),
    generate_per_class=8,
    sweep_epochs=2,
    resnet_resolution=64,
    resnet_epochs=2,
    quality=("tiny", 32),
    quality_per_class=20,
    threads=2,
)


# ---------------------------------------------------------------------------------------------
# results file


def record(results: Path, part: str, what: str, value: float | None, unit: str, status: str = "ok", note: str = "") -> dict:
    """Print one figure and append it to the results file (one JSON object per line)."""
    row = {"part": part, "what": what, "value": None if value is None else float(value), "unit": unit, "status": status, "note": note}
    shown = "-" if value is None else f"{value:.4g}"
    print(f"  ({part}) {what}: {shown} {unit} [{status}]" + (f" {note}" if note else ""), flush=True)
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def read_results(results: Path) -> list[dict]:
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def format_table(rows: list[dict]) -> str:
    """The run's Markdown table: part, what was measured, value, unit, status."""
    lines = ["| part | what was measured | value | unit | status |", "|---|---|---|---|---|"]
    for row in rows:
        value = row["value"]
        shown = "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"
        what = row["what"] + (f" — {row['note']}" if row.get("note") else "")
        lines.append(f"| ({row['part']}) | {what.replace('|', '/')} | {shown} | {row['unit']} | {row['status']} |")
    return "\n".join(lines)


def sizes_for(args: argparse.Namespace) -> Sizes:
    return DRY if args.dry_run else GPU


def _setup(args: argparse.Namespace):
    import torch

    sizes = sizes_for(args)
    if sizes.threads:
        torch.set_num_threads(sizes.threads)
    return torch, sizes


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# data: the phantom prepared set (iv, v) and a synthetic stand-in from a fresh generator (iv)


def write_fresh_network(folder: Path, preset: str, resolution: int) -> Path:
    """network-final.pt of a freshly built (untrained) conditional generator: what `generate`
    reads, with random weights (the cost of generating does not depend on the weights)."""
    import torch

    from ctsynth.gan.checkpoint import FINAL_NETWORK, NETWORK_FORMAT, atomic_torch_save, build_networks
    from ctsynth.gan.presets import make_config

    cfg = make_config(preset, resolution, c_dim=len(CLASSES), seed=0)
    torch.manual_seed(0)
    G, _ = build_networks(cfg, "cpu")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FINAL_NETWORK
    atomic_torch_save({"format": NETWORK_FORMAT, "config": cfg.to_dict(), "classes": CLASSES, "G_ema": G.state_dict(),
                       "cur_nimg": 0, "augment_p": 0.0, "mlflow_run_id": ""}, path)
    return path


def cmd_data(args: argparse.Namespace) -> int:
    from ctsynth.config import DataParams, GenerateParams
    from ctsynth.data.ingest import prepare_dataset
    from ctsynth.data.phantom import write_phantom_dataset
    from ctsynth.gan.generate import generate_images

    sizes = sizes_for(args)
    work = args.workdir
    started = time.perf_counter()
    if not (work / "prepared" / "manifest.csv").exists():
        write_phantom_dataset(work / "raw", seed=0, workers=max(1, min(os.cpu_count() or 1, 16)), counts=sizes.phantom_counts)
        prepare_dataset(work / "raw", work / "prepared", DataParams(classes=CLASSES))
    if not (work / "synthetic" / "manifest.csv").exists():
        # The synthetic arm's pool: as many images per class as `generate` writes by default, from
        # an untrained cpu64 generator (an item's cost depends on how many images it reads, not on
        # what they show), on the CPU so that this step needs no GPU.
        network = write_fresh_network(work / "gan-fresh-cpu64", "cpu64", 64)
        per_class = sizes.generate_per_class or GenerateParams().per_class
        generate_images(network, work / "synthetic", CLASSES, per_class, progress=False, device="cpu")
    print(f"  data in {work}: prepared phantom set and synthetic stand-in ({time.perf_counter() - started:.1f} s)", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# (i) fused op build + parity, the op tests, training-step parity


def cmd_op_parity(args: argparse.Namespace) -> int:
    """Build the fused CUDA bias_act (CTSYNTH_FUSED_OPS=1: a failed build is an error) and compare
    it with the reference op, forward and both gradients, in three dtypes and both layouts."""
    os.environ["CTSYNTH_FUSED_OPS"] = "1"
    import torch

    from ctsynth.gan.ops import fused, reference

    started = time.perf_counter()
    ext = fused.load_extension()
    print(" ", fused.extension_status(), flush=True)
    if ext is None or "cuda" not in fused.extension_status():
        record(args.results, "i", "fused CUDA bias_act build (ninja)", None, "s", "FAILED", "CUDA kernels not built")
        return RECORDED_FAILURE
    record(args.results, "i", "fused CUDA bias_act build (ninja)", time.perf_counter() - started, "s")
    torch.manual_seed(0)
    failed = False

    def rel(a, b) -> float:
        # Relative to the largest reference value: bf16 keeps 8 bits of mantissa, so an absolute
        # tolerance would fail on any output larger than ~1 while the op is exact to its precision.
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        worst = 0.0
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
            errs = [rel(y, r), rel(gx, rx), rel(gb, rb)]
            print(f"  cuda bias_act {dtype} channels_last={channels_last}: max relative errors fwd/dx/db {errs}", flush=True)
            worst = max(worst, *errs)
        ok = worst < tol
        failed |= not ok
        record(args.results, "i", f"fused CUDA bias_act vs reference, {str(dtype).split('.')[1]}, max relative error (fwd, dx, db; NCHW and NHWC)",
               worst, "", "ok" if ok else "FAILED", f"tolerance {tol:g}")
    return RECORDED_FAILURE if failed else 0


class _Outcomes:
    """pytest plugin: counts the outcomes of the test calls."""

    def __init__(self) -> None:
        self.passed = self.failed = self.skipped = 0

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" and report.passed:
            self.passed += 1
        elif report.failed:
            self.failed += 1
        elif report.skipped:
            self.skipped += 1


def cmd_op_tests(args: argparse.Namespace) -> int:
    """tests/test_gan_ops.py (parity of every speed option with the reference path), in this process."""
    import pytest

    from ctsynth.paths import repo_root

    outcomes = _Outcomes()
    selection = ["-k", "not bf16_run"] if args.dry_run else []
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(repo_root() / "tests" / "test_gan_ops.py"), *selection], plugins=[outcomes])
    ok = code == 0 and outcomes.passed > 0
    record(args.results, "i", "tests/test_gan_ops.py: tests passed" + (" (dry run: -k 'not bf16_run')" if args.dry_run else ""),
           outcomes.passed, "tests", "ok" if ok else "FAILED", f"{outcomes.failed} failed, {outcomes.skipped} skipped")
    return 0 if ok else RECORDED_FAILURE


def cmd_step_parity(args: argparse.Namespace) -> int:
    """One training step's losses and gradients (Gmain, Greg, Dmain, Dreg), fast path vs reference
    path, float32, tiny preset at 32 px. On CUDA the fast path uses the fused op (required)."""
    torch, _ = _setup(args)
    from ctsynth.gan.networks import set_speed_options
    from ctsynth.gan.presets import make_config
    from ctsynth.gan.train import GANTrainer, TrainingData, TrainOptions

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def grads(fused_env: str, grouped: bool, channels_last: bool) -> dict:
        os.environ["CTSYNTH_FUSED_OPS"] = fused_env
        cfg = make_config("tiny", 32, c_dim=2, batch=4, mbstd=2, fixed_p=0.5, seed=5, channels_last=channels_last)
        data = TrainingData(torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1, torch.arange(16) % 2)
        with tempfile.TemporaryDirectory() as tmp:
            t = GANTrainer(cfg, data, TrainOptions(out_dir=Path(tmp), classes=CLASSES, mlflow=False, progress=False, device=str(device)))
            for net in (t.G, t.D):
                set_speed_options(net, 0, channels_last, grouped_modconv=grouped)
            real, rc = t._real_batch()
            rc = rc.to(device)
            out = {}
            for phase in ("Gmain", "Greg", "Dmain", "Dreg"):
                m = t.G if phase.startswith("G") else t.D
                t.G.requires_grad_(phase.startswith("G"))
                t.D.requires_grad_(not phase.startswith("G"))
                torch.manual_seed(123)
                z, c = t._gen_inputs()
                m.zero_grad(set_to_none=True)
                o = t.loss.compute(phase, real, rc, z, c.to(device))
                o.loss.backward()
                out[phase] = (float(o.loss.detach()), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
            return out

    # On the CPU the fused op is off by default ("auto"): the fast path there is batched modulated
    # convs + channels-last, and building the C++ kernel is not part of this check.
    fast, ref = grads("1" if device.type == "cuda" else "auto", False, True), grads("0", True, False)
    worst_loss = worst_grad = 0.0
    for phase in ref:
        rel_loss = abs(fast[phase][0] - ref[phase][0]) / max(abs(ref[phase][0]), 1e-6)
        rel_grad = ((fast[phase][1].cpu() - ref[phase][1].cpu()).abs().max() / ref[phase][1].abs().max().cpu()).item()
        print(f"  {phase}: loss rel diff {rel_loss:.2e}, grad max diff / max |grad| {rel_grad:.2e}", flush=True)
        worst_loss, worst_grad = max(worst_loss, rel_loss), max(worst_grad, rel_grad)
    ok = worst_loss < 1e-4 and worst_grad < 1e-3
    record(args.results, "i", f"training-step parity on {device.type}, fast vs reference path (4 phases, fp32): max grad diff over max abs grad",
           worst_grad, "", "ok" if ok else "FAILED", f"max loss rel diff {worst_loss:.1e}; tolerances 1e-3 (grad), 1e-4 (loss)")
    return 0 if ok else RECORDED_FAILURE


# ---------------------------------------------------------------------------------------------
# (ii) training s/kimg: reference path vs fast path (fp32, and bf16 on the top resolutions)


def cmd_throughput(args: argparse.Namespace) -> int:
    torch, sizes = _setup(args)
    from benchmarks.gan_throughput import arm_config, run_arm
    from ctsynth.gan.networks import bf16_supported
    from ctsynth.gan.ops.fused import extension_status, fused_ops_enabled, load_extension
    from ctsynth.gan.presets import make_config

    preset, resolution, batch, num_bf16, warmup, steps = sizes.throughput
    device = torch.device(args.device)
    if device.type == "cuda" and fused_ops_enabled():
        load_extension()  # built once before any timing (on the CPU the fused op is not used by default)
    base = make_config(preset, resolution, batch=batch)
    arms = ["reference", "fp32"] + (["bf16"] if bf16_supported(device.type) else [])
    print(f"  {preset} @ {resolution} px, batch {batch}, device {device}; {extension_status()}; warm-up {warmup}, timed {steps} minibatches", flush=True)
    timing = argparse.Namespace(warmup=warmup, steps=steps)
    results = {}
    for arm in arms:
        r = run_arm(arm, arm_config(base, arm, num_bf16, True), timing, device)
        results[arm] = r
        label = {"reference": "reference path (pure PyTorch ops, grouped modconv, NCHW, fp32)",
                 "fp32": "fast path, fp32 (fused bias_act on CUDA, batched modconv, channels-last)",
                 "bf16": f"fast path, top {num_bf16} resolutions in bf16"}[arm]
        memory = f"CUDA peak {r['cuda_peak_gib']:.2f} GiB" if device.type == "cuda" else f"peak RSS {r['peak_rss_gib']:.2f} GiB"
        record(args.results, "ii", f"training, {preset} {resolution} px batch {batch}: {label}", r["s_per_kimg"], "s/kimg", note=memory)
    if "bf16" not in arms:
        record(args.results, "ii", f"training, {preset} {resolution} px: fast path with bf16", None, "s/kimg", "skipped",
               f"no native bf16 convolutions on {device.type}")
    best = "bf16" if "bf16" in results else "fp32"
    record(args.results, "ii", f"speed-up of the fast path ({best}) over the reference path, same run",
           results["reference"]["s_per_kimg"] / results[best]["s_per_kimg"], "x")
    return 0


# ---------------------------------------------------------------------------------------------
# (iii) generation throughput


def cmd_generation(args: argparse.Namespace) -> int:
    """images/s of `generate_images` (network load, synthesis, PNG + manifest written) and of its
    synthesis function alone (G on the device, no files), from freshly built networks."""
    torch, sizes = _setup(args)
    from ctsynth.config import GenerateParams
    from ctsynth.gan.generate import generate_images, latents, load_generator, synthesize

    defaults = GenerateParams()
    per_class = sizes.generate_per_class or defaults.per_class
    device = torch.device(args.device)
    for preset, resolution in sizes.generation:
        folder = args.workdir / f"generation-{preset}-{resolution}"
        network = write_fresh_network(folder / "gan", preset, resolution)
        options = dict(seed=defaults.seed, psi=defaults.psi, noise_mode=defaults.noise_mode, batch=defaults.batch,
                       progress=False, device=args.device)
        # Warm-up: CUDA context, cuDNN algorithm choice, the imports generate makes on first use.
        generate_images(network, folder / "warm-up", CLASSES, 1, **options)
        _sync(torch, device)
        started = time.perf_counter()
        manifest = generate_images(network, folder / "images", CLASSES, per_class, **options)
        _sync(torch, device)
        elapsed = time.perf_counter() - started
        record(args.results, "iii", f"generate_images, fresh {preset} {resolution} px, {len(manifest)} images, batch {defaults.batch} "
               "(load, synthesis, PNG and manifest written)", len(manifest) / elapsed, "images/s")

        G = load_generator(network, device).G
        z = latents(defaults.seed, 0, 0, defaults.batch, G.z_dim)
        synthesize(G, z, 0, defaults.psi, defaults.noise_mode)
        _sync(torch, device)
        batches, started = 0, time.perf_counter()
        while batches < 3 or time.perf_counter() - started < 2.0:
            synthesize(G, z, 0, defaults.psi, defaults.noise_mode)
            batches += 1
        _sync(torch, device)
        elapsed = time.perf_counter() - started
        record(args.results, "iii", f"synthesis alone (G_ema on {device.type}, no files), fresh {preset} {resolution} px, batch {defaults.batch}",
               batches * defaults.batch / elapsed, "images/s")
    return 0


# ---------------------------------------------------------------------------------------------
# (iv) classifier sweep items


def _sweep_params(work: Path, device: str, classifier: dict, name: str):
    from ctsynth.config import ClassifierParams, Params
    from ctsynth.paths import repo_root

    import yaml

    values = yaml.safe_load((repo_root() / "params.yaml").read_text())
    values["data"].update(prepared=str(work / "prepared"), classes=CLASSES)
    values["classifier"] = ClassifierParams.model_validate({**values["classifier"], **classifier, "device": device}).model_dump(mode="json")
    values["sweep"].update(synthetic=str(work / "synthetic"), oracle=str(work / "no-oracle"),
                           metrics_dir=str(work / name / "metrics"), runs_dir=str(work / name / "runs"))
    return Params.model_validate(values)


def _time_items(params, items, root: Path) -> list[tuple[object, float, dict]]:
    """Each item as the executor runs it (sweep id, parent run and cache key computed once, before)."""
    from ctsynth.classifier.sweep import (
        find_or_create_parent_run, item_cache_key, run_sweep_item, sweep_data_fingerprint, sweep_id, training_code_fingerprint,
    )

    sweep = sweep_id(params, sweep_data_fingerprint(params, root))
    parent = find_or_create_parent_run(sweep, params, root)
    code = training_code_fingerprint()
    timed = []
    for item in items:
        started = time.perf_counter()
        outputs = run_sweep_item(params, item, root, progress=False, parent_run_id=parent, sweep=sweep,
                                 cache_key=item_cache_key(sweep, code, item, params))
        elapsed = time.perf_counter() - started
        timed.append((item, elapsed, json.loads(outputs.details_path.read_text())))
    return timed


def cmd_sweep(args: argparse.Namespace) -> int:
    torch, sizes = _setup(args)
    from torchvision import models

    from ctsynth.classifier.sweep import SweepItem
    from ctsynth.paths import repo_root

    import yaml

    work = args.workdir
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    device = torch.device(args.device)
    torch.zeros(1, device=device)  # CUDA context: once per worker process, not per item

    small = {} if sizes.sweep_epochs is None else {"epochs": sizes.sweep_epochs}
    params = _sweep_params(work, args.device, small, "sweep-smallcnn")
    c = params.classifier
    for item, seconds, details in _time_items(params, [SweepItem("synthetic", 0.5, 0), SweepItem("classic", 0.5, 0)], work):
        n_train = sum(sum(v.values()) if isinstance(v, dict) else v for v in details["train_counts"].values())
        record(args.results, "iv", f"sweep item {item.name}: {c.backbone} {c.resolution} px, {n_train} train images, "
               f"{details['epochs_run']} epochs run (of {c.epochs})", seconds, "s/item", note=f"train_classifier {details['seconds']:.1f} s of it")

    # The reference study's classifier (params/reference-study-classifier.yaml), frozen ResNet50 +
    # head on cached features. No ImageNet file offline: one random ResNet50 written to a file that
    # both items load, as every item of the study loads the same ImageNet file (sweep_speed.py).
    variant = yaml.safe_load((repo_root() / "params" / "reference-study-classifier.yaml").read_text())["classifier"]
    weights = work / "resnet50-random.pth"
    if not weights.exists():
        torch.manual_seed(0)
        torch.save(models.resnet50(weights=None).state_dict(), weights)
    variant.update(weights=str(weights), feature_cache=str(work / "features"), resolution=sizes.resnet_resolution)
    if sizes.resnet_epochs is not None:
        variant["epochs"] = sizes.resnet_epochs
    params = _sweep_params(work, args.device, variant, "sweep-resnet50")
    items = [SweepItem("synthetic", 0.5, 0), SweepItem("synthetic", 0.5, 1)]
    for (item, seconds, details), cache in zip(_time_items(params, items, work), ("cold", "warm")):
        hits = details["precision"].get("feature_cache", {})
        record(args.results, "iv", f"sweep item {item.name}: resnet50 frozen, {params.classifier.resolution} px, "
               f"{cache} feature cache", seconds, "s/item",
               note=f"cache hits {hits.get('hits', '?')}, misses {hits.get('misses', '?')}; train_classifier {details['seconds']:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------
# (v) GAN quality after a wall-clock budget


def cmd_quality(args: argparse.Namespace) -> int:
    """Train a preset (conditional, 2 classes) on the prepared phantom set for --budget-s seconds of
    training, then KID of G_ema's samples against train half A, beside the real-vs-real floor (half
    B vs half A), in the pixel-PCA feature space of benchmarks/gan_convergence.py."""
    torch, sizes = _setup(args)

    from benchmarks.gan_convergence import RealReference, sample
    from ctsynth.gan.presets import make_config
    from ctsynth.gan.train import GANTrainer, TrainOptions, load_training_data

    preset, resolution = sizes.quality
    cfg = make_config(preset, resolution, c_dim=len(CLASSES))
    data = load_training_data(args.workdir / "prepared", CLASSES, resolution)
    real = RealReference.fit(data.images.numpy())  # gan_convergence.py's split, features and floors
    floor_kid, floor_kid_pca = real.floor_kid, real.floor_kid_pca

    out = args.workdir / f"quality-{preset}-{args.device.replace(':', '')}"
    trainer = GANTrainer(cfg, data, TrainOptions(out_dir=out, classes=CLASSES, resume=None, mlflow=False, progress=False, device=args.device))
    device = trainer.device
    _sync(torch, device)
    started = time.perf_counter()
    while time.perf_counter() - started < args.budget_s:
        trainer._train_step()
    _sync(torch, device)
    train_s = time.perf_counter() - started
    kimg = trainer.cur_nimg / 1000
    what = f"{preset} {resolution} px (conditional, 2 classes, batch {cfg.batch}) on the phantom train split"
    record(args.results, "v", f"kimg reached in {train_s:.0f} s of training, {what}", kimg, "kimg")
    record(args.results, "v", f"training speed in that run, {preset} {resolution} px", train_s / kimg if kimg else None, "s/kimg")

    fake, _ = sample([(trainer.G_ema, k) for k in range(cfg.c_dim)], sizes.quality_per_class, cfg.z_dim, seed=1)
    kid, kid_pca, _ = real.kid(fake)
    n = sizes.quality_per_class * cfg.c_dim
    record(args.results, "v", f"KID after {kimg:.1f} kimg ({n} samples vs train half A; pixel-PCA + intensity features)", kid, "",
           note=f"real-vs-real floor {floor_kid:.3g}")
    record(args.results, "v", "KID real-vs-real floor (train half B vs half A)", floor_kid, "")
    record(args.results, "v", f"pixel KID (PCA block) after {kimg:.1f} kimg", kid_pca, "", note=f"floor {floor_kid_pca:.3g}")
    record(args.results, "v", "pixel KID real-vs-real floor", floor_kid_pca, "")
    return 0


# ---------------------------------------------------------------------------------------------
# the script's bookkeeping


def cmd_mark(args: argparse.Namespace) -> int:
    record(args.results, args.part, args.what, args.value, args.unit, args.status, args.note)
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    rows = read_results(args.results)
    print(format_table(rows))
    failed = [row for row in rows if row["status"] == "FAILED"]
    if not rows:
        print("no results recorded")
        return 1
    return 1 if failed else 0


COMMANDS = {
    "data": cmd_data, "op-parity": cmd_op_parity, "op-tests": cmd_op_tests, "step-parity": cmd_step_parity,
    "throughput": cmd_throughput, "generation": cmd_generation, "sweep": cmd_sweep, "quality": cmd_quality,
    "mark": cmd_mark, "table": cmd_table,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--results", type=Path, default=None, help="JSON-lines file the figures are appended to")
    parser.add_argument("--workdir", type=Path, default=None, help="data and outputs (data, generation, sweep, quality)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="the tiny CPU configuration (DRY)")
    parser.add_argument("--budget-s", type=float, default=180.0, help="quality: seconds of GAN training")
    parser.add_argument("--part", default="?")
    parser.add_argument("--what", default="")
    parser.add_argument("--value", type=float, default=None)
    parser.add_argument("--unit", default="")
    parser.add_argument("--status", default="FAILED", choices=["ok", "FAILED", "skipped"])
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    if args.command not in ("data", "table") and args.results is None:
        parser.error(f"{args.command} needs --results")
    if args.command in ("data", "generation", "sweep", "quality"):
        if args.workdir is None:
            parser.error(f"{args.command} needs --workdir")
        args.workdir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
