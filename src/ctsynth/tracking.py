"""MLflow conventions shared by every stage: where the store is, experiment names, run tags.

Store contract (DESIGN.md): ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db``
with artifacts under ``<root>/mlartifacts``. MLflow 3.17 refuses the plain file store, and SQLite
takes one writer at a time: parallel writers (``dvc queue start -j 2``) need ``mlflow server``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctsynth.paths import git_commit, store_root

log = logging.getLogger(__name__)

EXPERIMENT_DATA = "ctsynth-data"
EXPERIMENT_GAN = "ctsynth-gan"
EXPERIMENT_CLASSIFIER = "ctsynth-classifier"
REGISTERED_MODEL = "ctsynth-classifier"
CHAMPION_ALIAS = "champion"


def tracking_uri(root: Path | None = None) -> str:
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    return f"sqlite:///{store_root(root) / 'mlflow.db'}"


def artifact_root(root: Path | None = None) -> Path:
    return store_root(root) / "mlartifacts"


def configure(root: Path | None = None):
    """Point the mlflow client at our store; returns the mlflow module."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(root))
    mlflow.set_registry_uri(tracking_uri(root))
    return mlflow


def ensure_experiment(name: str, root: Path | None = None) -> str:
    """Experiment id for `name`, created with artifacts under <root>/mlartifacts if new."""
    mlflow = configure(root)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    uri = tracking_uri(root)
    location = None if uri.startswith("http") else (artifact_root(root) / name).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it between our lookup and create
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def standard_tags(root: Path | None = None) -> dict[str, str]:
    """Tags every run carries: the code version and, under DVC, the experiment and stage."""
    commit = git_commit(root)
    tags = {"git_commit": commit, "mlflow.source.git.commit": commit}
    for env_name, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_STAGE", "dvc_stage")):
        if os.environ.get(env_name):
            tags[tag] = os.environ[env_name]
    return tags


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str,
    tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    root: Path | None = None,
    resume_run_id: str | None = None,
) -> Iterator[Any]:
    """An MLflow run in `experiment` with the standard tags; nested under `parent_run_id` if given.

    `resume_run_id` continues an existing run (a resumed GAN training keeps one run and one
    metric history instead of starting a second run at the resume point).
    """
    mlflow = configure(root)
    experiment_id = ensure_experiment(experiment, root)
    all_tags = {**standard_tags(root), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if resume_run_id:
        with mlflow.start_run(run_id=resume_run_id) as run:
            log.info("MLflow run %s resumed at %s", resume_run_id, tracking_uri(root))
            yield run
        return
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags) as run:
        log.info("MLflow run %s (%s) in experiment %s at %s", run_name, run.info.run_id, experiment, tracking_uri(root))
        yield run
