"""One module per DVC stage: `run(params, root)` owns everything the stage does, MLflow runs included.

    stage               dvc.yaml cmd                       module                          ctsynth command
    prepare             pipelines/prepare.py               ctsynth.stages.prepare          prepare
    validate            pipelines/validate.py              ctsynth.stages.validate         validate
    train_gan           pipelines/train_gan.py             ctsynth.stages.train_gan        train-gan
    generate            pipelines/generate.py              ctsynth.stages.generate         generate
    validate_synthetic  pipelines/validate_synthetic.py    ctsynth.stages.validate_synthetic  validate-synthetic
    oracle              pipelines/oracle.py                ctsynth.stages.oracle           oracle
    train_classifier    pipelines/train_classifier.py      ctsynth.stages.train_classifier train-classifier
    select              pipelines/select_champion.py       ctsynth.stages.select_champion  select
    report              pipelines/report.py                ctsynth.stages.report           report

The script DVC runs and the `ctsynth` command of a stage both end in `execute(stage, params, root)`:
the script with params.yaml (or `--params`) as written, the command after applying its options to
the params object. There is no second code path that could drift, so a command and its stage write
the same files and the same MLflow runs. The domain packages (data, gan, metrics, classifier,
validation) compute; only these modules decide which paths are read and written and what is logged.

A stage module holds `run(params, root) -> result`, and where it has them `exit_code(result)` (the
stage's exit status for that result; default 0) and `EXPECTED_ERRORS` (exceptions that mean "the
stage failed for a reason a person can act on": logged as one ERROR line, exit status 1, no
traceback).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import ModuleType

from ctsynth.config import Params, load_params
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root

log = logging.getLogger(__name__)


def execute(stage: ModuleType, params: Params, root: Path, **options) -> int:
    """Run `stage.run(params, root, **options)` and return the stage's exit status for what happened.
    `options` are a command's run-only settings (e.g. train-gan's --device), never params."""
    try:
        result = stage.run(params, root, **options)
    except getattr(stage, "EXPECTED_ERRORS", ()) as exc:
        log.error("%s", exc)
        return 1
    exit_code = getattr(stage, "exit_code", None)
    return int(exit_code(result)) if exit_code is not None else 0


def main(stage: ModuleType, argv: list[str] | None = None) -> int:
    """What every pipelines/<stage>.py does: read `--params` (default: the repository's
    params.yaml), set up logging, and execute the stage in the repository it runs in."""
    parser = argparse.ArgumentParser(description=(stage.__doc__ or stage.__name__).splitlines()[0])
    parser.add_argument("--params", default=None, help="params file to read (default: the repository's params.yaml)")
    args = parser.parse_args(argv)
    setup_logging()
    return execute(stage, load_params(args.params), repo_root())
