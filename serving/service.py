"""BentoML service: the champion classifier behind `POST /predict`.

Two services, one process tree (`bentoml serve serving.service:CTSynthClassifier`):

    CTSynthClassifier   HTTP front: checks the upload, decodes and preprocesses it with
                        ctsynth.data.preprocess (the function training used), turns logits into
                        probabilities. Bad input gets a 4xx JSON error, never a crash.
    OnnxModel           holds the onnxruntime session; `logits` is `batchable=True`, so BentoML's
                        adaptive batcher merges concurrent requests into one batch.

The model is `models:/ctsynth-classifier@champion` from the MLflow store ($MLFLOW_TRACKING_URI, or
the repository's mlflow.db), or the ONNX file named by $CTSYNTH_ONNX_MODEL (a bundle built
elsewhere; classes and resolution come from the file's metadata). No champion: the service does
not start, and says what to run.

Settings (environment variables):
    CTSYNTH_ONNX_MODEL        serve this ONNX file instead of the registry champion
    CTSYNTH_MAX_UPLOAD_BYTES  largest accepted request body (default 20 MB) -> 413 beyond it
    CTSYNTH_MAX_PIXELS        largest accepted image, width x height (default 40 M) -> 400 beyond it
    CTSYNTH_ORT_DEVICE        auto (default: CUDA when a driver is present, else CPU) | cpu | cuda
    CTSYNTH_ORT_THREADS       onnxruntime intra-op threads (default: onnxruntime's choice)
    CTSYNTH_MAX_BATCH_SIZE    adaptive batching: largest batch (default 64)
    CTSYNTH_MAX_LATENCY_MS    adaptive batching: latency budget (default 1000). BentoML scales its
                              first guesses of the batch cost from it, and sheds requests (503)
                              that would queue longer than this
"""

from __future__ import annotations

import asyncio
import ctypes
from http import HTTPStatus
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

try:
    import ctsynth  # noqa: F401  (installed: `make install` / `pip install -e .`)
except ImportError:  # inside a bento built from serving/bentofile.yaml the source ships as src/ctsynth
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse

from ctsynth.data.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, is_dicom, preprocess_bytes
from ctsynth.export import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger("ctsynth.serving")

IMAGE_FIELD = "image"
PREDICT_PATH = "/predict"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Requests up to this much over the image itself are multipart framing, not image bytes.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
CONNECTION_RETRIES = 2
BUNDLED_MODEL = "models/classifier/model.onnx"  # what serving/bentofile.yaml packs into a bento


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"ctsynth serving: {name}={raw!r} is not an integer") from None
    if value <= 0:
        raise SystemExit(f"ctsynth serving: {name}={raw!r} must be positive")
    return value


def _bundled_model() -> str | None:
    """Inside a bento built from serving/bentofile.yaml (<bento>/src/serving/service.py next to
    <bento>/bento.yaml), the ONNX file it carries. `bentoml serve <bento>` does not export the
    bentofile's `envs` to the serving process, so this is how a local bento finds its model."""
    here = Path(__file__).resolve()
    bundled = here.parents[1] / BUNDLED_MODEL
    if (here.parents[2] / "bento.yaml").is_file() and bundled.is_file():
        return str(bundled)
    return None


@dataclass(frozen=True)
class ServingSettings:
    onnx_model: str | None
    max_upload_bytes: int
    max_pixels: int
    ort_device: str
    ort_threads: int | None
    max_batch_size: int
    max_latency_ms: int

    @classmethod
    def from_env(cls) -> "ServingSettings":
        device = os.environ.get("CTSYNTH_ORT_DEVICE", "auto").strip().lower() or "auto"
        if device not in ("auto", "cpu", "cuda"):
            raise SystemExit(f"ctsynth serving: CTSYNTH_ORT_DEVICE={device!r}; use auto, cpu or cuda")
        threads = os.environ.get("CTSYNTH_ORT_THREADS", "").strip()
        return cls(
            onnx_model=os.environ.get("CTSYNTH_ONNX_MODEL") or _bundled_model(),
            max_upload_bytes=_env_int("CTSYNTH_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES),
            max_pixels=_env_int("CTSYNTH_MAX_PIXELS", DEFAULT_MAX_PIXELS),
            ort_device=device,
            ort_threads=_env_int("CTSYNTH_ORT_THREADS", 0) if threads else None,
            max_batch_size=_env_int("CTSYNTH_MAX_BATCH_SIZE", 64),
            max_latency_ms=_env_int("CTSYNTH_MAX_LATENCY_MS", 1000),
        )


SETTINGS = ServingSettings.from_env()


def _log_ctsynth_at_info() -> None:
    # BentoML's logging config leaves the root logger at WARNING (its handler formats with the
    # worker name and trace id); raise only our loggers to INFO so start-up facts are visible.
    logging.getLogger("ctsynth").setLevel(os.environ.get("CTSYNTH_LOG_LEVEL", "INFO").upper())


def _cuda_driver_present() -> bool:
    """Whether libcuda loads; onnxruntime-gpu would otherwise log errors and fall back silently."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _make_session(onnx_bytes: bytes, settings: ServingSettings):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if settings.ort_threads:
        options.intra_op_num_threads = settings.ort_threads
    # onnxruntime's worker threads spin between runs by default; in a server they would burn the
    # cores that the HTTP workers need to parse and preprocess the next requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    want_cuda = settings.ort_device == "cuda" or (
        settings.ort_device == "auto"
        and "CUDAExecutionProvider" in ort.get_available_providers()
        and _cuda_driver_present()
    )
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=providers)
    got = session.get_providers()
    if want_cuda and got[0] != "CUDAExecutionProvider":
        log.warning("CUDA was requested but onnxruntime runs on %s", got)
    return session


def _load_model(settings: ServingSettings):
    """The champion from the registry, or the ONNX file in CTSYNTH_ONNX_MODEL."""
    from ctsynth.registry import load_champion, load_onnx_file

    if settings.onnx_model:
        return load_onnx_file(settings.onnx_model)
    return load_champion()


def check_model_available(settings: ServingSettings) -> str:
    """Fail fast, before any worker starts, when there is nothing to serve; returns what will be served."""
    from ctsynth.registry import ChampionNotFoundError, champion_version, load_onnx_file

    try:
        if settings.onnx_model:
            model = load_onnx_file(settings.onnx_model)  # reads the metadata: a bad file fails here
            return f"ONNX file {model.source} (classes {model.classes}, {model.resolution} px)"
        version = champion_version()
        return f"models:/{version.name}@champion = version {version.version}"
    except (ChampionNotFoundError, FileNotFoundError, ValueError) as exc:
        # SystemExit(str) prints the message on stderr and exits 1.
        raise SystemExit(f"ctsynth serving cannot start: {exc}") from exc


@bentoml.service(
    name="ctsynth_onnx_model",
    workers=1,
    traffic={"timeout": 30, "max_concurrency": 1024},
)
class OnnxModel:
    """The onnxruntime session; `logits` is batched adaptively across concurrent requests."""

    @bentoml.on_deployment
    def _check_model() -> None:
        # Runs once in the `bentoml serve` process before workers start: without a model the
        # server exits with this message instead of restarting a failing worker forever.
        _log_ctsynth_at_info()
        log.info("will serve %s", check_model_available(SETTINGS))

    def __init__(self) -> None:
        _log_ctsynth_at_info()
        self.model = _load_model(SETTINGS)
        self.session = _make_session(self.model.onnx_bytes, SETTINGS)
        log.info(
            "serving %s version %s (%s): classes %s, %d px, onnxruntime providers %s",
            self.model.name,
            self.model.version,
            self.model.source,
            self.model.classes,
            self.model.resolution,
            self.session.get_providers(),
        )
        self.batches = 0  # adaptive batching at work: images / batches is the mean batch size
        self.images = 0
        # First run allocates; do it now rather than in the first request.
        self.session.run([OUTPUT_NAME], {INPUT_NAME: np.zeros((1, 1, self.model.resolution, self.model.resolution), np.float32)})

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.max_batch_size, max_latency_ms=SETTINGS.max_latency_ms)
    def logits(self, images: np.ndarray) -> np.ndarray:
        """float32 N x 1 x R x R (preprocessed) -> N x C logits."""
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
        self.batches += 1
        self.images += len(images)
        return logits

    @bentoml.api
    def model_info(self) -> dict[str, Any]:
        return {
            "name": self.model.name,
            "version": self.model.version,
            "classes": self.model.classes,
            "resolution": self.model.resolution,
            "source": self.model.source,
            "providers": self.session.get_providers(),
            "batches": self.batches,
            "images": self.images,
        }


# ----------------------------------------------------------------------------------------------
# Request guard: every check that must happen before BentoML parses the multipart body.


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status)


class PredictRequestGuard:
    """ASGI middleware for POST /predict: byte limit, content type, exactly one `image` file part.

    BentoML's own multipart handling would spool an unlimited body to disk, treat a text field
    called `image` as a URL to download, and answer a misnamed binary field with a 500; this
    guard answers all of those with a 4xx JSON error before the body reaches it. The body is
    buffered (at most max_upload_bytes) and replayed to the application unchanged.
    """

    def __init__(self, app: Any, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_upload_bytes + MULTIPART_OVERHEAD_BYTES

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != PREDICT_PATH or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rejection, body = await self._check(headers, scope, receive)
        if rejection is not None:
            await rejection(scope, _drained(receive), send)
            return
        await self.app(scope, _replay(body), send)

    async def _check(self, headers: dict[str, str], scope: dict, receive: Any) -> tuple[JSONResponse | None, bytes]:
        too_large = _error(
            413,
            "too_large",
            f"request body exceeds the limit of {self.max_upload_bytes} bytes for the image "
            f"(set CTSYNTH_MAX_UPLOAD_BYTES to change it)",
        )
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return too_large, b""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _error(400, "incomplete_body", "the client disconnected before sending the whole body"), b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return too_large, b""
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not body:
            return _error(400, "empty_body", f"empty request body: send multipart/form-data with a file field '{IMAGE_FIELD}'"), b""
        content_type = headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "multipart/form-data":
            return (
                _error(
                    415,
                    "unsupported_media_type",
                    f"Content-Type is {content_type or 'missing'!r}; send multipart/form-data with a file field "
                    f"'{IMAGE_FIELD}' (curl -F {IMAGE_FIELD}=@slice.png ...)",
                ),
                b"",
            )
        request = Request(scope, _replay(body))
        try:
            form = await request.form(max_files=4, max_fields=16)
        except Exception as exc:  # starlette raises MultiPartException / ValueError / KeyError on garbage
            return _error(400, "malformed_multipart", f"the multipart body could not be parsed: {exc}"), b""
        try:
            fields = list(form.keys())
            images = form.getlist(IMAGE_FIELD)
            others = sorted({k for k in fields if k != IMAGE_FIELD})
            if not images:
                return (
                    _error(
                        400,
                        "missing_field",
                        f"multipart field '{IMAGE_FIELD}' is missing (got fields {others}); send the file as '{IMAGE_FIELD}'",
                    ),
                    b"",
                )
            if others:
                return _error(400, "unexpected_field", f"unexpected multipart fields {others}; send only '{IMAGE_FIELD}'"), b""
            if len(images) > 1:
                return _error(400, "too_many_files", f"{len(images)} files in field '{IMAGE_FIELD}'; send one image per request"), b""
            if not isinstance(images[0], UploadFile):
                return (
                    _error(
                        400,
                        "not_a_file",
                        f"field '{IMAGE_FIELD}' is a text value, not a file upload (curl -F {IMAGE_FIELD}=@slice.png: note the @)",
                    ),
                    b"",
                )
            if images[0].size is not None and images[0].size > self.max_upload_bytes:
                return too_large, b""
        finally:
            await form.close()
        return None, body


def _replay(body: bytes):
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _drained(receive: Any):
    async def nothing() -> dict:
        return {"type": "http.disconnect"}

    return nothing


# ----------------------------------------------------------------------------------------------
# The HTTP front.


class ModelRef(BaseModel):
    name: str
    version: str


class Prediction(BaseModel):
    label: str = Field(description="the most probable class")
    probabilities: dict[str, float] = Field(description="softmax probability per class")
    model: ModelRef


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    exp = np.exp(shifted)
    return exp / exp.sum()


def _check_dicom_header(data: bytes, max_pixels: int) -> None:
    """Reject a DICOM whose header promises more pixels than allowed, before decoding any of them."""
    import io

    import pydicom

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:
        return  # preprocess reports unreadable files with its own message
    rows, columns = int(getattr(header, "Rows", 0) or 0), int(getattr(header, "Columns", 0) or 0)
    frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    if rows * columns * frames > max_pixels:
        raise ImageDecodeError(f"DICOM image has {columns}x{rows}x{frames} = {rows * columns * frames} pixels; the limit is {max_pixels}")


@bentoml.service(
    name="ctsynth_classifier",
    traffic={"timeout": 30, "max_concurrency": 1024},
)
class CTSynthClassifier:
    """Chest-CT slice classifier: POST a PNG, JPEG or DICOM as multipart field `image`."""

    onnx_model = bentoml.depends(OnnxModel)

    def __init__(self) -> None:
        _log_ctsynth_at_info()
        from PIL import Image

        # Our own max_pixels check (in preprocess) replaces PIL's, so that a decompression bomb
        # gets the same clear message whatever its size.
        Image.MAX_IMAGE_PIXELS = None
        self.settings = SETTINGS
        self._info: dict[str, Any] | None = None
        self._info_lock = asyncio.Lock()

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    self._info = await self.onnx_model.to_async.model_info()
        return self._info

    def _preprocess(self, data: bytes, resolution: int) -> np.ndarray:
        if is_dicom(data):
            _check_dicom_header(data, self.settings.max_pixels)
        return preprocess_bytes(data, resolution, max_pixels=self.settings.max_pixels)

    async def _logits(self, batch: np.ndarray) -> np.ndarray:
        import aiohttp

        # BentoML's client to a dependency pools keep-alive connections for 15 s, and uvicorn closes
        # idle ones after 5 s: a request can land on a closed connection (bentoml/BentoML#4971,
        # fix proposed in #5698). `logits` is a pure function, so retrying is safe.
        for attempt in range(CONNECTION_RETRIES + 1):
            try:
                return await self.onnx_model.to_async.logits(batch)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, RuntimeError) as exc:
                # aiohttp reports a connection closed while reading the response as a bare
                # RuntimeError("Connection closed."); any other RuntimeError is not ours to retry.
                dropped = not isinstance(exc, RuntimeError) or "Connection closed" in str(exc)
                if not dropped or attempt == CONNECTION_RETRIES:
                    raise
                log.info("retrying logits after a dropped connection to the model service: %r", exc)
        raise AssertionError("unreachable")

    @bentoml.api(route=PREDICT_PATH)
    async def predict(self, image: Path) -> Prediction:
        """Classify one chest-CT slice (PNG, JPEG in any mode, or single-frame DICOM).

        The file type is read from the bytes, not from the part's Content-Type (DICOM arrives as
        application/octet-stream or application/dicom).
        """
        info = await self._model_info()
        data = await asyncio.to_thread(Path(image).read_bytes)
        if len(data) > self.settings.max_upload_bytes:
            return _error(413, "too_large", f"image has {len(data)} bytes; the limit is {self.settings.max_upload_bytes}")
        try:
            model_input = await asyncio.to_thread(self._preprocess, data, int(info["resolution"]))
        except ImageDecodeError as exc:
            return _error(400, "invalid_image", f"field '{IMAGE_FIELD}': {exc}")
        except MemoryError:
            return _error(413, "too_large", f"field '{IMAGE_FIELD}': the image is too large to decode")
        try:
            logits = await self._logits(model_input[None])
        except bentoml.exceptions.BentoMLException as exc:
            if exc.error_code == HTTPStatus.SERVICE_UNAVAILABLE:
                # the batcher shed this request: it would have waited past CTSYNTH_MAX_LATENCY_MS
                return _error(503, "overloaded", "the model is busy; retry shortly")
            raise
        probabilities = _softmax(np.asarray(logits)[0])
        classes = list(info["classes"])
        return Prediction(
            label=classes[int(probabilities.argmax())],
            probabilities={c: float(p) for c, p in zip(classes, probabilities)},
            model=ModelRef(name=info["name"], version=str(info["version"])),
        )

    @bentoml.api(route="/model")
    async def model(self) -> dict[str, Any]:
        """Which model answers (registry name and version, classes, resolution, providers) and
        how many images it has classified in how many batches."""
        return await self.onnx_model.to_async.model_info()


async def _docs_redirect(scope: dict, receive: Any, send: Any) -> None:
    """/docs -> BentoML's Swagger UI at / (the OpenAPI document itself is /docs.json)."""
    await RedirectResponse("/")(scope, receive, send)


CTSynthClassifier.add_asgi_middleware(PredictRequestGuard, max_upload_bytes=SETTINGS.max_upload_bytes)
CTSynthClassifier.mount_asgi_app(_docs_redirect, path="/docs")
