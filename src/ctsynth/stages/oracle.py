"""Stage `oracle`: the oracle arm's new genuine training images (the study's positive control).

Writes sweep.oracle (data/oracle): new phantom slices through the prepare path (embedded data), or
a held-out part of the real train split (sweep.oracle_source: holdout); ctsynth.data.oracle builds
them and docs/study.md explains why the study needs them.
"""

from __future__ import annotations

from pathlib import Path

from ctsynth.config import Params
from ctsynth.data.oracle import build_oracle


def run(params: Params, root: Path) -> Path:
    """Write the oracle pool; returns its manifest."""
    return build_oracle(params, root)
