"""How fast does a GAN preset learn the embedded data? KID and a grid every few kimg.

Trains one StyleGAN2-ADA variant (a preset plus ``--set`` overrides, conditional on the data's
classes) on the prepared training split and, every ``--eval-kimg``, generates
``--per-class`` images per class from G_ema and measures KID and the Fréchet distance in the
offline pixel-PCA feature space of ``validate_synthetic`` (fitted on train half A; the
real-vs-real floor is train half B against half A), and *GAN-test*: the accuracy of one
classifier trained on the real splits (params.yaml's classifier, seed 0) on the generated images
labelled by their conditioning class (0.5: no class signal). Writes ``convergence.csv`` and one
grid per evaluation into ``--out``. Used to choose the CPU preset and its training length: the
quality per kimg is the same on any device, so several variants can be compared quickly on a
GPU and then priced with ``benchmarks/gan_throughput.py`` on the CPU.

    PYTHONPATH=src python benchmarks/gan_convergence.py --data data/prepared --out runs/conv/cpu64 \\
        --preset cpu64 --kimg 20 --eval-kimg 2
    PYTHONPATH=src python benchmarks/gan_convergence.py --data data/prepared --out runs/conv/lr5 \\
        --preset cpu64 --set lr=0.005 --device cuda --kimg 40
"""

from __future__ import annotations

import argparse
import ast
import csv
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ctsynth.gan.presets import make_config
from ctsynth.gan.grid import fixed_seed_grid, one_hot, save_image_grid
from ctsynth.gan.train import GANTrainer, TrainOptions, load_training_data
from ctsynth.metrics.features import PixelPCAFeatures
from ctsynth.metrics.frechet import frechet_distance
from ctsynth.metrics.kid import kernel_inception_distance

log = logging.getLogger("gan_convergence")


class RealReference:
    """The real side of the KIDs: features fitted on train half A (seeded split), the real-vs-real
    floor (half B against half A), for the full feature vector and its pixel-PCA block alone (the
    intensity statistics of a poor generator dominate the full KID)."""

    def __init__(self, features: PixelPCAFeatures, reference: np.ndarray, floor_set: np.ndarray) -> None:
        self.features, self.reference, self.floor_set = features, reference, floor_set
        self.n_pca = int(features.pca.n_components_)
        self.floor_kid = kernel_inception_distance(reference, floor_set, 100, 1000, 0)[0]
        self.floor_kid_pca = kernel_inception_distance(reference[:, :self.n_pca], floor_set[:, :self.n_pca], 100, 1000, 0)[0]

    @classmethod
    def fit(cls, train_images: np.ndarray) -> "RealReference":
        half = np.zeros(len(train_images), bool)
        half[np.random.default_rng(0).permutation(len(train_images))[: (len(train_images) + 1) // 2]] = True
        features = PixelPCAFeatures.fit(train_images[half])
        return cls(features, features(train_images[half]), features(train_images[~half]))

    def kid(self, fake: np.ndarray) -> tuple[float, float, np.ndarray]:
        """(KID, pixel-PCA KID, fake features) of generated images against half A."""
        fake_features = self.features(fake)
        kid = kernel_inception_distance(self.reference, fake_features, 100, 1000, 0)[0]
        kid_pca = kernel_inception_distance(self.reference[:, :self.n_pca], fake_features[:, :self.n_pca], 100, 1000, 0)[0]
        return kid, kid_pca, fake_features


def real_classifier(data: Path, classes: list[str]):
    """A classifier trained on the real train split (valid for early stopping) with params.yaml's
    classifier settings, seed 0: the judge of GAN-test. Returns (model, params, real test accuracy)."""
    from ctsynth.classifier.train import train_classifier
    from ctsynth.config import load_params
    from ctsynth.data.mixing import real_split
    from ctsynth.paths import repo_root

    params = load_params(repo_root() / "params.yaml").classifier
    splits = {split: real_split(data, split, classes) for split in ("train", "valid", "test")}
    result = train_classifier(params, splits["train"], splits["valid"], splits["test"], classes, seed=0, progress=False)
    return result.model, params, result.test["accuracy"]


def gan_test_accuracy(model, params, fake: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of `model` on generated images (N x 1 x R x R in [-1, 1]) labelled by their
    conditioning class, each written as the PNG `generate` writes and read back through the one
    preprocessing function."""
    import io

    from PIL import Image

    from ctsynth.classifier.train import predict_probabilities
    from ctsynth.data.preprocess import preprocess_bytes

    inputs = []
    for image in fake:
        buffer = io.BytesIO()
        Image.fromarray(np.rint((image[0] + 1) * 127.5).clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
        inputs.append(preprocess_bytes(buffer.getvalue(), params.resolution))
    probabilities = predict_probabilities(model, torch.from_numpy(np.stack(inputs)))
    return float((probabilities.argmax(1).numpy() == labels).mean())


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


@torch.no_grad()
def sample(G: torch.nn.Module, per_class: int, c_dim: int, z_dim: int, device: torch.device, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """per_class images of each class from G (random noise, psi 1), as N x 1 x R x R in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for class_id in range(c_dim):
        for start in range(0, per_class, 100):
            n = min(100, per_class - start)
            z = torch.randn(n, z_dim, generator=generator).to(device)
            c = one_hot(torch.full((n,), class_id, dtype=torch.long), c_dim).to(device)
            images.append(G(z, c, noise_mode="random").float().clamp(-1, 1).cpu().numpy())
            labels.append(np.full(n, class_id))
    return np.concatenate(images), np.concatenate(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="cpu64")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--classes", default="normal,squamous")
    parser.add_argument("--kimg", type=float, default=20.0)
    parser.add_argument("--eval-kimg", type=float, default=2.0)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--deadline-s", type=float, default=None, help="stop after the evaluation that passes this wall time")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    classes = args.classes.split(",")
    cfg = make_config(args.preset, args.resolution, **(parse_overrides(args.overrides) | {"c_dim": len(classes)}))
    data = load_training_data(args.data, classes, args.resolution)
    train_images = data.images.numpy()
    real = RealReference.fit(train_images)
    reference = real.reference
    floor_kid, floor_kid_pca = real.floor_kid, real.floor_kid_pca
    floor_fd = frechet_distance(reference, real.floor_set)

    judge, judge_params, real_test_accuracy = real_classifier(args.data, classes)
    log.info("GAN-test judge: real-only classifier, test accuracy %.3f on real images", real_test_accuracy)

    args.out.mkdir(parents=True, exist_ok=True)
    trainer = GANTrainer(cfg, data, TrainOptions(out_dir=args.out, classes=classes, mlflow=False, progress=False, device=args.device))
    rows, start, train_s = [], time.perf_counter(), 0.0
    eval_nimg = int(args.eval_kimg * 1000)
    next_eval = eval_nimg
    total = int(args.kimg * 1000)
    with open(args.out / "convergence.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kimg", "train_s", "kid", "kid_floor", "kid_pca", "kid_pca_floor", "frechet", "frechet_floor", "ada_p", "g_loss", "d_loss",
                         "gan_test", "real_test_accuracy"])
        while trainer.cur_nimg < total:
            t0 = time.perf_counter()
            trainer._train_step()
            train_s += time.perf_counter() - t0
            if trainer.cur_nimg < next_eval and trainer.cur_nimg < total:
                continue
            next_eval += eval_nimg
            stats = trainer._tick_record()
            fake, fake_labels = sample(trainer.G_ema, args.per_class, cfg.c_dim, cfg.z_dim, trainer.device, seed=1)
            kid, kid_pca, fake_features = real.kid(fake)
            fd = frechet_distance(reference, fake_features)
            row = [trainer.cur_nimg / 1000, round(train_s, 1), kid, floor_kid, kid_pca, floor_kid_pca, fd, floor_fd,
                   stats["ADA/p"], stats.get("Loss/G/loss", float("nan")), stats.get("Loss/D/loss", float("nan")),
                   gan_test_accuracy(judge, judge_params, fake, fake_labels), real_test_accuracy]
            writer.writerow(row)
            f.flush()
            rows.append(row)
            save_image_grid(fixed_seed_grid(trainer.G_ema, cfg, len(classes)), args.out / f"grid-{trainer.cur_nimg // 1000:04d}kimg.png")
            log.info("kimg %.1f  train %.0f s  KID %.4g (floor %.3g)  pixel KID %.4g (floor %.3g)  p %.3f  GAN-test %.3f",
                     row[0], train_s, kid, floor_kid, kid_pca, floor_kid_pca, row[8], row[11])
            if args.deadline_s and time.perf_counter() - start > args.deadline_s:
                log.info("deadline reached at kimg %.1f", row[0])
                break


if __name__ == "__main__":
    main()
