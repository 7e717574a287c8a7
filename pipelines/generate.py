"""DVC stage `generate`: python pipelines/generate.py

Writes params.yaml `generate.per_class` synthetic images per class from models/gan (the final
network, or with `generate.snapshot: best` the snapshot with the lowest KID at training time) into
data/synthetic/<class>/*.png with data/synthetic/manifest.csv (seeded, truncation psi).

The output folder must lie inside the repository (unless `generate.allow_outside_repo`) and must
not be, contain or lie inside the raw data; a rerun removes only the files an earlier run listed
in its marker (see ctsynth.gan.generate.claim_output_folder).
"""

from __future__ import annotations

from ctsynth.config import load_params
from ctsynth.gan.checkpoint import check_output_location
from ctsynth.gan.generate import generate_images
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root


def main() -> None:
    setup_logging()
    params = load_params()
    root = repo_root()
    gen = params.generate
    out = check_output_location(
        root / gen.out, root=root, protected=[root / params.data.raw], allow_outside_repo=gen.allow_outside_repo
    )
    generate_images(
        root / params.gan.out, out, params.data.classes, per_class=gen.per_class, seed=gen.seed, psi=gen.psi,
        out_resolution=gen.out_resolution or params.data.resolution, noise_mode=gen.noise_mode, batch=gen.batch,
        snapshot=gen.snapshot, device=gen.device,
    )


if __name__ == "__main__":
    main()
