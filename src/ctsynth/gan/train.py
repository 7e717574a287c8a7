"""StyleGAN2-ADA training loop: phases, lazy regularisation, EMA, adaptive p, snapshots, resume.

One minibatch, read top to bottom in `_train_step`:

    Gmain  every step          G minimises softplus(-D(aug(G(z))))
    Greg   every pl_interval   path-length penalty (x pl_interval)
    Dmain  every step          D minimises softplus(D(aug(G(z)))) + softplus(-D(aug(x)))
    Dreg   every r1_interval   R1 on augmented reals (x r1_interval)
    then   G_ema <- lerp(G, G_ema, beta);  every ada_interval steps: p <- p +- step

ADA's r_t = E[sign D(aug(x))] counts every D pass on real images: Dmain's and, where the loss
returns them, the R1 pass's. G's and D's Adam get the lazy-regularisation correction from their
regularisation interval whether or not the regulariser's weight is 0, as in the paper's setup.

Every snapshot gets a KID in the offline feature space of `ctsynth.metrics` (pixel PCA + intensity
statistics, fitted on half the real images) with its real-vs-real floor; the best one is never
pruned, so `generate` can use it. `init_from` starts from another run's weights (transfer), with
the first `freeze_d` discriminator blocks frozen (Freeze-D).

Multi-process (`torchrun`): the global batch splits across ranks, gradients are summed with
all_reduce and divided by the world size, the ADA sign statistics are summed likewise, and only
rank 0 writes snapshots, grids and MLflow records.
"""

from __future__ import annotations

import copy
import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ctsynth.config import SyntheticParams
from ctsynth.gan import checkpoint as ckpt
from ctsynth.gan.augment import AdaptiveP, AugmentPipe
from ctsynth.gan.checkpoint import NETWORK_FORMAT, build_networks
from ctsynth.gan.grid import fixed_seed_grid, one_hot, save_image_grid
from ctsynth.gan.loss import StyleGAN2Loss, lazy_regularization_adam
from ctsynth.gan.presets import GANConfig

log = logging.getLogger(__name__)

QUALITY_LOG = "snapshot_quality.csv"
QUALITY_SEED = 4321


@dataclass
class TrainOptions:
    """How to run (not what to learn: that is GANConfig)."""

    out_dir: Path
    classes: list[str]
    resume: str | None = "auto"  # "auto": newest snapshot in out_dir; a path; None: start fresh
    snap_keep: int = 3
    tick_kimg: float = 0.25  # how often losses are averaged, logged and written to the CSV
    device: str = "cpu"
    mlflow: bool = True
    progress: bool = True
    run_name: str = "train_gan"
    mlflow_tags: dict[str, str] = field(default_factory=dict)
    # TF32 matmuls/convolutions on Ampere+ GPUs: faster, ~10 mantissa bits. Off as in the
    # reference setup; recorded in MLflow either way.
    allow_tf32: bool = False
    init_from: Path | None = None  # transfer: another run's snapshot (weights only; counters and p reset)
    freeze_d: int = 0  # Freeze-D: the first (highest-resolution) k discriminator blocks stay fixed
    snapshot_kid: bool = True  # KID with its real floor at every snapshot
    quality: SyntheticParams = field(default_factory=SyntheticParams)  # feature space + KID settings


@dataclass
class TrainingData:
    images: torch.Tensor  # N x C x R x R float32 in [-1, 1]
    labels: torch.Tensor  # N, int64 class ids

    def __len__(self) -> int:
        return self.images.shape[0]


# ---------------------------------------------------------------------------
# Process group helpers (a no-op when not launched by torchrun)
# ---------------------------------------------------------------------------


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_mean_grads(module: torch.nn.Module, world_size: int) -> None:
    if world_size == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # every rank must reduce the same tensors in the same order
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


# ---------------------------------------------------------------------------
# Networks and state
# ---------------------------------------------------------------------------


def _ema_beta(cfg: GANConfig, cur_nimg: int) -> float:
    ema_nimg = cfg.ema_kimg * 1000
    if cfg.ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * cfg.ema_rampup)
    return 0.5 ** (cfg.batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    """G_ema <- beta * G_ema + (1 - beta) * G, in one multi-tensor call (a small G has ~100
    parameter tensors, and one call per tensor is a measurable share of a CPU step)."""
    torch._foreach_lerp_(list(G_ema.parameters()), [p.detach() for p in G.parameters()], 1.0 - beta)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


def _make_optimizer(module: torch.nn.Module, cfg: GANConfig, reg_interval: int | None) -> torch.optim.Adam:
    lr, betas = lazy_regularization_adam(cfg.lr, tuple(cfg.betas), reg_interval)
    # Multi-tensor Adam (the default only on CUDA): the same update, without one Python-level
    # loop iteration and ~10 operator calls per parameter tensor on the CPU.
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas, eps=cfg.eps, foreach=True)


@torch.no_grad()
def sanitize_gradients(module: torch.nn.Module) -> None:
    """NaN -> 0 and +-inf -> +-1e5 in every gradient, so one bad minibatch cannot poison the
    weights. The common all-finite case costs one multi-tensor norm instead of a call per tensor."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        return
    for grad in grads:
        torch.nan_to_num_(grad, nan=0, posinf=1e5, neginf=-1e5)


def set_tf32(allow: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def frozen_d_parameters(D: torch.nn.Module, freeze_d: int) -> list[str]:
    """Freeze-D: names of the parameters of D's first `freeze_d` blocks (from the image side:
    fromRGB and the highest resolutions), which transfer keeps as trained on the source data."""
    if freeze_d <= 0:
        return []
    resolutions = list(D.block_resolutions)
    if freeze_d > len(resolutions):
        raise ValueError(f"freeze_d={freeze_d} but D has only {len(resolutions)} blocks ({resolutions})")
    # fromRGB, the blocks, and (skip architecture) the per-resolution image inputs of those blocks.
    prefixes = ("fromrgb.",) + tuple(p for r in resolutions[:freeze_d] for p in (f"blocks.b{r}.", f"skip_fromrgb.b{r}."))
    return [name for name, _ in D.named_parameters() if name.startswith(prefixes)]


class KimgBar(tqdm):
    """tqdm counting images but showing kimg with fixed decimals (`1.248/20.000 kimg`)."""

    @property
    def format_dict(self):
        d = super().format_dict
        d["kimg"] = f"{d['n'] / 1000:.3f}/{(d['total'] or 0) / 1000:.3f}"
        return d


KIMG_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {kimg} kimg [{elapsed}<{remaining}{postfix}]"


class SnapshotQuality:
    """KID of G_ema's images in the offline feature space of `ctsynth.metrics`, with its floor.

    The feature space (pixel PCA + intensity statistics) is fitted on half A of the real images
    (per-class halves, as the validate_synthetic stage does). Synthetic: as many images as half B,
    with half B's labels, from fixed latents. Floor: KID(A, B), what two real samples of that size
    give; a synthetic KID near the floor is as good as this feature space can tell.
    """

    def __init__(self, data: "TrainingData", c_dim: int, params: SyntheticParams) -> None:
        from ctsynth.metrics.features import PixelPCAFeatures
        from ctsynth.metrics.kid import kernel_inception_distance
        from ctsynth.metrics.synthetic import split_halves

        self.params, self.c_dim, self._kid = params, c_dim, kernel_inception_distance
        images = data.images.numpy()
        half_a, half_b = split_halves(data.labels.numpy(), params.seed)
        self.features = PixelPCAFeatures.fit(images[half_a], params.pca_components, params.pca_resolution, params.seed)
        self.reference = self.features(images[half_a])
        self.labels = data.labels[half_b]
        self.floor, self.floor_std = self.kid(self.features(images[half_b]))

    def kid(self, features: np.ndarray) -> tuple[float, float]:
        return self._kid(self.reference, features, self.params.kid_subsets, self.params.kid_subset_size, self.params.seed)

    @torch.no_grad()
    def __call__(self, G: torch.nn.Module, z_dim: int, batch: int = 64) -> dict[str, float]:
        device = next(G.parameters()).device
        generator = torch.Generator().manual_seed(QUALITY_SEED)
        z = torch.randn(len(self.labels), z_dim, generator=generator)
        images = []
        for start in range(0, len(z), batch):
            c = one_hot(self.labels[start : start + batch], self.c_dim)
            out = G(z[start : start + batch].to(device), c.to(device) if c is not None else None, noise_mode="const")
            images.append(out.float().clamp(-1, 1).cpu())
        kid, kid_std = self.kid(self.features(torch.cat(images).numpy()))
        return {"kid": kid, "kid_std": kid_std, "kid_floor": self.floor, "kid_floor_std": self.floor_std}


class GANTrainer:
    """Holds everything a snapshot must restore; `train()` runs until cfg.kimg."""

    def __init__(self, cfg: GANConfig, data: TrainingData, options: TrainOptions) -> None:
        self.cfg, self.data, self.options = cfg, data, options
        self.rank, self.world_size = world()
        if cfg.batch % self.world_size:
            raise ValueError(f"batch {cfg.batch} does not split over {self.world_size} processes")
        self.batch_per_rank = cfg.batch // self.world_size
        self.device = torch.device(options.device)
        set_tf32(options.allow_tf32)
        if self.device.type == "cuda":
            # Every minibatch has the same shapes: let cuDNN pick its fastest kernels once.
            torch.backends.cudnn.benchmark = True

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.G, self.D = build_networks(cfg, self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.augment_pipe = AugmentPipe(cfg.augment).to(self.device) if cfg.augment != "none" else None
        self.ada: AdaptiveP | None = None
        if self.augment_pipe is not None:
            if cfg.fixed_p is not None:
                self.augment_pipe.p.fill_(cfg.fixed_p)
            else:
                reduce = _all_reduce_sum if self.world_size > 1 else None
                self.ada = AdaptiveP(self.augment_pipe, cfg.ada_target, cfg.ada_kimg, cfg.ada_interval, reduce=reduce)
        self.loss = StyleGAN2Loss(
            self.G, self.D, self.augment_pipe, r1_gamma=cfg.gamma, style_mixing_prob=cfg.style_mixing_prob,
            pl_weight=cfg.pl_weight, pl_batch_shrink=cfg.pl_batch_shrink, pl_decay=cfg.pl_decay,
            r1_interval=cfg.r1_interval, pl_interval=cfg.pl_interval,
        )
        # The correction applies from the interval alone (also when pl_weight or gamma is 0), as
        # in the paper's setup: the presets' learning rates and betas were chosen with it.
        self.opt_G = _make_optimizer(self.G, cfg, cfg.pl_interval)
        self.opt_D = _make_optimizer(self.D, cfg, cfg.r1_interval)
        self.frozen_d = set(frozen_d_parameters(self.D, options.freeze_d))
        self.quality = None
        if options.snapshot_kid and self.rank == 0:
            if len(data) >= 8:
                self.quality = SnapshotQuality(data, cfg.c_dim, options.quality)
            else:
                log.warning("only %d training images: no KID at snapshots (needs 8)", len(data))
        self.best_snapshot: tuple[str, float] | None = None  # (file name, KID)

        # Sampling order of real images, separate from the networks' randomness so that both
        # can be restored exactly on resume.
        self.data_generator = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        torch.manual_seed(cfg.seed * 1000 + 1 + self.rank)
        self.cur_nimg = 0
        self.batch_idx = 0
        self.mlflow_run_id: str | None = None
        self._tick_stats: dict[str, list[float]] = {}
        self._tick_start = time.perf_counter()
        self._tick_start_nimg = 0

    # -- state ---------------------------------------------------------------

    @property
    def augment_p(self) -> float:
        """ADA's current augmentation probability (0 without an augmentation pipe): what the
        snapshots, the final network, the tick log and the resume message record."""
        return float(self.augment_pipe.p) if self.augment_pipe is not None else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": NETWORK_FORMAT,
            "config": self.cfg.to_dict(),
            "classes": list(self.options.classes),
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "augment_p": self.augment_p,
            "ada": self.ada.state_dict() if self.ada is not None else None,
            "loss": self.loss.state_dict(),
            "cur_nimg": self.cur_nimg,
            "batch_idx": self.batch_idx,
            "rng_torch": torch.get_rng_state(),
            "rng_data": self.data_generator.get_state(),
            "mlflow_run_id": self.mlflow_run_id or "",
            "best_snapshot": list(self.best_snapshot) if self.best_snapshot else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ckpt.check_network_format(state, "the snapshot")
        changed = ckpt.incompatible_changes(state["config"], self.cfg)
        if changed:
            raise ValueError(
                f"cannot resume: the snapshot was trained with different settings for {changed}; "
                "use a new output folder or the original settings"
            )
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        if self.augment_pipe is not None:
            self.augment_pipe.p.fill_(float(state["augment_p"]))
        if self.ada is not None and state.get("ada") is not None:
            self.ada.load_state_dict(state["ada"])
        self.loss.load_state_dict(state["loss"])
        self.cur_nimg = int(state["cur_nimg"])
        self.batch_idx = int(state["batch_idx"])
        if self.rank == 0:
            torch.set_rng_state(state["rng_torch"])
            self.data_generator.set_state(state["rng_data"])
        else:  # other ranks: a fresh but deterministic stream for this point of training
            torch.manual_seed(self.cfg.seed * 1000 + 1 + self.rank + self.cur_nimg)
            self.data_generator.manual_seed(self.cfg.seed * 1000 + self.rank + self.cur_nimg)
        self.mlflow_run_id = state.get("mlflow_run_id") or None
        best = state.get("best_snapshot") or []
        self.best_snapshot = (str(best[0]), float(best[1])) if best else None

    def init_from(self, path: Path) -> None:
        """Transfer: G, D and G_ema weights from another run's snapshot; everything else (image
        counter, optimiser moments, ADA p, path-length mean) starts fresh."""
        state = ckpt.load_checkpoint(path, map_location=self.device)
        ckpt.check_network_format(state, path)
        if "D" not in state:
            raise ValueError(f"{path} holds no discriminator (a network-final.pt keeps only G_ema); use a snapshot-*.pt")
        for key, module in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema)):
            own = module.state_dict()
            theirs = state[key]
            mismatch = sorted(
                name for name in set(own) | set(theirs)
                if name not in own or name not in theirs or own[name].shape != theirs[name].shape
            )
            if mismatch:
                raise ValueError(
                    f"cannot initialise {key} from {path}: different architecture at {mismatch[:5]}"
                    f"{' ...' if len(mismatch) > 5 else ''} (resolution, channels, c_dim and z/w dims must match)"
                )
            module.load_state_dict(theirs)
        log.info("initialised G, D and G_ema from %s (trained %.1f kimg there); counters and p start at 0%s",
                 path, int(state.get("cur_nimg", 0)) / 1000,
                 f", first {self.options.freeze_d} D blocks frozen" if self.options.freeze_d else "")

    def _set_trainable(self, train_G: bool) -> None:
        self.G.requires_grad_(train_G)
        self.D.requires_grad_(not train_G)
        if not train_G:
            for name, p in self.D.named_parameters():
                if name in self.frozen_d:
                    p.requires_grad_(False)

    # -- one minibatch -------------------------------------------------------

    def _real_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.randint(len(self.data), (self.batch_per_rank,), generator=self.data_generator)
        images = self.data.images[idx]
        if self.cfg.mirror:  # dataset x-flips: each image shown as is or mirrored, equally often
            flip = torch.rand(len(idx), generator=self.data_generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images.to(self.device), one_hot(self.data.labels[idx], self.cfg.c_dim)

    def _gen_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(self.batch_per_rank, self.cfg.z_dim, device=self.device)
        # Generated labels follow the real label distribution.
        idx = torch.randint(len(self.data), (self.batch_per_rank,), generator=self.data_generator)
        return z, one_hot(self.data.labels[idx], self.cfg.c_dim)

    def _train_step(self) -> None:
        real_img, real_c = self._real_batch()
        if real_c is not None:
            real_c = real_c.to(self.device)
        real_logits = []  # every D pass on real images this minibatch, for ADA's r_t
        for phase, interval in self.loss.enabled_phases():
            if self.batch_idx % interval != 0:
                continue
            train_G = phase.startswith("G")
            module, optimizer = (self.G, self.opt_G) if train_G else (self.D, self.opt_D)
            self._set_trainable(train_G)
            gen_z, gen_c = self._gen_inputs()
            if gen_c is not None:
                gen_c = gen_c.to(self.device)
            optimizer.zero_grad(set_to_none=True)
            out = self.loss.compute(phase, real_img, real_c, gen_z, gen_c)
            out.loss.backward()
            _all_reduce_mean_grads(module, self.world_size)
            sanitize_gradients(module)
            optimizer.step()
            for name, value in out.stats.items():
                self._tick_stats.setdefault(name, []).append(float(value))
            if out.real_logits is not None:
                real_logits.append(out.real_logits.detach().flatten())
        if self.ada is not None and real_logits:
            # One accumulate per minibatch (p's step counts images, not passes); the sign mean is
            # over every real logit D produced in it.
            r_t = self.ada.accumulate(torch.cat(real_logits), batch_size=self.cfg.batch)
            if r_t is not None:
                self._tick_stats.setdefault("ADA/r_t", []).append(r_t)
        self.G.requires_grad_(False)
        self.D.requires_grad_(False)
        self.cur_nimg += self.cfg.batch
        self.batch_idx += 1
        update_ema(self.G_ema, self.G, _ema_beta(self.cfg, self.cur_nimg))

    # -- outputs -------------------------------------------------------------

    def _tick_record(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self._tick_start
        images = self.cur_nimg - self._tick_start_nimg
        record = {name: float(np.mean(values)) for name, values in self._tick_stats.items()}
        record["kimg"] = self.cur_nimg / 1000
        record["ADA/p"] = self.augment_p
        record["Speed/images_per_s"] = images / elapsed if elapsed > 0 else 0.0
        record["Speed/s_per_kimg"] = elapsed / images * 1000 if images else 0.0
        self._tick_stats = {}
        self._tick_start, self._tick_start_nimg = time.perf_counter(), self.cur_nimg
        return record

    def _write_tick(self, record: dict[str, float]) -> None:
        log_path = self.options.out_dir / "training_log.csv"
        columns = ["kimg", "ADA/p", "ADA/r_t", "Loss/G/loss", "Loss/D/loss", "Loss/D/real", "Loss/D/fake",
                   "Loss/r1_penalty", "Loss/pl_penalty", "Loss/scores/real", "Loss/scores/fake",
                   "Speed/images_per_s", "Speed/s_per_kimg"]
        new_file = not log_path.exists()
        with open(log_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow({k: record.get(k, "") for k in columns})
        if self.options.mlflow:
            import mlflow

            step = self.cur_nimg
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in record.items()}, step=step)

    def snapshot(self) -> Path:
        path = self.options.out_dir / ckpt.snapshot_name(self.cur_nimg)
        quality = self.quality(self.G_ema, self.cfg.z_dim) if self.quality is not None else None
        if quality is not None and (self.best_snapshot is None or quality["kid"] < self.best_snapshot[1]):
            self.best_snapshot = (path.name, quality["kid"])
        state = self.state_dict() | {"quality": quality or {}}
        ckpt.atomic_torch_save(state, path)
        if quality is not None:
            self._write_quality(path, quality)
        best = self.options.out_dir / self.best_snapshot[0] if self.best_snapshot else None
        ckpt.prune_snapshots(self.options.out_dir, self.options.snap_keep, protect=best)
        grid_path = self.options.out_dir / "grids" / f"grid-{self.cur_nimg:09d}.png"
        save_image_grid(fixed_seed_grid(self.G_ema, self.cfg, len(self.options.classes)), grid_path)
        if self.options.mlflow:
            import mlflow

            mlflow.log_artifact(str(grid_path), artifact_path="grids")
        kid_text = f", KID {quality['kid']:.4g} (floor {quality['kid_floor']:.4g})" if quality else ""
        log.info("snapshot %s (kimg %.2f, p %.3f%s)", path.name, self.cur_nimg / 1000, self.augment_p, kid_text)
        return path

    def _write_quality(self, path: Path, quality: dict[str, float]) -> None:
        """One row per snapshot in snapshot_quality.csv (what `generate.snapshot: best` reads)."""
        log_path = self.options.out_dir / QUALITY_LOG
        row = {"kimg": self.cur_nimg / 1000, "snapshot": path.name} | quality
        new_file = not log_path.exists()
        with open(log_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self.options.mlflow:
            import mlflow

            mlflow.log_metrics({
                "Quality_kid_pixel_pca": quality["kid"], "Quality_kid_pixel_pca_std": quality["kid_std"],
                "Quality_kid_pixel_pca_floor": quality["kid_floor"],
                "Quality_kid_pixel_pca_floor_std": quality["kid_floor_std"],
            }, step=self.cur_nimg)

    def write_final(self) -> Path:
        path = self.options.out_dir / ckpt.FINAL_NETWORK
        final = {
            "format": NETWORK_FORMAT,
            "config": self.cfg.to_dict(),
            "classes": list(self.options.classes),
            "G_ema": self.G_ema.state_dict(),
            "cur_nimg": self.cur_nimg,
            "augment_p": self.augment_p,
            "mlflow_run_id": self.mlflow_run_id or "",
        }
        ckpt.atomic_torch_save(final, path)
        return path

    # -- the loop ------------------------------------------------------------

    def train(self) -> Path:
        out_dir = self.options.out_dir
        total_nimg = int(round(self.cfg.kimg * 1000))
        snap_nimg = max(int(round(self.cfg.snap * 1000)), self.cfg.batch)
        tick_nimg = max(int(round(self.options.tick_kimg * 1000)), self.cfg.batch)
        next_snap = (self.cur_nimg // snap_nimg + 1) * snap_nimg
        next_tick = (self.cur_nimg // tick_nimg + 1) * tick_nimg
        bar = KimgBar(
            total=total_nimg, initial=min(self.cur_nimg, total_nimg), bar_format=KIMG_BAR_FORMAT,
            desc=self.options.run_name, disable=not self.options.progress or self.rank != 0,
        )
        self._tick_start, self._tick_start_nimg = time.perf_counter(), self.cur_nimg
        while self.cur_nimg < total_nimg:
            before = self.cur_nimg
            self._train_step()
            bar.update(min(self.cur_nimg, total_nimg) - min(before, total_nimg))
            done = self.cur_nimg >= total_nimg
            if self.rank == 0 and (self.cur_nimg >= next_tick or done):
                record = self._tick_record()
                self._write_tick(record)
                bar.set_postfix(p=f"{record['ADA/p']:.3f}", G=f"{record.get('Loss/G/loss', 0):.2f}",
                                D=f"{record.get('Loss/D/loss', 0):.2f}")
                next_tick = (self.cur_nimg // tick_nimg + 1) * tick_nimg
            if self.cur_nimg >= next_snap or done:
                if self.rank == 0:
                    self.snapshot()
                next_snap = (self.cur_nimg // snap_nimg + 1) * snap_nimg
        bar.close()
        final = out_dir / ckpt.FINAL_NETWORK
        if self.rank == 0:
            final = self.write_final()
            if self.options.mlflow:
                import mlflow

                mlflow.log_artifact(str(final), artifact_path="network")
        return final


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def load_training_data(prepared_dir: Path, classes: list[str], resolution: int, split: str = "train") -> TrainingData:
    """The prepared split's PNGs (prepared/{split}/{class}/*.png) through the shared preprocessing."""
    from ctsynth.data.preprocess import preprocess_bytes

    images, labels = [], []
    for class_id, name in enumerate(classes):
        folder = Path(prepared_dir) / split / name
        files = sorted(folder.glob("*.png"))
        if not files:
            raise FileNotFoundError(
                f"no training images in {folder}; run the prepare stage first (dvc repro prepare) "
                f"or check data.classes={classes}"
            )
        for path in files:
            images.append(preprocess_bytes(path.read_bytes(), resolution))
            labels.append(class_id)
    return TrainingData(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long))


def train_gan(cfg: GANConfig, data: TrainingData, options: TrainOptions) -> Path:
    """Train (or resume) one StyleGAN2-ADA; returns the path of network-final.pt."""
    if world()[0] == 0:
        ckpt.claim_training_folder(options.out_dir)
        ckpt.clean_stale_temporaries(options.out_dir)
    else:
        options.out_dir.mkdir(parents=True, exist_ok=True)
    trainer = GANTrainer(cfg, data, options)
    found = None
    if options.resume:
        found = (
            ckpt.newest_loadable_snapshot(options.out_dir)
            if options.resume == "auto"
            else (Path(options.resume), ckpt.load_checkpoint(Path(options.resume)))
        )
        if found is not None:
            path, state = found
            trainer.load_state_dict(state)
            log.info("resumed from %s at kimg %.3f with p %.4f", path, trainer.cur_nimg / 1000, trainer.augment_p)
    if found is None and options.init_from is not None:  # a resumed transfer run continues its own snapshots
        trainer.init_from(Path(options.init_from))
    rank, _ = world()
    if not options.mlflow or rank != 0:
        return trainer.train()

    from ctsynth import tracking

    with tracking.start_run(
        tracking.EXPERIMENT_GAN, options.run_name, tags=options.mlflow_tags, resume_run_id=trainer.mlflow_run_id
    ) as run:
        import mlflow

        if trainer.mlflow_run_id != run.info.run_id:  # a new run (also when the old one is gone from the store)
            mlflow.log_params({k: str(v) for k, v in cfg.to_dict().items()})
            mlflow.log_params({
                "classes": ",".join(options.classes), "n_train_images": len(data),
                "init_from": str(options.init_from or ""), "freeze_d": options.freeze_d,
            })
        # Numerics may differ between resumes (another machine): a tag, overwritten each time.
        mlflow.set_tag("allow_tf32", str(options.allow_tf32).lower())
        trainer.mlflow_run_id = run.info.run_id
        return trainer.train()


def train_gan_models(cfg: GANConfig, data: TrainingData, options: TrainOptions, per_class: bool) -> list[Path]:
    """One conditional model in out_dir, or (per_class) one unconditional model per class in
    out_dir/<class>/, as the reference study trained them. Returns the final network paths."""
    if not per_class:
        conditional = GANConfig.from_dict(cfg.to_dict() | {"c_dim": len(options.classes)})
        return [train_gan(conditional, data, options)]
    finals = []
    unconditional = GANConfig.from_dict(cfg.to_dict() | {"c_dim": 0})
    for class_id, name in enumerate(options.classes):
        keep = data.labels == class_id
        class_data = TrainingData(data.images[keep], data.labels[keep])
        class_options = copy.copy(options)
        class_options.out_dir = options.out_dir / name
        class_options.classes = [name]
        class_options.run_name = f"{options.run_name}-{name}"
        finals.append(train_gan(unconditional, class_data, class_options))
    return finals
