"""A real `bentoml serve` on 127.0.0.1: good PNG/JPEG/DICOM answers, every kind of bad input gets a
4xx JSON error and the server keeps answering, and no champion means no server.

The champion is a tiny CNN exported by ctsynth.export and registered by ctsynth.registry into a
temporary MLflow store, exactly as the `select` stage does it.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np
import pytest
import requests
import torch
from PIL import Image

from ctsynth.data.preprocess import preprocess_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared test inputs in tests/
from _dicom_data import deflate_bomb  # noqa: E402

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BENTOML = Path(sys.executable).with_name("bentoml")
RESOLUTION = 32
CLASSES = ["normal", "squamous"]
MAX_UPLOAD_BYTES = 200_000
MAX_PIXELS = 1_000_000
MAX_LOGITS_BYTES = 300_000
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_cnn(n_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, n_classes),
    ).eval()


def _server_env(store: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSYNTH_", "BENTOML_"))}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}",
        DVC_ROOT=str(store),
        OMP_NUM_THREADS="1",
        CTSYNTH_ORT_DEVICE="cpu",
        CTSYNTH_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        CTSYNTH_MAX_PIXELS=str(MAX_PIXELS),
        CTSYNTH_MAX_LOGITS_BYTES=str(MAX_LOGITS_BYTES),
        BENTOML_HOME=str(store / "bentoml"),
        # this checkout's ctsynth and serving packages, whatever an installed ctsynth points at
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]),
        **extra,
    )
    return env


class Server:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        # start_new_session: teardown signals the whole process group (arbiter + workers).
        self.process = subprocess.Popen(
            [str(BENTOML), "serve", "serving.service:CTSynthClassifier", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.output()[-4000:]}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or busy starting workers
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not ready after {START_TIMEOUT_S} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()

    def predict(self, files=None, **kwargs) -> requests.Response:
        return requests.post(f"{self.url}/predict", files=files, timeout=30, **kwargs)


# ----------------------------------------------------------------------------------------------
# Inputs


def _png(array: np.ndarray, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save_kwargs)
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _slice(seed: int, shape=(48, 40)) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def _ct_small() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


def _dicom_variant(edit) -> bytes:
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(_ct_small()))
    edit(dataset)
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def _pydicom_file(name: str) -> bytes:
    return (Path(__import__("pydicom").__file__).parent / "data" / "test_files" / name).read_bytes()


def _png_header_bomb(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR promising width x height pixels, with a few bytes of data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def _animated_png() -> bytes:
    frames = [Image.fromarray(_slice(s)) for s in (1, 2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_slice(3)).save(buffer, format="GIF")
    return buffer.getvalue()


def _good_inputs() -> dict[str, tuple[str, bytes, str]]:
    rgb = np.stack([_slice(4), _slice(5), _slice(6)], axis=-1)
    rgba = np.concatenate([rgb, np.full((48, 40, 1), 200, np.uint8)], axis=-1)
    return {
        "png_grey": ("slice.png", _png(_slice(7)), "image/png"),
        "png_rgba": ("slice.png", _png(rgba), "image/png"),
        "png_16bit": ("slice.png", _png((_slice(8).astype(np.uint16) * 257)), "image/png"),
        "jpeg_rgb": ("slice.jpg", _jpeg(Image.fromarray(rgb)), "image/jpeg"),
        "jpeg_grey": ("slice.jpg", _jpeg(Image.fromarray(_slice(9))), "image/jpeg"),
        "jpeg_cmyk": ("slice.jpg", _jpeg(Image.fromarray(rgb).convert("CMYK")), "image/jpeg"),
        "dicom_ct": ("CT_small.dcm", _ct_small(), "application/dicom"),
    }


GOOD_PNG = ("slice.png", _png(_slice(11)), "image/png")


def _bad_requests() -> list[tuple[str, dict, int, str]]:
    """(id, requests.post kwargs, expected status, a phrase the error must contain)."""
    png = _png(_slice(12))
    noise = (np.random.default_rng(13).random((600, 600)) * 255).astype(np.uint8)
    big_png = _png(noise)
    assert len(big_png) > MAX_UPLOAD_BYTES
    return [
        ("empty_body", {"data": b""}, 400, "empty request body"),
        ("empty_file", {"files": {"image": ("a.png", b"", "image/png")}}, 400, "empty file"),
        ("not_an_image", {"files": {"image": ("a.png", b"hello, this is text" * 10, "image/png")}}, 400, "not a PNG, JPEG or DICOM"),
        ("truncated_png", {"files": {"image": ("a.png", png[: len(png) // 2], "image/png")}}, 400, "truncated or corrupt"),
        ("truncated_jpeg", {"files": {"image": ("a.jpg", _jpeg(Image.fromarray(_slice(14)))[:400], "image/jpeg")}}, 400, "truncated or corrupt"),
        ("dicom_no_pixels", {"files": {"image": ("a.dcm", _dicom_variant(lambda d: delattr(d, "PixelData")), "application/dicom")}}, 400, "no pixel data"),
        ("dicom_multiframe", {"files": {"image": ("a.dcm", _dicom_variant(lambda d: setattr(d, "NumberOfFrames", 2)), "application/dicom")}}, 400, "frames"),
        ("dicom_header_bomb", {"files": {"image": ("a.dcm", _dicom_variant(lambda d: (setattr(d, "Rows", 60000), setattr(d, "Columns", 60000))), "application/dicom")}}, 400, "the limit is"),
        ("animated_png", {"files": {"image": ("a.png", _animated_png(), "image/png")}}, 400, "animated or multi-frame"),
        ("gif", {"files": {"image": ("a.gif", _gif(), "image/gif")}}, 400, "unsupported image format GIF"),
        ("too_many_bytes", {"files": {"image": ("a.png", big_png, "image/png")}}, 413, f"limit of {MAX_UPLOAD_BYTES} bytes"),
        ("too_many_pixels", {"files": {"image": ("a.png", _png(np.zeros((1200, 1000), np.uint8)), "image/png")}}, 400, f"the limit is {MAX_PIXELS}"),
        ("decompression_bomb", {"files": {"image": ("a.png", _png_header_bomb(100_000, 100_000), "image/png")}}, 400, "10000000000 pixels"),
        ("wrong_field_name", {"files": {"file": ("a.png", png, "image/png")}}, 400, "field 'image' is missing (got fields ['file'])"),
        ("extra_field", {"files": {"image": ("a.png", png, "image/png"), "other": ("b.png", png, "image/png")}}, 400, "unexpected multipart fields ['other']"),
        ("two_images", {"files": [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]}, 400, "one image per request"),
        ("text_not_file", {"files": {"image": (None, "http://127.0.0.1:1/x.png")}}, 400, "not a file upload"),
        ("json_body", {"json": {"image": "http://127.0.0.1:1/x.png"}}, 415, "send multipart/form-data"),
        ("dicom_bad_header", {"files": {"image": ("badVR.dcm", _pydicom_file("badVR.dcm"), "application/dicom")}}, 400, "is not a number"),
        ("dicom_deflate_bomb", {"files": {"image": ("bomb.dcm", deflate_bomb(64 << 20), "application/dicom")}}, 400, "inflates to more than"),
        ("garbage_multipart", {"data": b"--xyz\r\ngarbage", "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}}, 400, ""),
    ]



# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory):
    from ctsynth.export import export_onnx
    from ctsynth.registry import register_champion

    store = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        mp.setenv("DVC_ROOT", str(store))
        model = _tiny_cnn(len(CLASSES), seed=0)
        onnx_path = export_onnx(model, RESOLUTION, CLASSES, store / "champion.onnx")
        # an older version first, so the test sees that the alias (not "latest") decides
        register_champion(onnx_path, None, {"accuracy": 0.5}, {"seed": 0}, np.zeros((2, 1, RESOLUTION, RESOLUTION), np.float32))
        version = register_champion(onnx_path, None, {"accuracy": 0.6}, {"seed": 1}, np.zeros((2, 1, RESOLUTION, RESOLUTION), np.float32))
        from mlflow import MlflowClient

        other = export_onnx(_tiny_cnn(3, seed=5), RESOLUTION, ["a", "b", "c"], store / "other.onnx")
        register_champion(other, None, {}, {}, np.zeros((1, 1, RESOLUTION, RESOLUTION), np.float32))
        MlflowClient().set_registered_model_alias("ctsynth-classifier", "champion", version)

    server = Server(_server_env(store), store / "server.log")
    try:
        server.wait_ready()
        yield server, onnx_path, version
    finally:
        server.stop()


def _expected_probabilities(onnx_path: Path, data: bytes) -> np.ndarray:
    from ctsynth.export import onnx_session

    (logits,) = onnx_session(onnx_path).run(["logits"], {"image": preprocess_bytes(data, RESOLUTION)[None]})
    exp = np.exp(logits[0] - logits[0].max())
    return exp / exp.sum()


# ----------------------------------------------------------------------------------------------
# Tests


def test_good_inputs_get_the_champion_answer(registry_server):
    server, onnx_path, version = registry_server
    for name, (filename, data, content_type) in _good_inputs().items():
        response = server.predict(files={"image": (filename, data, content_type)})
        assert response.status_code == 200, f"{name}: {response.status_code} {response.text}"
        body = response.json()
        assert body["model"] == {"name": "ctsynth-classifier", "version": version}, name
        assert list(body["probabilities"]) == CLASSES, name
        probabilities = np.array([body["probabilities"][c] for c in CLASSES])
        # same preprocessing function and model as in-process: same numbers
        np.testing.assert_allclose(probabilities, _expected_probabilities(onnx_path, data), atol=1e-5, err_msg=name)
        assert body["label"] == CLASSES[int(probabilities.argmax())], name


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda case: case[0])
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(registry_server, case):
    server, _, _ = registry_server
    name, kwargs, status, phrase = case
    response = requests.post(f"{server.url}/predict", timeout=30, **kwargs)
    assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/json"), name
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], f"{name}: {body}"
    assert phrase in body["error"], f"{name}: {body['error']!r} lacks {phrase!r}"
    assert body.get("code"), f"{name}: {body}"
    assert server.process.poll() is None, f"server died after {name}"
    after = server.predict(files={"image": GOOD_PNG})
    assert after.status_code == 200, f"after {name}: {after.status_code} {after.text}"


def test_wrong_method_gets_a_json_error(registry_server):
    server, _, _ = registry_server
    response = requests.get(f"{server.url}/predict", timeout=10)
    assert response.status_code == 405
    assert response.json() == {"error": "GET /predict: Method Not Allowed; use POST /predict", "code": "method_not_allowed"}


def test_concurrent_requests_all_answer_and_health_endpoints(registry_server):
    server, onnx_path, _ = registry_server
    inputs = [_png(_slice(100 + i)) for i in range(24)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda data: server.predict(files={"image": ("s.png", data, "image/png")}), inputs))
    for data, response in zip(inputs, responses):
        assert response.status_code == 200, response.text
        got = np.array([response.json()["probabilities"][c] for c in CLASSES])
        np.testing.assert_allclose(got, _expected_probabilities(onnx_path, data), atol=1e-5)
    assert requests.get(f"{server.url}/livez", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 200
    metrics = requests.get(f"{server.url}/metrics", timeout=5)
    assert metrics.status_code == 200 and 'endpoint="/predict"' in metrics.text
    spec = requests.get(f"{server.url}/docs.json", timeout=5).json()
    assert "/predict" in spec["paths"]
    docs = requests.get(f"{server.url}/docs", timeout=5)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_batch_counters_and_the_batchable_array_path(registry_server):
    server, onnx_path, version = registry_server
    before = requests.post(f"{server.url}/model", json={}, timeout=10).json()
    assert before["name"] == "ctsynth-classifier" and before["version"] == version
    assert before["resolution"] == RESOLUTION and before["classes"] == CLASSES
    assert "CPUExecutionProvider" in before["providers"]

    # /predict: every answered image is counted once by the in-process batcher
    inputs = [_png(_slice(200 + i)) for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda data: server.predict(files={"image": ("s.png", data, "image/png")}), inputs))
    assert all(r.status_code == 200 for r in responses)
    after = requests.post(f"{server.url}/model", json={}, timeout=10).json()
    assert after["predict"]["images"] - before["predict"]["images"] == len(inputs)
    assert 1 <= after["predict"]["batches"] - before["predict"]["batches"] <= len(inputs)

    # /logits: preprocessed arrays (the same preprocessing function), batched by BentoML
    from ctsynth.export import onnx_session

    arrays = [preprocess_bytes(data, RESOLUTION)[None] for data in inputs]  # each 1 x 1 x R x R
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda a: requests.post(f"{server.url}/logits", json={"images": a.tolist()}, timeout=30), arrays))
    session = onnx_session(onnx_path)
    for array, answer in zip(arrays, answers):
        assert answer.status_code == 200, answer.text
        (expected,) = session.run(["logits"], {"image": array})
        np.testing.assert_allclose(np.array(answer.json()), expected, atol=1e-5)
    final = requests.post(f"{server.url}/model", json={}, timeout=10).json()
    assert final["logits"]["images"] - after["logits"]["images"] == len(arrays)
    for bad_images in ("not an array", np.zeros((1, 1, RESOLUTION + 1, RESOLUTION)).tolist()):
        bad = requests.post(f"{server.url}/logits", json={"images": bad_images}, timeout=10)
        assert bad.status_code == 400, bad.text
    # a wrong shape sent together with good arrays is refused alone, before requests are batched
    mixed = [np.zeros((1, 1, RESOLUTION // 2, RESOLUTION), np.float32)] + arrays
    with ThreadPoolExecutor(max_workers=len(mixed)) as pool:
        answers = list(pool.map(lambda a: requests.post(f"{server.url}/logits", json={"images": a.tolist()}, timeout=30), mixed))
    assert answers[0].status_code == 400 and "expected N x 1 x" in answers[0].text, answers[0].text
    assert [a.status_code for a in answers[1:]] == [200] * len(arrays)


def test_onnx_file_from_environment(tmp_path):
    from ctsynth.export import export_onnx

    onnx_path = export_onnx(_tiny_cnn(3, seed=2), RESOLUTION, ["normal", "squamous", "adeno"], tmp_path / "bundle.onnx")
    # an empty MLflow store: the file alone must be enough
    server = Server(_server_env(tmp_path, CTSYNTH_ONNX_MODEL=str(onnx_path)), tmp_path / "server.log")
    try:
        server.wait_ready()
        response = server.predict(files={"image": ("CT_small.dcm", _ct_small(), "application/octet-stream")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": "bundle", "version": "file"}
        assert list(body["probabilities"]) == ["normal", "squamous", "adeno"]
        assert sum(body["probabilities"].values()) == pytest.approx(1.0)
        assert "providers" in server.output() and "CPUExecutionProvider" in server.output()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("extra_env", "phrase"),
    [({}, "no champion model"), ({"CTSYNTH_ONNX_MODEL": "/nonexistent/model.onnx"}, "/nonexistent/model.onnx does not exist")],
    ids=["no_champion", "missing_onnx_file"],
)
def test_refuses_to_start_without_a_model(tmp_path, extra_env, phrase):
    server = Server(_server_env(tmp_path, **extra_env), tmp_path / "server.log")
    try:
        code = server.process.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.stop()
        raise AssertionError(f"server kept running without a model:\n{server.output()[-3000:]}") from None
    output = server.output()
    server.stop()
    assert code != 0
    assert "ctsynth serving cannot start" in output and phrase in output, output[-3000:]


def test_an_elongated_image_is_scaled_before_padding(registry_server):
    # 5000 x 150 passes the 1 M pixel limit; its square (25 M pixels) would not: scaled first, same as in-process
    server, onnx_path, _ = registry_server
    data = _png(np.tile(np.linspace(0, 255, 5000).astype(np.uint8), (150, 1)))
    response = server.predict(files={"image": ("wide.png", data, "image/png")})
    assert response.status_code == 200, response.text
    from ctsynth.export import onnx_session

    (logits,) = onnx_session(onnx_path).run(["logits"], {"image": preprocess_bytes(data, RESOLUTION, max_pixels=MAX_PIXELS)[None]})
    expected = np.exp(logits[0] - logits[0].max())
    np.testing.assert_allclose([response.json()["probabilities"][c] for c in CLASSES], expected / expected.sum(), atol=1e-5)


def test_unknown_urls_get_a_json_404_and_no_metrics_series(registry_server):
    server, _, _ = registry_server
    for path in ("/admin", "/wp-login.php", "/predict/extra", "/logits2"):
        response = requests.post(f"{server.url}{path}", timeout=10)
        assert response.status_code == 404 and response.json()["code"] == "not_found", (path, response.text)
        assert requests.get(f"{server.url}{path}", timeout=10).json()["code"] == "not_found"
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    for path in ("/admin", "/wp-login.php", "/predict/extra", "/logits2"):
        assert f'endpoint="{path}"' not in metrics, path


def test_logits_has_a_body_limit(registry_server):
    server, _, _ = registry_server
    huge = json.dumps({"images": np.zeros((80, 1, RESOLUTION, RESOLUTION)).tolist()}).encode()
    assert len(huge) > MAX_LOGITS_BYTES
    declared = requests.post(f"{server.url}/logits", data=huge, headers={"Content-Type": "application/json"}, timeout=30)
    assert declared.status_code == 413 and declared.json() == {
        "error": f"request body exceeds the limit of {MAX_LOGITS_BYTES} bytes for /logits",
        "code": "too_large",
    }
    # no Content-Length (chunked): counted as it arrives
    chunked = requests.post(
        f"{server.url}/logits", data=(huge[i : i + 65536] for i in range(0, len(huge), 65536)), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert chunked.status_code == 413 and chunked.json()["code"] == "too_large", chunked.text
    # BentoML's own validation error of /logits: the same shape
    bad = requests.post(f"{server.url}/logits", json={"images": "not an array"}, timeout=10)
    assert bad.status_code == 400 and set(bad.json()) == {"error", "code"}, bad.text
    assert server.predict(files={"image": GOOD_PNG}).status_code == 200


def test_openapi_document_validates(registry_server):
    from openapi_spec_validator import validate

    server, _, _ = registry_server
    document = requests.get(f"{server.url}/docs.json", timeout=10).json()
    validate(document)  # raises on any violation of OpenAPI 3.0
    images = document["components"]["schemas"]["logits__Input"]["properties"]["images"]
    assert images["type"] == "array" and images["items"]["items"]["items"]["items"]["type"] == "number"
    assert {"/predict", "/logits", "/model"} <= set(document["paths"])


def test_bentoml_client_and_plain_http_client(registry_server):
    server, onnx_path, version = registry_server
    from ctsynth.export import onnx_session

    arrays = np.stack([preprocess_bytes(_png(_slice(300 + i)), RESOLUTION) for i in range(3)])  # 3 x 1 x R x R
    (expected,) = onnx_session(onnx_path).run(["logits"], {"image": arrays})
    with bentoml.SyncHTTPClient(server.url) as client:
        np.testing.assert_allclose(np.asarray(client.logits(images=arrays)), expected, atol=1e-5)
        assert client.model_info()["version"] == version
    plain = requests.post(f"{server.url}/logits", json={"images": arrays.tolist()}, timeout=30)
    assert plain.status_code == 200
    np.testing.assert_allclose(np.array(plain.json()), expected, atol=1e-5)
    # /predict takes a file upload: a plain multipart POST (curl -F image=@slice.png)
    assert server.predict(files={"image": GOOD_PNG}).json()["model"]["version"] == version


def _stalled_upload(server: Server, path: str = "/predict") -> socket.socket:
    """A request whose body never finishes arriving: it holds a concurrency slot until the timeout."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        f"Content-Length: 10000\r\n\r\n--x\r\n".encode()
    )
    return sock


def test_busy_and_timed_out_requests_get_json_refusals(tmp_path):
    from ctsynth.export import export_onnx

    onnx_path = export_onnx(_tiny_cnn(2, seed=3), RESOLUTION, CLASSES, tmp_path / "m.onnx")
    env = _server_env(tmp_path, CTSYNTH_ONNX_MODEL=str(onnx_path), CTSYNTH_MAX_CONCURRENCY="1", CTSYNTH_REQUEST_TIMEOUT_S="5")
    server = Server(env, tmp_path / "server.log")
    try:
        server.wait_ready()
        stalled = _stalled_upload(server)
        # BentoML refuses what passes max_concurrency with its own 429, rewritten into our shape
        deadline = time.monotonic() + 30
        busy = None
        while time.monotonic() < deadline:
            busy = requests.post(f"{server.url}/model", json={}, timeout=10)
            if busy.status_code == 429:
                break
            time.sleep(0.1)
        assert busy is not None and busy.status_code == 429, busy.text if busy is not None else None
        assert busy.json() == {"error": "Too many requests", "code": "too_many_requests"}
        # the health endpoints are not counted
        assert requests.get(f"{server.url}/livez", timeout=5).status_code == 200
        # BentoML's timeout answers the stalled request with 504, rewritten into our shape
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = stalled.recv(65536)
            if not chunk:
                break
            answer += chunk
        stalled.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 504"), answer
        assert json.loads(body) == {"error": "Not able to process the request in 5 seconds", "code": "timeout"}
        assert server.predict(files={"image": GOOD_PNG}).status_code == 200
        info = requests.post(f"{server.url}/model", json={}, timeout=10).json()
        assert str(tmp_path) not in json.dumps(info) and info["source"] == "file"
        assert info["limits"]["max_concurrency"] == 1 and info["limits"]["memory_budget_bytes"] > 0
    finally:
        server.stop()
