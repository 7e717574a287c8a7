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
from ctsynth.gan.generate import class_centre, synthesize
from ctsynth.gan.grid import fixed_seed_grid, save_image_grid
from ctsynth.gan.train import GANTrainer, TrainingData, TrainOptions, load_training_data
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


def diversity_ratio(fake: np.ndarray, fake_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray) -> float:
    """Mean per-pixel std over the generated images of a class, divided by the same over that
    class's real images, averaged over classes: 1 is the real variety, near 0 one image per class
    (mode collapse, which KID and GAN-test alone do not show)."""
    ratios = [fake[fake_labels == k].std(axis=0).mean() / real[real_labels == k].std(axis=0).mean() for k in np.unique(fake_labels)]
    return float(np.mean(ratios))


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
def sample(generators: list[tuple[torch.nn.Module, int]], per_class: int, z_dim: int, seed: int, psi: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """per_class images of each class, as N x 1 x R x R in [-1, 1]; `generators[k]` is class k's
    (G, its class index inside G). Random noise; truncation psi as `generate` does it (towards the
    class's mean w for a conditional G, the tracked mean w otherwise); the same latents for every psi."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for class_id, (G, index) in enumerate(generators):
        centre = class_centre(G, index) if psi != 1 and G.c_dim else None
        for start in range(0, per_class, 100):
            n = min(100, per_class - start)
            z = torch.randn(n, z_dim, generator=generator)
            if G.c_dim:
                fake = synthesize(G, z, index, psi, "random", centre)
            else:
                fake = G(z.to(next(G.parameters()).device), None, psi=psi, noise_mode="random")
            images.append(fake.float().clamp(-1, 1).cpu().numpy())
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
    parser.add_argument("--psi", default="1.0", help="comma-separated truncation values; KID at the first, GAN-test at each")
    parser.add_argument("--per-class-models", action="store_true",
                        help="one unconditional model per class (gan.per_class), --kimg shared between them")
    parser.add_argument("--save-network", action="store_true", help="write network-final.pt and a full snapshot into --out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    classes = args.classes.split(",")
    psis = [float(value) for value in args.psi.split(",")]
    overrides = parse_overrides(args.overrides)
    data = load_training_data(args.data, classes, args.resolution)
    train_images = data.images.numpy()
    real = RealReference.fit(train_images)
    reference = real.reference
    floor_kid, floor_kid_pca = real.floor_kid, real.floor_kid_pca
    floor_fd = frechet_distance(reference, real.floor_set)

    judge, judge_params, real_test_accuracy = real_classifier(args.data, classes)
    log.info("GAN-test judge: real-only classifier, test accuracy %.3f on real images", real_test_accuracy)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.per_class_models:
        # The reference study's layout: one unconditional model per class; --kimg is their sum, so
        # a run costs what the conditional one costs.
        cfg = make_config(args.preset, args.resolution, **(overrides | {"c_dim": 0}))
        trainers = []
        for class_id, name in enumerate(classes):
            keep = data.labels == class_id
            trainers.append(GANTrainer(cfg, TrainingData(data.images[keep], data.labels[keep]),
                                       TrainOptions(out_dir=args.out / name, classes=[name], mlflow=False, progress=False, device=args.device)))
        generators = [(trainer.G_ema, 0) for trainer in trainers]
    else:
        cfg = make_config(args.preset, args.resolution, **(overrides | {"c_dim": len(classes)}))
        trainers = [GANTrainer(cfg, data, TrainOptions(out_dir=args.out, classes=classes, mlflow=False, progress=False, device=args.device))]
        generators = [(trainers[0].G_ema, k) for k in range(len(classes))]  # G_ema is updated in place

    def shown() -> int:
        return sum(trainer.cur_nimg for trainer in trainers)

    columns = ["kimg", "train_s", "kid", "kid_floor", "kid_pca", "kid_pca_floor", "frechet", "frechet_floor", "ada_p", "g_loss", "d_loss",
               "gan_test", "real_test_accuracy", "diversity"] + [f"gan_test_psi{psi:g}" for psi in psis[1:]]
    start, train_s = time.perf_counter(), 0.0
    eval_nimg = int(args.eval_kimg * 1000)
    next_eval = eval_nimg
    total = int(args.kimg * 1000)
    with open(args.out / "convergence.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        while shown() < total:
            t0 = time.perf_counter()
            for trainer in trainers:
                trainer._train_step()
            train_s += time.perf_counter() - t0
            if shown() < next_eval and shown() < total:
                continue
            next_eval += eval_nimg
            stats = [trainer._tick_record() for trainer in trainers]
            fake, fake_labels = sample(generators, args.per_class, cfg.z_dim, seed=1, psi=psis[0])
            kid, kid_pca, fake_features = real.kid(fake)
            row = {
                "kimg": shown() / 1000, "train_s": round(train_s, 1), "kid": kid, "kid_floor": floor_kid,
                "kid_pca": kid_pca, "kid_pca_floor": floor_kid_pca,
                "frechet": frechet_distance(reference, fake_features), "frechet_floor": floor_fd,
                **{column: float(np.mean([s.get(key, float("nan")) for s in stats]))
                   for column, key in (("ada_p", "ADA/p"), ("g_loss", "Loss/G/loss"), ("d_loss", "Loss/D/loss"))},
                "gan_test": gan_test_accuracy(judge, judge_params, fake, fake_labels), "real_test_accuracy": real_test_accuracy,
                "diversity": diversity_ratio(fake, fake_labels, train_images, data.labels.numpy()),
            }
            for psi in psis[1:]:
                row[f"gan_test_psi{psi:g}"] = gan_test_accuracy(judge, judge_params, *sample(generators, args.per_class, cfg.z_dim, seed=1, psi=psi))
            writer.writerow(row)
            f.flush()
            grid = np.concatenate([fixed_seed_grid(trainer.G_ema, cfg, len(classes)) for trainer in trainers])
            save_image_grid(grid, args.out / f"grid-{shown() // 1000:04d}kimg.png")
            gan_tests = [row["gan_test"]] + [row[f"gan_test_psi{psi:g}"] for psi in psis[1:]]
            log.info("kimg %.1f  train %.0f s  KID %.4g (floor %.3g)  pixel KID %.4g (floor %.3g)  p %.3f  diversity %.2f  GAN-test %s",
                     row["kimg"], train_s, kid, floor_kid, kid_pca, floor_kid_pca, row["ada_p"], row["diversity"],
                     "  ".join(f"{value:.3f} (psi {psi:g})" for psi, value in zip(psis, gan_tests)))
            if args.deadline_s and time.perf_counter() - start > args.deadline_s:
                log.info("deadline reached at kimg %.1f", row["kimg"])
                break
    if args.save_network:
        for trainer in trainers:
            log.info("network: %s, snapshot (G, D, G_ema): %s", trainer.write_final(), trainer.snapshot())


if __name__ == "__main__":
    main()
