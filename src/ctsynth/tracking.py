"""MLflow conventions shared by every stage: where the store is, experiment names, run tags,
which data a run read (lineage), and clean-up after killed processes.

Store contract: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db`` with
artifacts under ``<root>/mlartifacts``. MLflow 3.17 refuses the plain file store, and SQLite
takes one writer at a time: parallel writers (``dvc queue start -j 2``) need ``mlflow server``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from ctsynth.paths import git_commit, repo_root, store_root

log = logging.getLogger(__name__)

EXPERIMENT_DATA = "ctsynth-data"
EXPERIMENT_GAN = "ctsynth-gan"
EXPERIMENT_CLASSIFIER = "ctsynth-classifier"
EXPERIMENTS = (EXPERIMENT_DATA, EXPERIMENT_GAN, EXPERIMENT_CLASSIFIER)
REGISTERED_MODEL = "ctsynth-classifier"
CHAMPION_ALIAS = "champion"
# md5 of a generator network file: a tag of each `ctsynth-generator` version, and (prefixed with
# "generator.") of each classifier run that trained on images it made: the lineage link between them
GENERATOR_MD5_TAG = "network_md5"

# The MLflow 3 UI opens an experiment on its GenAI pages (traces, judges) unless the experiment
# carries this tag with the value of the UI's CUSTOM_MODEL_DEVELOPMENT kind: then it opens on
# the runs table. (MLflow 3.17 has no Python constant for it; the value is the UI's enum.)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"

# Which process owns a RUNNING run, so that the next start can tell a live run from one whose
# process was killed (SIGKILL, OOM, power) and therefore never ended it.
PID_TAG = "ctsynth_pid"
PID_START_TAG = "ctsynth_pid_start"  # the process's start time: a reused pid is not the same process
HOST_TAG = "ctsynth_host"
RESUMED_FROM_TAG = "ctsynth_resumed_from"
ENDED_BY_TAG = "ctsynth_ended_by"


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
    """Experiment id for `name`, created if new (artifacts under <root>/mlartifacts), always
    marked as a model-training experiment (an existing one without the mark gets it)."""
    mlflow = configure(root)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        uri = tracking_uri(root)
        location = None if uri.startswith("http") else (artifact_root(root) / name).as_uri()
        try:
            return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except Exception:  # another process created it between our lookup and create
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        log.info("marked MLflow experiment %s as a model-training experiment", name)
    return experiment.experiment_id


def standard_tags(root: Path | None = None) -> dict[str, str]:
    """Tags every run carries: the code version and, under DVC, the experiment and stage."""
    commit = git_commit(root)
    tags = {"git_commit": commit, "mlflow.source.git.commit": commit}
    for env_name, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_STAGE", "dvc_stage")):
        if os.environ.get(env_name):
            tags[tag] = os.environ[env_name]
    return tags


# ---------------------------------------------------------------- runs of killed processes


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22; the command name (field 2) may contain spaces, so count after its closing ')'
    return stat.rsplit(")", 1)[1].split()[19]


def owner_tags() -> dict[str, str]:
    """pid, process start time and host of this process, as run tags."""
    tags = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    start = _process_start(os.getpid())
    if start is not None:
        tags[PID_START_TAG] = start
    return tags


def _owner_alive(tags: dict[str, str]) -> bool:
    try:
        pid = int(tags[PID_TAG])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (KeyError, ValueError, PermissionError):
        return True  # not ours to judge (no pid tag) or alive under another user
    recorded = tags.get(PID_START_TAG)
    return recorded is None or _process_start(pid) in (None, recorded)


def end_dead_runs(root: Path | None = None, experiments: Iterable[str] = EXPERIMENTS) -> list[str]:
    """Mark KILLED every RUNNING run that this host's processes started and whose process is gone.

    Runs from other hosts are left alone: their processes cannot be checked from here. Returns the
    ids of the runs ended.
    """
    from mlflow import MlflowClient

    configure(root)
    client = MlflowClient()
    ids = [e.experiment_id for name in experiments if (e := client.get_experiment_by_name(name)) is not None]
    if not ids:
        return []
    host = socket.gethostname()
    running = client.search_runs(ids, filter_string=f"attributes.status = 'RUNNING' and tags.{HOST_TAG} = '{host}'", max_results=1000)
    ended = []
    for run in running:
        if _owner_alive(run.data.tags):
            continue
        client.set_tag(run.info.run_id, ENDED_BY_TAG, f"process {run.data.tags.get(PID_TAG)} on {host} no longer runs: killed")
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("MLflow run %s (%s) was left RUNNING by a killed process: marked KILLED", run.info.run_id, run.info.run_name)
        ended.append(run.info.run_id)
    return ended


def _run_exists(run_id: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active"


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
    metric history instead of starting a second run at the resume point). When that run is not
    in this store (a checkpoint pulled from elsewhere, a new or cleaned store), a new run is
    started and tagged with the old id instead: a missing record never fails the stage.
    Before starting, runs left RUNNING by killed processes of this host are marked KILLED.
    """
    mlflow = configure(root)
    experiment_id = ensure_experiment(experiment, root)
    try:
        end_dead_runs(root)
    except Exception as exc:  # clean-up is a courtesy: it must never stop the stage
        log.warning("could not check for runs of killed processes: %s", exc)
    all_tags = {**standard_tags(root), **{k: str(v) for k, v in (tags or {}).items()}, **owner_tags()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if resume_run_id and _run_exists(resume_run_id):
        with mlflow.start_run(run_id=resume_run_id) as run:
            mlflow.set_tags(owner_tags())
            log.info("MLflow run %s resumed at %s", resume_run_id, tracking_uri(root))
            yield run
        return
    if resume_run_id:
        log.warning("MLflow run %s is not in %s (checkpoint from another store?): starting a new run linked to it by tag %s",
                    resume_run_id, tracking_uri(root), RESUMED_FROM_TAG)
        all_tags[RESUMED_FROM_TAG] = resume_run_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags) as run:
        log.info("MLflow run %s (%s) in experiment %s at %s", run_name, run.info.run_id, experiment, tracking_uri(root))
        yield run


# ---------------------------------------------------------------- lineage: which data a run read


def _dvc_records(root: Path, wanted: Path) -> list[tuple[Path, dict]]:
    """(path relative to root, DVC's record) of every output DVC knows, most current first: the
    outputs in dvc.lock (written as each stage ends), then the *.dvc files of `wanted`'s folder
    and the folders above it (`dvc add`), then the dependencies in dvc.lock (as of the last run
    of the stage that reads them, which may predate a later `dvc add`)."""
    lock = root / "dvc.lock"
    stages = ((yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.exists() else {})

    def from_lock(kind: str) -> list[tuple[Path, dict]]:
        return [(Path(entry["path"]), entry) for stage in stages.values() for entry in stage.get(kind, []) or []]

    from_dvc_files: list[tuple[Path, dict]] = []
    for folder in (root / wanted).parents:
        if not folder.is_relative_to(root):
            break
        for dvc_file in sorted(f for f in folder.glob("*.dvc") if f.is_file()):
            for entry in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", []) or []:
                from_dvc_files.append(((dvc_file.parent / entry["path"]).relative_to(root), entry))
    return [*from_lock("outs"), *from_dvc_files, *from_lock("deps")]


def _size_and_count(path: Path) -> tuple[int, int]:
    if path.is_file():
        return path.stat().st_size, 1
    total, count = 0, 0
    for folder, _, files in os.walk(path):
        for name in files:
            total += (Path(folder) / name).stat().st_size
            count += 1
    return total, count


def dvc_name(path: str | Path, root: Path) -> str:
    """`path` as DVC names it: relative to the repository (absolute when outside it)."""
    path = Path(path)
    if path.is_absolute():
        with contextlib.suppress(ValueError):
            return path.resolve().relative_to(root).as_posix()
        return path.as_posix()
    return Path(os.path.normpath(path)).as_posix()


def dvc_hash(path: str | Path, root: Path | None = None) -> str | None:
    """DVC's md5 of `path` (a file or ``<md5>.dir`` for a folder) as dvc.lock or a .dvc file
    records it, or None when DVC has no record of it or the files on disk no longer match the
    record's size and file count (the record is then about other data)."""
    root = (root or repo_root()).resolve()
    wanted = Path(dvc_name(path, root))
    if wanted.is_absolute():
        return None  # outside the repository: DVC does not track it
    for recorded, entry in _dvc_records(root, wanted):
        if Path(os.path.normpath(recorded)) != wanted or "md5" not in entry:
            continue
        size, count = _size_and_count(root / wanted)
        if entry.get("size") not in (None, size) or entry.get("nfiles") not in (None, count):
            log.warning("DVC's record of %s (%s) does not match the files on disk (%d bytes, %d files): not used as its digest",
                        wanted, entry["md5"], size, count)
            return None
        return str(entry["md5"])
    return None


# What the store says when two runs insert the same dataset (experiment, name, digest) at once:
# SQLite's and PostgreSQL's unique-constraint messages, as the server passes them on.
_DATASET_RACE = ("UNIQUE constraint failed: datasets", "duplicate key value violates unique constraint")


def _log_inputs_racing_other_runs(datasets: list, contexts: list[str], tags: list[dict], attempts: int = 5) -> None:
    """`mlflow.log_inputs`, retried when another run inserted the same dataset between the store's
    lookup and its insert (two queued experiments preparing the same `data/raw` do). The store
    rolls the failed call back whole, and the retry finds the dataset the other run inserted."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts + 1):
        try:
            mlflow.log_inputs(datasets=datasets, contexts=contexts, tags_list=tags)
            return
        except MlflowException as error:
            if attempt == attempts or not any(text in str(error) for text in _DATASET_RACE):
                raise
            log.info("another run logged the same dataset at the same moment; logging the inputs again (attempt %d)", attempt + 1)
            time.sleep(0.05 * attempt * (1 + random.random()))


def log_lineage(paths: Iterable[str | Path], context: str = "training", root: Path | None = None) -> dict[str, str | None]:
    """Log each DVC-tracked path as an MLflow dataset input of the active run.

    The dataset's name and source are the path as DVC names it (relative to the repository), its
    digest DVC's md5 of it (see `dvc_hash`), so the run's Dataset column says exactly which data
    version it read; a path DVC has no current record of is logged with digest "untracked".
    The git commit is a tag of every run already (`standard_tags`). Call inside `start_run`.
    Returns {path: digest or None}.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.meta_dataset import MetaDataset

    # MLflow's "local" source class (built at import time, so not importable by name)
    local_source = next(cls for cls in get_registered_sources() if cls._get_source_type() == "local")

    root = (root or repo_root()).resolve()
    digests: dict[str, str | None] = {}
    datasets, tags = [], []
    for path in paths:
        name = dvc_name(path, root)
        digest = dvc_hash(name, root)
        digests[name] = digest
        source = local_source(name)  # its uri is the DVC path itself
        datasets.append(MetaDataset(source=source, name=name, digest=digest or "untracked"))
        tags.append({"dvc_path": name})
    _log_inputs_racing_other_runs(datasets, [context] * len(datasets), tags)
    # also as tags, so runs can be searched by data version: tags."dvc_md5.data/prepared" = '<md5>'
    mlflow.set_tags({f"dvc_md5.{name}": digest or "untracked" for name, digest in digests.items() if not Path(name).is_absolute()})
    return digests
