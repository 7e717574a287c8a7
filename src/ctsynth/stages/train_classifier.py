"""Stage `train_classifier`: every item of the sweep (sweep.arms x sweep.ratios x sweep.seeds).

Runs the items through the executor params `sweep.executor` names (local worker processes, or Ray
tasks on $RAY_ADDRESS). Each item mixes its training set, trains with early stopping on
validation, measures on the real test split, logs an MLflow child run under the sweep's parent run
(experiment ctsynth-classifier), and writes metrics/sweep/<arm>_r<ratio>_s<seed>.json (flat
numbers; details beside it in details/) and models/classifier/runs/<arm>_r<ratio>_s<seed>.pt.
Items whose params, data and code did not change since their files were written are reused; an
item that fails twice is named in the error (exit 1), and a rerun runs only the missing items.
"""

from __future__ import annotations

from pathlib import Path

from ctsynth.classifier.executor import SweepFailed, SweepRun, run_sweep
from ctsynth.classifier.sweep import SweepItem, sweep_items
from ctsynth.config import Params

EXPECTED_ERRORS = (SweepFailed,)


class UnknownItems(ValueError):
    """Item names that are not items of this sweep (`ctsynth train-classifier --item`)."""


def select_items(params: Params, names: list[str] | None) -> list[SweepItem] | None:
    """The sweep's items called `names` (None: every item); UnknownItems names the others."""
    if not names:
        return None
    items = sweep_items(params)
    unknown = sorted(set(names) - {item.name for item in items})
    if unknown:
        raise UnknownItems(f"not items of this sweep: {', '.join(unknown)} (known: {', '.join(i.name for i in items)})")
    return [item for item in items if item.name in names]


def run(params: Params, root: Path, items: list[str] | None = None) -> SweepRun:
    """Every item, or only those named in `items` (the other items' files are left alone)."""
    return run_sweep(params, root, select_items(params, items))
