"""MLflow conventions on a real SQLite store and a real git + DVC repository: experiments open on
the runs table, runs record the DVC hashes of what they read, runs of killed processes are ended,
and a resume whose run is gone starts a new, linked run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ctsynth import tracking

BIN = Path(sys.executable).parent


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite store for the test, through the same variable the stages read."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    tracking.configure()
    return uri


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def test_experiments_are_created_and_upgraded_as_model_training_experiments(store):
    import mlflow

    new_id = tracking.ensure_experiment(tracking.EXPERIMENT_GAN)
    assert _client().get_experiment(new_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment made before this rule (no kind tag) gets it the next time a stage uses it
    old_id = mlflow.create_experiment(tracking.EXPERIMENT_DATA)
    assert tracking.EXPERIMENT_KIND_TAG not in _client().get_experiment(old_id).tags
    assert tracking.ensure_experiment(tracking.EXPERIMENT_DATA) == old_id
    assert _client().get_experiment(old_id).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND


def test_the_kind_value_is_the_one_the_mlflow_ui_reads():
    # The UI bundle's ExperimentKind enum: if MLflow renames it, this test says so.
    import mlflow

    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    needle = f'CUSTOM_MODEL_DEVELOPMENT="{tracking.MODEL_TRAINING_KIND}"'
    assert any(needle in f.read_text(errors="ignore") for f in bundle.glob("*.js")), needle


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t.invalid",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd}: {result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


@pytest.fixture
def dvc_repo(tmp_path):
    """git + DVC repository: data/raw added with `dvc add`, a stage copying it to data/prepared, reproduced."""
    repo = tmp_path / "repo"
    (repo / "data" / "raw" / "train").mkdir(parents=True)
    for i in range(3):
        (repo / "data" / "raw" / "train" / f"{i}.txt").write_text(f"slice {i}\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": {
        "cmd": "cp -r data/raw data/prepared", "deps": ["data/raw"], "outs": ["data/prepared"]}}}))
    _run(["git", "init", "-q"], repo)
    _run([str(BIN / "dvc"), "init", "-q"], repo)
    _run([str(BIN / "dvc"), "add", "-q", "data/raw"], repo)
    _run([str(BIN / "dvc"), "repro", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "data"], repo)
    return repo


def test_lineage_logs_dvc_hashes_as_dataset_inputs_and_the_commit(store, dvc_repo):
    raw_md5 = yaml.safe_load((dvc_repo / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    prepared_md5 = lock["stages"]["prepare"]["outs"][0]["md5"]
    assert raw_md5.endswith(".dir") and prepared_md5 == raw_md5  # same files, same DVC hash
    assert "up to date" in _run([str(BIN / "dvc"), "status"], dvc_repo).stdout  # DVC agrees the records are current

    with tracking.start_run(tracking.EXPERIMENT_DATA, "lineage", root=dvc_repo) as run:
        digests = tracking.log_lineage(["data/raw", dvc_repo / "data" / "prepared"], root=dvc_repo)
    assert digests == {"data/raw": raw_md5, "data/prepared": prepared_md5}
    logged = _client().get_run(run.info.run_id)
    inputs = {d.dataset.name: d for d in logged.inputs.dataset_inputs}
    assert set(inputs) == {"data/raw", "data/prepared"}
    assert inputs["data/raw"].dataset.digest == raw_md5
    assert '"data/raw"' in inputs["data/raw"].dataset.source
    assert {t.key: t.value for t in inputs["data/prepared"].tags}["mlflow.data.context"] == "training"
    head = _run(["git", "rev-parse", "HEAD"], dvc_repo).stdout.strip()
    assert logged.data.tags["mlflow.source.git.commit"] == head == logged.data.tags["git_commit"]
    assert logged.data.tags["dvc_md5.data/raw"] == raw_md5
    # searchable by data version
    found = _client().search_runs([logged.info.experiment_id], filter_string=f"tags.`dvc_md5.data/raw` = '{raw_md5}'")
    assert [r.info.run_id for r in found] == [run.info.run_id]


def test_lineage_never_claims_a_hash_for_data_changed_since_dvc_recorded_it(store, dvc_repo):
    (dvc_repo / "data" / "raw" / "train" / "added.txt").write_text("not yet `dvc add`ed\n")
    with tracking.start_run(tracking.EXPERIMENT_DATA, "lineage", root=dvc_repo) as run:
        digests = tracking.log_lineage(["data/raw", "data/nothing"], root=dvc_repo)
    assert digests == {"data/raw": None, "data/nothing": None}
    logged = _client().get_run(run.info.run_id)
    assert {d.dataset.digest for d in logged.inputs.dataset_inputs} == {"untracked"}


KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    from ctsynth import tracking
    with tracking.start_run(tracking.EXPERIMENT_GAN, "doomed") as run:
        print(run.info.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_runs_of_killed_processes_are_marked_killed_on_the_next_start(store, tmp_path):
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "MLFLOW_TRACKING_URI": store})
    assert child.returncode == -signal.SIGKILL
    dead_id = child.stdout.split()[-1]
    assert _client().get_run(dead_id).info.status == "RUNNING"  # nobody ended it
    # a RUNNING run of a live process (this one) must be left alone
    experiment_id = tracking.ensure_experiment(tracking.EXPERIMENT_GAN)
    live = _client().create_run(experiment_id, run_name="live", tags=tracking.owner_tags())

    with tracking.start_run(tracking.EXPERIMENT_GAN, "next") as run:
        pass
    dead = _client().get_run(dead_id)
    assert dead.info.status == "KILLED" and "no longer runs" in dead.data.tags[tracking.ENDED_BY_TAG]
    assert _client().get_run(live.info.run_id).info.status == "RUNNING"
    assert _client().get_run(run.info.run_id).info.status == "FINISHED"


def test_a_reused_pid_is_not_mistaken_for_the_run_owner(store):
    experiment_id = tracking.ensure_experiment(tracking.EXPERIMENT_GAN)
    # our own pid, but another start time: the process that started the run is gone
    tags = {**tracking.owner_tags(), tracking.PID_START_TAG: "1"}
    stale = _client().create_run(experiment_id, run_name="pid reused", tags=tags)
    assert tracking.end_dead_runs() == [stale.info.run_id]


def test_resume_of_a_missing_run_starts_a_new_linked_run(store):
    with tracking.start_run(tracking.EXPERIMENT_GAN, "first") as first:
        pass
    with tracking.start_run(tracking.EXPERIMENT_GAN, "again", resume_run_id=first.info.run_id) as resumed:
        pass
    assert resumed.info.run_id == first.info.run_id  # present: continued

    gone = "0123456789abcdef0123456789abcdef"  # e.g. a checkpoint pulled from another store
    with tracking.start_run(tracking.EXPERIMENT_GAN, "after-pull", resume_run_id=gone) as run:
        pass
    logged = _client().get_run(run.info.run_id)
    assert run.info.run_id != gone and logged.info.status == "FINISHED"
    assert logged.data.tags[tracking.RESUMED_FROM_TAG] == gone
    # a deleted run counts as missing too
    _client().delete_run(first.info.run_id)
    with tracking.start_run(tracking.EXPERIMENT_GAN, "after-delete", resume_run_id=first.info.run_id) as run:
        pass
    assert run.info.run_id != first.info.run_id


# ---------------------------------------------------------------- DVC's views of our metrics files

DVC_TERMINAL_WIDTH = 200


def dvc_metrics_show(files: dict[str, Path], workdir: Path) -> dict[str, list[str]]:
    """`dvc metrics show <file>` output lines of each file, declared as metrics (repository path ->
    file to copy there) in a fresh git + DVC repository, as a user's terminal shows them."""
    repo = workdir / "dvc-views"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    _run([str(BIN / "dvc"), "init", "-q"], repo)
    for name, source in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(Path(source).read_bytes())
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"metrics": sorted(files)}))
    return {name: _run([str(BIN / "dvc"), "metrics", "show", name], repo).stdout.splitlines() for name in files}


def assert_readable_in_dvc(files: dict[str, Path], workdir: Path) -> None:
    for name, lines in dvc_metrics_show(files, workdir).items():
        assert len(lines) >= 2, (name, lines)  # header + the workspace row
        widest = max(len(line) for line in lines)
        assert widest <= DVC_TERMINAL_WIDTH, f"`dvc metrics show {name}` is {widest} columns wide:\n" + "\n".join(lines)


def test_the_ui_address_make_ui_prints_selects_the_runs_tables():
    # MLflow 3.17's UI picks GenAI or model-training pages from ?workflowType=...; the value we
    # print must be the one its bundle accepts.
    import mlflow

    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    text = "".join(f.read_text(errors="ignore") for f in bundle.glob("main.*.js"))
    assert 'MACHINE_LEARNING="machine_learning"' in text and 'get("workflowType")' in text
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "#/experiments?workflowType=machine_learning" in makefile
