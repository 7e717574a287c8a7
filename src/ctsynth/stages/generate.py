"""Stage `generate`: params `generate.per_class` synthetic images per class from the trained GAN.

Samples the network in gan.out (the final network, or with `generate.snapshot: best` the snapshot
with the lowest KID at training time; gan.out may also be a network file or a registry URI such as
models:/ctsynth-generator@latest) into generate.out/<class>/*.png with manifest.csv (seeded,
truncation psi), resized to generate.out_resolution (default data.resolution).

The output folder must lie inside the repository (unless `generate.allow_outside_repo`) and must
not be, contain or lie inside the raw data; a rerun removes only the files an earlier run listed
in its marker (see ctsynth.gan.generate.claim_output_folder).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from ctsynth.config import Params
from ctsynth.gan.checkpoint import check_output_location
from ctsynth.gan.generate import generate_images
from ctsynth.paths import resolve

REGISTRY_SCHEME = "models:/"
# A registry URI that names nothing, or a network file that is not there: one line, exit 1.
EXPECTED_ERRORS = (FileNotFoundError,)


def run(params: Params, root: Path) -> pd.DataFrame:
    """Write the images; returns their manifest."""
    gen = params.generate
    out = check_output_location(
        resolve(gen.out, root), root=root, protected=[resolve(params.data.raw, root)], allow_outside_repo=gen.allow_outside_repo
    )
    with tempfile.TemporaryDirectory() as tmp:
        return generate_images(
            generator_source(params.gan.out, root, Path(tmp)), out, params.data.classes, per_class=gen.per_class, seed=gen.seed,
            psi=gen.psi, out_resolution=gen.out_resolution or params.data.resolution, noise_mode=gen.noise_mode, batch=gen.batch,
            snapshot=gen.snapshot, device=gen.device,
        )


def generator_source(location: str, root: Path, download_to: Path) -> Path:
    """A GAN folder or network file on disk, or a registry URI downloaded into `download_to`."""
    if location.startswith(REGISTRY_SCHEME):
        from ctsynth.registry import download_generator

        return download_generator(location, download_to)
    return resolve(location, root)
