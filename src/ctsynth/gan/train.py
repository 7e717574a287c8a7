"""StyleGAN2-ADA training loop: phases, lazy regularisation, EMA, adaptive p, snapshots, resume.

One minibatch, read top to bottom in `_train_step`:

    Gmain  every step          G minimises softplus(-D(aug(G(z))))
    Greg   every pl_interval   path-length penalty (x pl_interval)
    Dmain  every step          D minimises softplus(D(aug(G(z)))) + softplus(-D(aug(x)))
    Dreg   every r1_interval   R1 on augmented reals (x r1_interval)
    then   G_ema <- lerp(G, G_ema, beta);  every ada_interval steps: p <- p +- step

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
from PIL import Image
from tqdm import tqdm

from ctsynth.gan import checkpoint as ckpt
from ctsynth.gan.augment import AdaptiveP, AugmentPipe
from ctsynth.gan.loss import StyleGAN2Loss, lazy_regularization_adam
from ctsynth.gan.networks import Discriminator, Generator
from ctsynth.gan.presets import GANConfig

log = logging.getLogger(__name__)

NETWORK_FORMAT = "ctsynth-stylegan2-ada/1"
GRID_COLUMNS = 8
GRID_SEED = 1234
# Config keys a resumed run may change: length, snapshot spacing and speed-only settings.
RESUMABLE_CHANGES = ("kimg", "snap", "num_bf16_res", "channels_last")


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


def build_networks(cfg: GANConfig, device: str | torch.device) -> tuple[Generator, Discriminator]:
    G = Generator(
        z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim, img_resolution=cfg.resolution,
        img_channels=cfg.img_channels, channel_base=cfg.channel_base, channel_max=cfg.channel_max,
        map_layers=cfg.map_layers, mapping_lr_mul=cfg.mapping_lr_mul, conv_clamp=cfg.conv_clamp,
        num_bf16_res=cfg.num_bf16_res, channels_last=cfg.channels_last,
    )
    D = Discriminator(
        c_dim=cfg.c_dim, img_resolution=cfg.resolution, img_channels=cfg.img_channels,
        channel_base=cfg.channel_base, channel_max=cfg.channel_max, mbstd_group_size=cfg.mbstd,
        conv_clamp=cfg.conv_clamp, num_bf16_res=cfg.num_bf16_res, channels_last=cfg.channels_last,
        architecture=cfg.d_architecture,
    )
    return G.to(device), D.to(device)


def one_hot(labels: torch.Tensor, c_dim: int) -> torch.Tensor | None:
    if c_dim == 0:
        return None
    return torch.nn.functional.one_hot(labels, c_dim).float()


def _ema_beta(cfg: GANConfig, cur_nimg: int) -> float:
    ema_nimg = cfg.ema_kimg * 1000
    if cfg.ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * cfg.ema_rampup)
    return 0.5 ** (cfg.batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


def _make_optimizer(module: torch.nn.Module, cfg: GANConfig, reg_interval: int | None) -> torch.optim.Adam:
    lr, betas = lazy_regularization_adam(cfg.lr, tuple(cfg.betas), reg_interval)
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas, eps=cfg.eps)


class GANTrainer:
    """Holds everything a snapshot must restore; `train()` runs until cfg.kimg."""

    def __init__(self, cfg: GANConfig, data: TrainingData, options: TrainOptions) -> None:
        self.cfg, self.data, self.options = cfg, data, options
        self.rank, self.world_size = world()
        if cfg.batch % self.world_size:
            raise ValueError(f"batch {cfg.batch} does not split over {self.world_size} processes")
        self.batch_per_rank = cfg.batch // self.world_size
        self.device = torch.device(options.device)
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
        self.opt_G = _make_optimizer(self.G, cfg, cfg.pl_interval if cfg.pl_weight > 0 else None)
        self.opt_D = _make_optimizer(self.D, cfg, cfg.r1_interval if cfg.gamma > 0 else None)

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
            "augment_p": float(self.augment_pipe.p) if self.augment_pipe is not None else 0.0,
            "ada": self.ada.state_dict() if self.ada is not None else None,
            "loss": self.loss.state_dict(),
            "cur_nimg": self.cur_nimg,
            "batch_idx": self.batch_idx,
            "rng_torch": torch.get_rng_state(),
            "rng_data": self.data_generator.get_state(),
            "mlflow_run_id": self.mlflow_run_id or "",
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != NETWORK_FORMAT:
            raise ValueError(f"not a ctsynth StyleGAN2-ADA snapshot (format {state.get('format')!r})")
        saved = GANConfig.from_dict(state["config"])
        changed = {k for k, v in saved.to_dict().items() if k not in RESUMABLE_CHANGES and self.cfg.to_dict()[k] != v}
        if changed:
            raise ValueError(
                f"cannot resume: the snapshot was trained with different settings for {sorted(changed)}; "
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

    # -- one minibatch -------------------------------------------------------

    def _real_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.randint(len(self.data), (self.batch_per_rank,), generator=self.data_generator)
        images = self.data.images[idx].to(self.device)
        return images, one_hot(self.data.labels[idx], self.cfg.c_dim)

    def _gen_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(self.batch_per_rank, self.cfg.z_dim, device=self.device)
        # Generated labels follow the real label distribution.
        idx = torch.randint(len(self.data), (self.batch_per_rank,), generator=self.data_generator)
        return z, one_hot(self.data.labels[idx], self.cfg.c_dim)

    def _train_step(self) -> None:
        real_img, real_c = self._real_batch()
        if real_c is not None:
            real_c = real_c.to(self.device)
        for phase, interval in self.loss.enabled_phases():
            if self.batch_idx % interval != 0:
                continue
            train_G = phase.startswith("G")
            module, optimizer = (self.G, self.opt_G) if train_G else (self.D, self.opt_D)
            self.G.requires_grad_(train_G)
            self.D.requires_grad_(not train_G)
            gen_z, gen_c = self._gen_inputs()
            if gen_c is not None:
                gen_c = gen_c.to(self.device)
            optimizer.zero_grad(set_to_none=True)
            out = self.loss.compute(phase, real_img, real_c, gen_z, gen_c)
            out.loss.backward()
            _all_reduce_mean_grads(module, self.world_size)
            for p in module.parameters():
                if p.grad is not None:  # one bad minibatch must not poison the weights
                    torch.nan_to_num_(p.grad, nan=0, posinf=1e5, neginf=-1e5)
            optimizer.step()
            for name, value in out.stats.items():
                self._tick_stats.setdefault(name, []).append(float(value))
            if phase == "Dmain" and self.ada is not None:
                r_t = self.ada.accumulate(out.real_logits, batch_size=self.cfg.batch)
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
        record["ADA/p"] = float(self.augment_pipe.p) if self.augment_pipe is not None else 0.0
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
        ckpt.atomic_torch_save(self.state_dict(), path)
        ckpt.prune_snapshots(self.options.out_dir, self.options.snap_keep)
        grid_path = self.options.out_dir / "grids" / f"grid-{self.cur_nimg:09d}.png"
        save_image_grid(fixed_seed_grid(self.G_ema, self.cfg, len(self.options.classes)), grid_path)
        if self.options.mlflow:
            import mlflow

            mlflow.log_artifact(str(grid_path), artifact_path="grids")
        log.info("snapshot %s (kimg %.2f, p %.3f)", path.name, self.cur_nimg / 1000, record_p(self))
        return path

    def write_final(self) -> Path:
        path = self.options.out_dir / ckpt.FINAL_NETWORK
        final = {
            "format": NETWORK_FORMAT,
            "config": self.cfg.to_dict(),
            "classes": list(self.options.classes),
            "G_ema": self.G_ema.state_dict(),
            "cur_nimg": self.cur_nimg,
            "augment_p": float(self.augment_pipe.p) if self.augment_pipe is not None else 0.0,
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
        bar = tqdm(
            total=total_nimg, initial=min(self.cur_nimg, total_nimg), unit="kimg", unit_scale=1e-3,
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


def record_p(trainer: GANTrainer) -> float:
    return float(trainer.augment_pipe.p) if trainer.augment_pipe is not None else 0.0


# ---------------------------------------------------------------------------
# Image grids
# ---------------------------------------------------------------------------


@torch.no_grad()
def fixed_seed_grid(G: Generator, cfg: GANConfig, n_classes: int, columns: int = GRID_COLUMNS) -> np.ndarray:
    """One row per class (one row for an unconditional G), same seeds at every snapshot."""
    device = next(G.parameters()).device
    rows = []
    generator = torch.Generator().manual_seed(GRID_SEED)
    z = torch.randn(columns, cfg.z_dim, generator=generator).to(device)
    for class_id in range(n_classes if cfg.c_dim else 1):
        c = one_hot(torch.full((columns,), class_id, dtype=torch.long), cfg.c_dim)
        images = G(z, c.to(device) if c is not None else None, noise_mode="const")
        rows.append(to_uint8(images))
    return tile(np.stack(rows))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x 1 x R x R in [-1, 1] -> N x R x R uint8."""
    return ((images[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def tile(rows: np.ndarray, gap: int = 2) -> np.ndarray:
    """rows x cols x R x R uint8 -> one image with a small white gap between cells."""
    n_rows, n_cols, h, w = rows.shape
    canvas = np.full((n_rows * (h + gap) - gap, n_cols * (w + gap) - gap), 255, dtype=np.uint8)
    for r in range(n_rows):
        for c in range(n_cols):
            canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = rows[r, c]
    return canvas


def save_image_grid(grid: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid, mode="L").save(path)


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
    options.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.clean_stale_temporaries(options.out_dir)
    trainer = GANTrainer(cfg, data, options)
    if options.resume:
        found = (
            ckpt.newest_loadable_snapshot(options.out_dir)
            if options.resume == "auto"
            else (Path(options.resume), ckpt.load_checkpoint(Path(options.resume)))
        )
        if found is not None:
            path, state = found
            trainer.load_state_dict(state)
            log.info("resumed from %s at kimg %.3f with p %.4f", path, trainer.cur_nimg / 1000, record_p(trainer))
    rank, _ = world()
    if not options.mlflow or rank != 0:
        return trainer.train()

    from ctsynth import tracking

    with tracking.start_run(
        tracking.EXPERIMENT_GAN, options.run_name, tags=options.mlflow_tags, resume_run_id=trainer.mlflow_run_id
    ) as run:
        import mlflow

        if trainer.mlflow_run_id is None:
            mlflow.log_params({k: str(v) for k, v in cfg.to_dict().items()})
            mlflow.log_params({"classes": ",".join(options.classes), "n_train_images": len(data)})
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
