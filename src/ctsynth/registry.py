"""The MLflow Model Registry side of the study: register the chosen classifier, move `champion`.

    register_champion(...)  logs the ONNX model (MLflow `onnx` flavour, with signature and input
                            example), the PyTorch weights and the metrics, registers a new version
                            of `ctsynth-classifier` and points the alias `champion` at it.
    load_champion()         what serving and `ctsynth predict` call: the ONNX bytes of
                            `models:/ctsynth-classifier@champion` with its classes and resolution,
                            as a ChampionModel that makes its onnxruntime session for a device,
                            predicts probabilities, checks an input's shape and builds the answer
                            of /predict and `ctsynth predict` (so serving needs no other module).

The classes and the resolution are read back from the ONNX file's own metadata (written by
ctsynth.export.export_onnx), so the registry and a copied ONNX file can never disagree.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctsynth import tracking
from ctsynth.export import INPUT_NAME, OUTPUT_NAME, check_input_shape, onnx_session, read_onnx_info, softmax
from ctsynth.jsonable import jsonable
from ctsynth.paths import file_md5

log = logging.getLogger(__name__)

ONNX_MODEL_NAME = "onnx_model"  # the logged model's name inside MLflow
ONNX_FILE_NAME = "model.onnx"  # the file MLflow's onnx flavour writes inside the model folder
TORCH_ARTIFACT_DIR = "pytorch"
METRICS_ARTIFACT = "metrics.json"
PARAMS_ARTIFACT = "params.json"


class ChampionNotFoundError(RuntimeError):
    """No model version carries the champion alias (or the registered model does not exist)."""


@dataclass(frozen=True)
class ChampionModel:
    onnx_bytes: bytes
    name: str
    version: str
    classes: list[str]
    resolution: int
    run_id: str | None = None
    source: str = ""  # where it came from: a models:/ URI or a file path

    def session(self, device: str = "cpu", threads: int | None = None, spin: bool = True):
        """An onnxruntime session over this model on `device` (cpu, cuda[:N], auto; see
        ctsynth.export.onnx_session, the one session factory)."""
        return onnx_session(self.onnx_bytes, device=device, threads=threads, spin=spin)

    def check_input(self, images: np.ndarray) -> np.ndarray:
        """Images must be the model input this model was exported for: float32 N x 1 x R x R."""
        return check_input_shape(images, self.resolution)

    def predict(self, images: np.ndarray, session=None) -> np.ndarray:
        """N x C class probabilities for preprocessed images (ctsynth.data.preprocess), run on
        `session` (default: a CPU session of this model)."""
        session = session or self.session()
        images = self.check_input(np.ascontiguousarray(images, dtype=np.float32))
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
        return softmax(logits)

    def answer(self, logits: np.ndarray) -> dict[str, Any]:
        """One image's logits as the answer of `ctsynth predict` and the service's /predict: the
        most probable label, the probability of every class, and which model answered."""
        probabilities = softmax(np.asarray(logits).reshape(-1))
        return {
            "label": self.classes[int(probabilities.argmax())],
            "probabilities": {c: float(p) for c, p in zip(self.classes, probabilities)},
            "model": {"name": self.name, "version": str(self.version)},
        }


def _signature(resolution: int, n_classes: int):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, resolution, resolution), INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes), OUTPUT_NAME)]),
    )


def _flat_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> dotted keys with string values (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_params(value, prefix=f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return flat


def register_champion(
    onnx_path: Path | str,
    torch_state_path: Path | str | None,
    metrics: dict[str, Any],
    params: dict[str, Any],
    input_example: np.ndarray,
    run_id: str | None = None,
    artifacts: dict[str, Path | str] | None = None,
    tags: dict[str, str] | None = None,
    name: str = tracking.REGISTERED_MODEL,
    alias: str = tracking.CHAMPION_ALIAS,
    root: Path | None = None,
    move_alias: bool = True,
    description: str | None = None,
) -> str:
    """Register `onnx_path` as a new version of `name`, point `alias` at it (unless move_alias is
    False: see promote_if_better); return the version. `description` goes on the version.

    Logs into run `run_id` if given, else into the active run, else into a new run
    "register-champion" in the classifier experiment. `input_example` is a small batch of
    preprocessed images (N x 1 x R x R float32) stored with the model and used to check it loads.
    Metrics are logged as `champion.<name>` run metrics; metrics.json, params.json, the weights
    and `artifacts` ({name: file}) go under champion/v<version>/ in the run; `tags` go on the
    model version.
    """
    import onnx
    from mlflow import MlflowClient

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"register_champion: ONNX file {onnx_path} does not exist; export it first")
    info = read_onnx_info(onnx_path)
    input_example = check_input_shape(np.ascontiguousarray(input_example, dtype=np.float32), info.resolution,
                                      "register_champion: input_example")
    # Metrics that are numbers go to MLflow metrics; the whole dict (confusion matrices, CIs) is an artifact.
    numeric_metrics = {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
    }

    mlflow = tracking.configure(root)
    active = mlflow.active_run()
    if run_id is not None and active is not None and active.info.run_id == run_id:
        run_context = _null_context(active)
    elif run_id is not None:
        run_context = mlflow.start_run(run_id=run_id, nested=active is not None)
    elif active is not None:
        run_context = _null_context(active)
    else:
        run_context = tracking.start_run(tracking.EXPERIMENT_CLASSIFIER, "register-champion", root=root)

    # Check inputs before anything is logged, so a bad call leaves no half-registered version.
    if torch_state_path is not None and not Path(torch_state_path).is_file():
        raise FileNotFoundError(f"register_champion: PyTorch weights {torch_state_path} do not exist")
    for artifact_name, artifact_file in (artifacts or {}).items():
        if not Path(artifact_file).is_file():
            raise FileNotFoundError(f"register_champion: artifact {artifact_name!r} = {artifact_file} does not exist")
    flat_params = _flat_params(params or {})

    with run_context as run:
        model_info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name=ONNX_MODEL_NAME,
            registered_model_name=name,
            signature=_signature(info.resolution, len(info.classes)),
            input_example={INPUT_NAME: input_example[:2]},
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,
            metadata={"classes": info.classes, "resolution": info.resolution, "preprocessing": info.preprocessing},
            params=flat_params or None,
        )
        version = str(model_info.registered_model_version)
        # One run can register several champions over time (select re-run after more seeds):
        # run params are immutable, so params go to the logged model and, like metrics, weights
        # and reports, to files under champion/v<version>/ that never collide.
        prefix = f"champion/v{version}"
        if numeric_metrics:
            mlflow.log_metrics({f"champion.{k}": v for k, v in numeric_metrics.items()})
            if model_info.model_id:
                mlflow.log_metrics(numeric_metrics, model_id=model_info.model_id)
        with tempfile.TemporaryDirectory() as tmp:
            for file_name, content in ((METRICS_ARTIFACT, metrics), (PARAMS_ARTIFACT, params or {})):
                path = Path(tmp) / file_name
                path.write_text(json.dumps(jsonable(content, nan_as_null=False), indent=2, sort_keys=True, default=str))
                mlflow.log_artifact(str(path), artifact_path=prefix)
        if torch_state_path is not None:
            mlflow.log_artifact(str(torch_state_path), artifact_path=f"{prefix}/{TORCH_ARTIFACT_DIR}")
        for artifact_name, artifact_file in (artifacts or {}).items():
            mlflow.log_artifact(str(artifact_file), artifact_path=f"{prefix}/{artifact_name}")

        client = MlflowClient()
        client.set_model_version_tag(name, version, "classes", json.dumps(info.classes))
        client.set_model_version_tag(name, version, "resolution", str(info.resolution))
        client.set_model_version_tag(name, version, "run_id", run.info.run_id)
        for key, value in (tags or {}).items():
            client.set_model_version_tag(name, version, key, str(value))
        if description:
            client.update_model_version(name, version, description=description)
        if move_alias:
            client.set_registered_model_alias(name, alias, version)
        log.info(
            "registered %s version %s (run %s)%s in %s",
            name,
            version,
            run.info.run_id,
            f" and pointed alias @{alias} at it" if move_alias else f"; @{alias} stays where it was",
            tracking.tracking_uri(root),
        )
    return version


class _null_context:
    """`with` over an already-active run without ending it on exit."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def __enter__(self) -> Any:
        return self.run

    def __exit__(self, *exc: Any) -> None:
        return None



@dataclass(frozen=True)
class Promotion:
    """Whether a new candidate becomes @champion, why (the version's description), and the numbers
    behind it (version tags)."""

    promote: bool
    reason: str
    tags: dict[str, str]


def _onnx_metric(onnx_bytes_or_path, inputs: np.ndarray, labels: np.ndarray, classes: list[str], metric: str) -> float:
    from ctsynth.classifier.evaluate import classification_metrics

    session = onnx_session(onnx_bytes_or_path)
    logits = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: inputs[i : i + 64]})[0] for i in range(0, len(inputs), 64)])
    return float(classification_metrics(labels, softmax(logits), classes)[metric])


def promote_if_better(
    candidate_onnx: Path | str,
    valid_inputs: np.ndarray,
    valid_labels: np.ndarray,
    classes: list[str],
    metric: str,
    policy: str = "better",
    name: str = tracking.REGISTERED_MODEL,
    alias: str = tracking.CHAMPION_ALIAS,
    root: Path | None = None,
) -> Promotion:
    """Decide whether `candidate_onnx` should take `name@alias`: both models are scored with
    `metric` on the SAME validation images (these inputs), and the candidate must be strictly
    better. policy "always" promotes regardless (the comparison is still recorded). A current
    champion for other classes or another resolution cannot be scored on these images: it is
    kept (policy "better") and the reason says so."""
    import hashlib

    if policy not in ("better", "always"):
        raise ValueError(f"promotion policy must be 'better' or 'always', got {policy!r}")
    digest = hashlib.sha256(np.ascontiguousarray(valid_inputs, dtype=np.float32).tobytes() + np.asarray(valid_labels, np.int64).tobytes()).hexdigest()[:16]
    candidate = _onnx_metric(candidate_onnx, valid_inputs, valid_labels, classes, metric)
    tags = {"promotion_policy": policy, "promotion_metric": f"valid_{metric}", "candidate_valid_metric": f"{candidate:.6f}",
            "valid_data_sha256": digest}
    try:
        current = champion_version(name, alias, root)
    except ChampionNotFoundError:
        return Promotion(True, f"first champion: no @{alias} before (valid {metric} {candidate:.4f} on {len(valid_labels)} images, data {digest})", tags)
    current_model = load_champion(name, alias, root)
    tags["previous_champion_version"] = str(current.version)
    if list(current_model.classes) != list(classes) or current_model.resolution != valid_inputs.shape[-1]:
        reason = (f"@{alias} v{current.version} is for classes {current_model.classes} at {current_model.resolution} px, so it cannot be "
                  f"scored on these validation images")
        if policy == "always":
            return Promotion(True, f"promoted (select.promote: always): {reason}", tags)
        return Promotion(False, f"not promoted: {reason}; set select.promote: always to replace it", tags)
    incumbent = _onnx_metric(current_model.onnx_bytes, valid_inputs, valid_labels, classes, metric)
    tags["champion_valid_metric"] = f"{incumbent:.6f}"
    comparison = f"valid {metric} {candidate:.4f} vs @{alias} v{current.version} {incumbent:.4f} on the same {len(valid_labels)} images (data {digest})"
    if candidate > incumbent:
        return Promotion(True, f"promoted: better, {comparison}", tags)
    if policy == "always":
        return Promotion(True, f"promoted (select.promote: always) although not better: {comparison}", tags)
    return Promotion(False, f"not promoted: not better, {comparison}", tags)


def champion_version(
    name: str = tracking.REGISTERED_MODEL,
    alias: str = tracking.CHAMPION_ALIAS,
    root: Path | None = None,
):
    """The ModelVersion that `name@alias` points at (cheap: no download). ChampionNotFoundError if none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.configure(root)
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise ChampionNotFoundError(
            f"no champion model: registered model '{name}' has no version with alias '@{alias}' in the "
            f"MLflow store {tracking.tracking_uri(root)} ({exc.error_code}). Run `dvc repro select` (or "
            f"`make demo`) first to train, select and register one, point MLFLOW_TRACKING_URI at the store "
            f"that holds it, or set CTSYNTH_ONNX_MODEL to an ONNX file exported by ctsynth.export."
        ) from exc


def load_champion(
    name: str = tracking.REGISTERED_MODEL,
    alias: str = tracking.CHAMPION_ALIAS,
    root: Path | None = None,
) -> ChampionModel:
    """The ONNX model that `name@alias` points at, with its classes and resolution.

    Raises ChampionNotFoundError (with what to run) when the store has no such alias.
    """
    import mlflow

    version = champion_version(name, alias, root)
    model_uri = f"models:/{name}/{version.version}"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        onnx_files = sorted(local.rglob("*.onnx"))
        if not onnx_files:
            raise ChampionNotFoundError(f"{model_uri} (@{alias}) holds no .onnx file under {version.source}")
        onnx_bytes = onnx_files[0].read_bytes()
    info = read_onnx_info(onnx_bytes)
    log.info("loaded %s@%s = version %s (%d bytes, classes %s, %d px)", name, alias, version.version, len(onnx_bytes), info.classes, info.resolution)
    return ChampionModel(
        onnx_bytes=onnx_bytes,
        name=name,
        version=str(version.version),
        classes=info.classes,
        resolution=info.resolution,
        run_id=version.run_id,
        source=f"models:/{name}@{alias}",
    )


def load_onnx_file(path: Path | str) -> ChampionModel:
    """An exported ONNX file as a ChampionModel (for bundles built elsewhere: CTSYNTH_ONNX_MODEL)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model file {path} does not exist")
    onnx_bytes = path.read_bytes()
    info = read_onnx_info(onnx_bytes)
    return ChampionModel(
        onnx_bytes=onnx_bytes,
        name=path.stem,
        version="file",
        classes=info.classes,
        resolution=info.resolution,
        source=str(path.resolve()),
    )


# ---------------------------------------------------------------------------
# The generator: `ctsynth-generator@latest`
# ---------------------------------------------------------------------------

GENERATOR_MODEL = "ctsynth-generator"
GENERATOR_ALIAS = "latest"  # MLflow's built-in alias for the highest version (it cannot be set by hand)
GENERATOR_ARTIFACT_DIR = "generator"
GENERATOR_QUALITY = "quality.json"


def register_generator(network: Path, grid: Path | None, quality: dict[str, Any], run_id: str) -> str:
    """Register a trained generator as a new version of `ctsynth-generator`; being the highest
    version, `models:/ctsynth-generator@latest` resolves to it.

    The version's files (artifact folder `generator/` of the training run `run_id`): the network
    file (a plain dict of tensors, numbers and strings: `torch.load(weights_only=True)` reads it
    without running pickled code), the sample grid and quality.json (KID against its real floor
    at the last snapshot). The numbers are also the version's tags. Returns the version number.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.configure()
    client = MlflowClient()
    numbers = {k: float(v) for k, v in quality.items() if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)}
    with tempfile.TemporaryDirectory() as tmp:
        quality_path = Path(tmp) / GENERATOR_QUALITY
        quality_path.write_text(json.dumps(numbers | {"snapshot": str(quality.get("snapshot", ""))}, indent=2))
        for path in (network, grid, quality_path):
            if path is not None:
                client.log_artifact(run_id, str(path), GENERATOR_ARTIFACT_DIR)
    for key, value in numbers.items():
        client.log_metric(run_id, f"generator_{key}", value)
    try:
        client.create_registered_model(GENERATOR_MODEL, description="StyleGAN2-ADA generators trained by train_gan")
    except MlflowException:  # already registered
        pass
    source = f"{client.get_run(run_id).info.artifact_uri}/{GENERATOR_ARTIFACT_DIR}"
    description = (
        f"KID {numbers['kid']:.4g} (real floor {numbers.get('kid_floor', float('nan')):.4g}) in the pixel-PCA feature space"
        if "kid" in numbers else "no snapshot KID recorded"
    )
    version = client.create_model_version(
        GENERATOR_MODEL, source=source, run_id=run_id, description=description,
        tags={"network_file": Path(network).name, tracking.GENERATOR_MD5_TAG: file_md5(network)} | {k: f"{v:.6g}" for k, v in numbers.items()},
    )
    log.info("registered %s version %s (models:/%s@%s): %s", GENERATOR_MODEL, version.version, GENERATOR_MODEL,
             GENERATOR_ALIAS, description)
    return str(version.version)


def download_generator(uri: str, dst: Path) -> Path:
    """`models:/ctsynth-generator@latest` (or any version URI) -> the network file, downloaded to `dst`."""
    import mlflow

    tracking.configure()
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:  # MLflow raises several types for an unknown name / alias
        raise FileNotFoundError(f"cannot fetch {uri} from the MLflow registry at {tracking.tracking_uri()}: {exc}") from exc
    networks = sorted(folder.glob("*.pt"))
    if len(networks) != 1:
        raise FileNotFoundError(f"{uri} holds {len(networks)} network files, expected one")
    return networks[0]


def lineage(name: str = tracking.REGISTERED_MODEL, alias: str = tracking.CHAMPION_ALIAS, root: Path | None = None) -> dict[str, Any]:
    """Walk back from `name@alias` to what made it: the version and `run_lineage` of the sweep
    item's run that trained it."""
    version = champion_version(name, alias, root)
    source_run_id = version.tags.get("source_run_id") or version.run_id
    return {"model": {"name": name, "version": str(version.version), "alias": alias}} | run_lineage(source_run_id)


def run_lineage(run_id: str) -> dict[str, Any]:
    """What a run trained on: the data versions it read (MLflow dataset inputs: DVC path and DVC
    hash), its git commit, and, where it read synthetic images, their generator: the network
    file's md5 and the `ctsynth-generator` version with that md5 (version None when that network
    is a snapshot that was never registered), with the data and commit of its training run."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)

    def datasets(run) -> list[dict[str, str]]:
        return [{"path": d.dataset.name, "digest": d.dataset.digest} for d in (run.inputs.dataset_inputs or [])]

    result: dict[str, Any] = {
        "run": {"id": run_id, "name": run.info.run_name, "git_commit": run.data.tags.get("git_commit")},
        "data": datasets(run),
        "generators": [],
    }
    for md5 in filter(None, run.data.tags.get(f"generator.{tracking.GENERATOR_MD5_TAG}", "").split(",")):
        found = client.search_model_versions(f"name = '{GENERATOR_MODEL}' and tags.{tracking.GENERATOR_MD5_TAG} = '{md5}'")
        entry: dict[str, Any] = {"network_md5": md5, "version": None}
        if found:
            generator = found[0]
            gan_run = client.get_run(generator.run_id)
            entry |= {"version": str(generator.version), "run_id": generator.run_id, "data": datasets(gan_run),
                      "git_commit": gan_run.data.tags.get("git_commit")}
        result["generators"].append(entry)
    return result
