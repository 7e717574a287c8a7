"""The local sweep executor: same results as running the items one after another, a per-item cache,
one retry for an item that fails or whose worker is killed, and a report by name of what still fails."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from _classifier_data import write_prepared, write_synthetic

from ctsynth.classifier.executor import SweepFailed, run_sweep
from ctsynth.classifier.sweep import SweepItem, item_paths, run_sweep_item, sweep_items
from ctsynth.config import Params

TINY = {
    "data": {"resolution": 16},
    "classifier": {"resolution": 16, "epochs": 3, "patience": 2, "batch_size": 8, "inference_precision": "fp32"},
    "sweep": {"arms": ["synthetic"], "ratios": [0.0, 0.5], "seeds": [0, 1], "workers": 2, "threads_per_item": 1},
}


def tiny_params(root, **sweep) -> Params:
    values = json.loads(json.dumps(TINY))
    values["classifier"]["feature_cache"] = str(root / "cache")
    values["sweep"].update(sweep)
    return Params.model_validate(values)


def make_workspace(root, per_class_synthetic: int = 8):
    write_prepared(root, {"train": (12, 12), "valid": (4, 4), "test": (5, 5)}, size=16)
    write_synthetic(root, per_class=per_class_synthetic, size=16)
    return root


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    # Worker processes inherit the environment: every item of a test logs into this store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def comparable(record: dict) -> dict:
    """A metrics record without what legitimately differs between two runs (time, run ids, paths)."""
    history = [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in record["history"]]
    return {"valid": record["valid"], "test": record["test"], "best_epoch": record["best_epoch"], "history": history,
            "train_counts": record["train_counts"], "cache_key": record["cache_key"]}


def test_local_executor_matches_sequential_items_bit_for_bit(tmp_path, mlflow_store):
    sequential_root = make_workspace(tmp_path / "sequential")
    pool_root = make_workspace(tmp_path / "pool")
    params = tiny_params(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker: same thread count, same float summation order
    try:
        for item in sweep_items(params):
            run_sweep_item(params, item, sequential_root, progress=False)
    finally:
        torch.set_num_threads(threads)

    outcome = run_sweep(params, pool_root, progress=False)

    assert sorted(outcome.ran) == sorted(item.name for item in sweep_items(params)) and not outcome.reused
    for item in sweep_items(params):
        (expected_metrics, expected_weights, _), (metrics, weights, _) = item_paths(params, sequential_root, item), item_paths(params, pool_root, item)
        assert comparable(json.loads(metrics.read_text())) == comparable(json.loads(expected_metrics.read_text())), item.name
        expected_state, state = torch.load(expected_weights), torch.load(weights)
        assert all(torch.equal(expected_state[key], state[key]) for key in expected_state), item.name

    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(outcome.parent_run_id).info.experiment_id
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    # one parent for both workspaces (same params, same data): each item twice, once per workspace
    assert sorted(run.info.run_name for run in children) == sorted(2 * [item.name for item in sweep_items(params)])
    assert {run.info.status for run in children} == {"FINISHED"}


def test_unchanged_items_are_reused_and_a_changed_seed_runs_only_its_items(tmp_path, mlflow_store):
    root = make_workspace(tmp_path / "workspace")
    params = tiny_params(tmp_path)
    first = run_sweep(params, root, progress=False)
    assert len(first.ran) == 4
    stamps = {item.name: item_paths(params, root, item)[0].stat().st_mtime_ns for item in sweep_items(params)}

    again = run_sweep(params, root, progress=False)
    assert sorted(again.reused) == sorted(stamps) and again.ran == []
    assert {name: item_paths(params, root, SweepItem(*_parse(name)))[0].stat().st_mtime_ns for name in stamps} == stamps

    changed = tiny_params(tmp_path, seeds=[0, 2])
    third = run_sweep(changed, root, progress=False)
    assert sorted(third.ran) == ["real_r0.0_s2", "synthetic_r0.5_s2"]
    assert sorted(third.reused) == ["real_r0.0_s0", "synthetic_r0.5_s0"]
    # seed 1 left the sweep: its files are gone, so `select` reads exactly this sweep
    names = sorted(p.stem for p in (root / "metrics/sweep").glob("*.json"))
    assert names == ["real_r0.0_s0", "real_r0.0_s2", "synthetic_r0.5_s0", "synthetic_r0.5_s2"]
    assert sorted(p.stem for p in (root / "models/classifier/runs").glob("*.pt")) == names

    # a different classifier setting is a different sweep: nothing is reused
    retrained = Params.model_validate({**changed.model_dump(by_alias=True), "classifier": {**changed.classifier.model_dump(), "learning_rate": 0.001}})
    assert len(run_sweep(retrained, root, progress=False).ran) == 4


def _parse(name: str) -> tuple[str, float, int]:
    arm, rest = name.rsplit("_r", 1)
    ratio, seed = rest.split("_s")
    return arm, float(ratio), int(seed)


def test_a_failing_item_is_retried_once_then_named_and_the_others_are_kept(tmp_path, mlflow_store):
    # ratio 1.0 needs 12 synthetic images per class; the pool has 8: a real error in the item's mixing
    root = make_workspace(tmp_path / "workspace", per_class_synthetic=8)
    params = tiny_params(tmp_path, ratios=[0.0, 0.5, 1.0], seeds=[0])
    with pytest.raises(SweepFailed) as raised:
        run_sweep(params, root, progress=False)
    assert list(raised.value.failures) == ["synthetic_r1.0_s0"]
    assert "needs 12 synthetic 'normal' images" in raised.value.failures["synthetic_r1.0_s0"]
    assert "synthetic_r1.0_s0" in str(raised.value)
    for name in ("real_r0.0_s0", "synthetic_r0.5_s0"):
        assert (root / f"metrics/sweep/{name}.json").is_file() and (root / f"models/classifier/runs/{name}.pt").is_file()
    assert not (root / "metrics/sweep/synthetic_r1.0_s0.json").exists()

    # the rerun tries only the missing item (twice: once + one retry), the finished ones are reused
    from ctsynth.classifier import executor

    attempts = {}
    with pytest.raises(SweepFailed):
        run_sweep(params, root, progress=False, on_start=lambda item, pid: attempts.setdefault(item.name, []).append(pid))
    assert list(attempts) == ["synthetic_r1.0_s0"] and len(attempts["synthetic_r1.0_s0"]) == 2
    assert executor.local_pool_size(params, 1) == 1


def test_a_worker_killed_mid_item_is_replaced_and_the_item_retried(tmp_path, mlflow_store):
    root = make_workspace(tmp_path / "workspace")
    params = tiny_params(tmp_path)
    victim = "synthetic_r0.5_s1"
    started: dict[str, list[int]] = {}

    def kill_first_attempt(item: SweepItem, pid: int) -> None:
        started.setdefault(item.name, []).append(pid)
        if item.name == victim and len(started[victim]) == 1:
            os.kill(pid, signal.SIGKILL)  # the worker process dies while it runs the item

    outcome = run_sweep(params, root, progress=False, on_start=kill_first_attempt)

    assert outcome.attempts[victim] == 2 and len(set(started[victim])) == 2  # a new worker ran the retry
    assert all(count == 1 for name, count in outcome.attempts.items() if name != victim)
    for item in sweep_items(params):
        details, weights, metrics = item_paths(params, root, item)
        assert details.is_file() and weights.is_file() and metrics.is_file(), item.name
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(outcome.parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.item = '{victim}'")
    # the retry finished; the killed attempt, if it got as far as opening its run, is marked FAILED
    assert sorted(run.info.status for run in runs) in (["FINISHED"], ["FAILED", "FINISHED"])


def test_cli_names_unknown_items_without_running_anything(caplog):
    from ctsynth.cli import main

    assert main(["sweep", "--item", "synthetic_r0.5_s0", "synthetic_r9.0_s0"]) == 2
    assert "not items of this sweep: synthetic_r9.0_s0" in caplog.text
