"""Run every item of the sweep: reuse what is cached, run the rest on a back end, retry once.

    run_sweep(params, root)            # what the train_classifier stage (ctsynth.stages.train_classifier) runs

1. The sweep id (params + data), the parent MLflow run and each item's cache key are computed once.
   An item whose metrics file carries its current cache key (and whose weights are there) is
   reused; files of items no longer in the sweep are removed (the stage wrote them).
2. The remaining items run on `sweep.executor`:
   - local: a pool of worker processes (`sweep.workers`, default usable cores // threads_per_item),
     each importing torch and MLflow once and running many items with `threads_per_item` torch
     threads, so the cores are used once and start-up is paid per worker, not per item;
   - ray: each item is a Ray task on the cluster at $RAY_ADDRESS with `sweep.ray` resources; the
     task gets the data through Ray's object store, logs to $MLFLOW_TRACKING_URI (a server every
     node reaches), and sends its metrics and weights files back to this workspace.
3. An item that raises, or whose worker dies, runs again (`sweep.retries`, default once); an item
   that still fails is reported by name in SweepFailed after every other item has finished. Its
   files are not written, so the next run runs exactly the missing items.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from tqdm import tqdm

from ctsynth import tracking
from ctsynth.classifier.sweep import (
    ITEM_TAG,
    SweepItem,
    cached_result,
    find_or_create_parent_run,
    item_cache_key,
    item_paths,
    run_sweep_item,
    sweep_data_fingerprint,
    sweep_id,
    sweep_items,
    training_code_fingerprint,
)
from ctsynth.config import Params

log = logging.getLogger(__name__)


class SweepFailed(RuntimeError):
    """Items that failed after their retries; every other item finished and kept its files."""

    def __init__(self, failures: dict[str, str]):
        self.failures = failures
        details = "\n".join(f"--- {name}\n{error.strip()}" for name, error in failures.items())
        super().__init__(f"{len(failures)} sweep item(s) failed after retries: {', '.join(failures)}\n{details}")


@dataclass(frozen=True)
class ItemTask:
    """What a worker needs to run one item (picklable: crosses process and machine boundaries)."""

    params: Params
    item: SweepItem
    root: str
    parent_run_id: str
    sweep: str
    cache_key: str


@dataclass
class SweepRun:
    """What run_sweep did: items reused from the cache, items run now, attempts per item (local executor;
    Ray retries inside the cluster and does not report them)."""

    sweep: str
    parent_run_id: str
    reused: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)


def run_sweep(
    params: Params,
    root: Path,
    items: list[SweepItem] | None = None,
    progress: bool = True,
    on_start: Callable[[SweepItem, int], None] | None = None,
) -> SweepRun:
    """Run `items` (default: every item of params.sweep) through params.sweep.executor.

    on_start(item, pid) is called when a local worker starts an item (progress display, tests)."""
    items = items if items is not None else sweep_items(params)
    sweep = sweep_id(params, sweep_data_fingerprint(params, root))
    parent_run_id = find_or_create_parent_run(sweep, params, root)
    code = training_code_fingerprint()
    tasks = [ItemTask(params, item, str(root), parent_run_id, sweep, item_cache_key(sweep, code, item, params)) for item in items]
    outcome = SweepRun(sweep, parent_run_id)
    outcome.reused = [t.item.name for t in tasks if cached_result(params, root, t.item, t.cache_key) is not None]
    if items == sweep_items(params):  # a partial run (--item) leaves the other items' files alone
        remove_stale_items(params, root, items)
    todo = [t for t in tasks if t.item.name not in outcome.reused]
    log.info("sweep %s: %d items, %d reused from earlier runs, %d to run on the %s executor",
             sweep, len(tasks), len(outcome.reused), len(todo), params.sweep.executor)
    if not todo:
        return outcome
    if params.sweep.executor == "ray":
        failures = run_on_ray(todo, params, root, outcome, progress)
    else:
        failures = run_locally(todo, params, outcome, progress, on_start)
    outcome.ran = [t.item.name for t in todo if t.item.name not in failures]
    if failures:
        raise SweepFailed(failures)
    return outcome


def remove_stale_items(params: Params, root: Path, items: list[SweepItem]) -> list[str]:
    """Delete the result files of items that are no longer in the sweep (a seed or an arm was
    dropped), so that `select` reads only this sweep. Only files this stage wrote are touched: a
    details file carrying a cache key, and the weights and flat metrics files of the same name."""
    current = {item.name for item in items}
    metrics_dir = Path(item_paths(params, root, items[0])[0]).parent
    removed = []
    for path in sorted(metrics_dir.glob("*.json")) if metrics_dir.is_dir() else []:
        if path.stem in current:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not (isinstance(record, dict) and "cache_key" in record and record.get("name") == path.stem):
            continue
        _, weights, flat_metrics = item_paths(params, root, SweepItem(record["arm"], record["ratio"], record["seed"]))
        flat_metrics.unlink(missing_ok=True)
        path.unlink()
        weights.unlink(missing_ok=True)
        removed.append(path.stem)
    if removed:
        log.info("removed the results of %d items no longer in the sweep: %s", len(removed), ", ".join(removed))
    return removed


# ---------------------------------------------------------------------------------------------
# local: a pool of long-lived worker processes
# ---------------------------------------------------------------------------------------------


def local_pool_size(params: Params, n_items: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = params.sweep.workers or max(1, cores // params.sweep.threads_per_item)
    return max(1, min(workers, n_items))


def _worker_main(connection, threads: int) -> None:
    """A worker process: import torch + MLflow once, then run the items it is sent until told to stop."""
    import torch

    from ctsynth.logs import setup_logging

    setup_logging()
    torch.set_num_threads(threads)
    import mlflow  # noqa: F401  (imported once here instead of once per item)

    while True:
        task = connection.recv()
        if task is None:
            return
        connection.send(("started", task.item.name, os.getpid()))
        try:
            run_sweep_item(task.params, task.item, Path(task.root), progress=False,
                           parent_run_id=task.parent_run_id, sweep=task.sweep, cache_key=task.cache_key)
            connection.send(("done", task.item.name, None))
        except Exception:  # reported to the driver, which retries or gives up on this item
            connection.send(("failed", task.item.name, traceback.format_exc()))


@dataclass
class _Worker:
    process: multiprocessing.Process
    connection: object
    task: ItemTask | None = None


def run_locally(tasks: list[ItemTask], params: Params, outcome: SweepRun, progress: bool,
                on_start: Callable[[SweepItem, int], None] | None = None) -> dict[str, str]:
    """Run `tasks` on a pool of worker processes; returns {item name: last error} of the failed ones."""
    # spawn: a fresh interpreter per worker (fork after torch's thread pools exist is unsafe)
    context = multiprocessing.get_context("spawn")
    threads = params.sweep.threads_per_item
    size = local_pool_size(params, len(tasks))
    log.info("local executor: %d worker processes x %d torch threads", size, threads)
    queue = deque(tasks)
    failures: dict[str, str] = {}
    workers: list[_Worker] = []

    def start_worker() -> _Worker:
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_worker_main, args=(child_end, threads), daemon=True, name="ctsynth-sweep-worker")
        process.start()
        child_end.close()
        return _Worker(process, parent_end)

    def attempt_failed(task: ItemTask, error: str) -> None:
        name = task.item.name
        if outcome.attempts[name] <= params.sweep.retries:
            log.warning("sweep item %s failed (attempt %d), running it again:\n%s", name, outcome.attempts[name], error.strip())
            queue.appendleft(task)
        else:
            log.error("sweep item %s failed after %d attempts", name, outcome.attempts[name])
            failures[name] = error
            bar.update(1)

    bar = tqdm(total=len(tasks), desc="sweep items", unit="item", disable=not progress)
    try:
        workers = [start_worker() for _ in range(size)]
        while queue or any(w.task for w in workers):
            for index, worker in enumerate(workers):
                if worker.task is None and queue:
                    if not worker.process.is_alive():  # died between items (e.g. killed from outside)
                        worker.connection.close()
                        worker = workers[index] = start_worker()
                    worker.task = queue.popleft()
                    outcome.attempts[worker.task.item.name] = outcome.attempts.get(worker.task.item.name, 0) + 1
                    try:
                        worker.connection.send(worker.task)
                    except OSError:  # it died just now: the sentinel below reports it, the item is retried
                        pass
            ready = wait([w.connection for w in workers if w.task] + [w.process.sentinel for w in workers if w.task])
            for index, worker in enumerate(workers):
                if worker.task is None:
                    continue
                if worker.connection in ready or worker.connection.poll():
                    try:
                        kind, name, detail = worker.connection.recv()
                    except (EOFError, OSError):
                        kind = None  # the worker died while sending: handled as a death below
                    else:
                        if kind == "started":
                            if on_start:
                                on_start(worker.task.item, detail)
                            continue
                        task, worker.task = worker.task, None
                        if kind == "done":
                            bar.update(1)
                        else:
                            attempt_failed(task, detail)
                        continue
                if worker.process.sentinel in ready or not worker.process.is_alive():
                    worker.process.join(timeout=5)
                    task = worker.task
                    error = f"worker process {worker.process.pid} died (exit code {worker.process.exitcode}) while running {task.item.name}"
                    mark_run_failed(task)
                    worker.connection.close()
                    workers[index] = start_worker()
                    attempt_failed(task, error)
    finally:
        bar.close()
        for worker in workers:
            try:
                worker.connection.send(None)
            except (OSError, ValueError):
                pass
        for worker in workers:
            worker.process.join(timeout=30)
            if worker.process.is_alive():
                worker.process.kill()
    return failures


def mark_run_failed(task: ItemTask, keep_run_id: str | None = None) -> None:
    """A killed worker leaves its item's MLflow run RUNNING forever: mark it FAILED (all of the
    item's RUNNING runs under the parent, except `keep_run_id`, the attempt that finished)."""
    try:
        from mlflow import MlflowClient

        tracking.configure(Path(task.root))
        client = MlflowClient()
        experiment_id = tracking.ensure_experiment(tracking.EXPERIMENT_CLASSIFIER, Path(task.root))
        query = (f"tags.mlflow.parentRunId = '{task.parent_run_id}' and tags.{ITEM_TAG} = '{task.item.name}' "
                 "and attributes.status = 'RUNNING'")
        for run in client.search_runs([experiment_id], filter_string=query):
            if run.info.run_id != keep_run_id:
                client.set_terminated(run.info.run_id, status="FAILED")
    except Exception as exc:  # bookkeeping only: the retry matters more than the stale run's status
        log.warning("could not mark the MLflow run of %s as failed: %s", task.item.name, exc)


# ---------------------------------------------------------------------------------------------
# ray: one task per item on a cluster
# ---------------------------------------------------------------------------------------------


def _pack_folder(folder: Path, root: Path) -> dict[str, bytes]:
    """{path relative to root: bytes} of every file under `folder` (the data an item reads)."""
    if not folder.is_dir():
        return {}
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _ray_item(task: ItemTask, data: dict[str, bytes]) -> dict[str, bytes]:
    """A Ray task: write the data into a fresh folder, run the item there, return its two files."""
    import shutil

    import torch

    from ctsynth.logs import setup_logging

    setup_logging()
    # as many torch threads as CPUs Ray reserved for the task, so tasks sharing a node do not oversubscribe it
    torch.set_num_threads(max(1, int(task.params.sweep.ray.num_cpus)))
    folder = Path(tempfile.mkdtemp(prefix=f"ctsynth-{task.item.name}-"))
    try:
        for relative, content in data.items():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(content)
        outputs = run_sweep_item(task.params, task.item, folder, progress=False,
                                 parent_run_id=task.parent_run_id, sweep=task.sweep, cache_key=task.cache_key)
        # weights first, flat metrics last: the driver writes them in this order, as run_sweep_item does
        files = (outputs.state_dict_path, outputs.details_path, outputs.metrics_path)
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_on_ray(tasks: list[ItemTask], params: Params, root: Path, outcome: SweepRun, progress: bool) -> dict[str, str]:
    """Run `tasks` as Ray tasks on $RAY_ADDRESS; write their files into `root`; {name: error} of the failed."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("sweep.executor is ray but ray is not installed: pip install -e '.[ray]'") from exc
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        raise RuntimeError("sweep.executor is ray: set RAY_ADDRESS to the cluster (e.g. ray://head:10001 or head:6379)")
    uri = tracking.tracking_uri(root)
    if not uri.startswith(("http://", "https://")):
        raise RuntimeError(f"sweep.executor is ray: MLFLOW_TRACKING_URI must be an MLflow server every node reaches (http://...), not {uri}")
    for path in (params.data.prepared, params.sweep.synthetic, params.sweep.oracle, params.sweep.metrics_dir, params.sweep.runs_dir):
        if Path(path).is_absolute():
            raise RuntimeError(f"sweep.executor is ray: {path} must be relative to the repository (it is recreated on each node)")

    import ctsynth

    # The tasks run this checkout's ctsynth (uploaded once per cluster), not whatever a node has installed.
    runtime_env = {"py_modules": [ctsynth], "env_vars": {"MLFLOW_TRACKING_URI": uri, "DVC_STAGE": os.environ.get("DVC_STAGE", "train_classifier")}}
    ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    try:
        data = {**_pack_folder(root / params.data.prepared, root), **_pack_folder(root / params.sweep.synthetic, root),
                **_pack_folder(root / params.sweep.oracle, root)}
        data_ref = ray.put(data)  # once into the object store, not once per task
        remote = ray.remote(_ray_item).options(
            num_cpus=params.sweep.ray.num_cpus, num_gpus=params.sweep.ray.num_gpus,
            max_retries=params.sweep.retries, retry_exceptions=True, name="ctsynth_sweep_item",
        )
        log.info("ray executor: %d tasks on %s (%s CPU, %s GPU each)", len(tasks), address, params.sweep.ray.num_cpus, params.sweep.ray.num_gpus)
        pending = {remote.remote(task, data_ref): task for task in tasks}
        failures: dict[str, str] = {}
        bar = tqdm(total=len(tasks), desc="sweep items (ray)", unit="item", disable=not progress)
        started = time.perf_counter()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(done[0])
            try:
                files = ray.get(done[0])
            except Exception as exc:  # after Ray's own retries (worker death and exceptions)
                failures[task.item.name] = f"{type(exc).__name__}: {exc}"
                log.error("sweep item %s failed after %d attempts", task.item.name, params.sweep.retries + 1)
            else:
                for relative, content in files.items():
                    target = root / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    temporary = target.with_name(f".{target.name}.tmp")
                    temporary.write_bytes(content)
                    os.replace(temporary, target)
                record = json.loads(files[item_paths(params, Path("."), task.item)[0].as_posix()])
                # Ray retried a task whose worker died without telling us: close that attempt's run
                mark_run_failed(task, keep_run_id=record["mlflow"]["run_id"])
            bar.update(1)
        bar.close()
        log.info("ray executor: %d items in %.1f s", len(tasks), time.perf_counter() - started)
        return failures
    finally:
        ray.shutdown()
