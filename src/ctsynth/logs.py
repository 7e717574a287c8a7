"""One logging set-up for the command line and the DVC stage scripts."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    level_name = (level or os.environ.get("CTSYNTH_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(
        level=getattr(logging, level_name, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # MLflow and GX are chatty at INFO; their warnings still come through.
    for noisy in ("alembic", "great_expectations", "mlflow.store", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
