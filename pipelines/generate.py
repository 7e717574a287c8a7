"""DVC stage `generate`: python pipelines/generate.py

Writes params.yaml `generate.per_class` synthetic images per class from models/gan into
data/synthetic/<class>/*.png with data/synthetic/manifest.csv (seeded, truncation psi).
"""

from __future__ import annotations

import shutil

from ctsynth.config import load_params
from ctsynth.gan.generate import generate_images
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root


def main() -> None:
    setup_logging()
    params = load_params()
    root = repo_root()
    gen = params.generate
    out = root / gen.out
    if out.exists():  # stale images of a previous GAN must not survive in the folder
        shutil.rmtree(out)
    generate_images(
        root / params.gan.out, out, params.data.classes, per_class=gen.per_class, seed=gen.seed, psi=gen.psi,
        out_resolution=gen.out_resolution or params.data.resolution, noise_mode=gen.noise_mode, batch=gen.batch,
    )


if __name__ == "__main__":
    main()
