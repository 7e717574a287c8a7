"""DVC stage `validate_synthetic`: the validate suite on the synthetic manifest + quality metrics.

Reads params.yaml (data, synthetic), writes reports/synthetic/metrics.json (the headline numbers
DVC compares), reports/synthetic/details.json (everything) and
reports/synthetic/nearest_neighbours.png, logs to MLflow (experiment ctsynth-gan) with
data/prepared and data/synthetic as dataset inputs. Exits 1 when a check listed in
synthetic.fail_on fails.
"""

from __future__ import annotations

import sys

from ctsynth.config import load_params
from ctsynth.logs import setup_logging
from ctsynth.metrics.synthetic import validate_synthetic
from ctsynth.paths import repo_root


def main() -> int:
    setup_logging()
    params = load_params()
    root = repo_root()
    result = validate_synthetic(
        root / params.synthetic.synthetic,
        root / params.data.prepared,
        root / params.synthetic.report,
        params.data,
        params.synthetic,
        validate_params=params.validation,
    )
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
