"""Load test of the BentoML service against the same model in a plain in-process onnxruntime loop.

    .venv/bin/python benchmarks/serve_load.py                 # starts its own `bentoml serve`
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:3000 --onnx models/classifier/model.onnx

Without --url, the benchmark starts `bentoml serve` on a free 127.0.0.1 port with the model given by
--onnx, else the registry champion, else a ResNet18 (random weights, 1 channel, 2 classes) at
64 px exported with ctsynth.export: the size the issue's goal refers to. It then measures, in one
run and on one machine:

  * the service: throughput and p50 / p95 / p99 latency of `POST /predict` (a 64 px PNG slice,
    multipart, keep-alive) at 1, 8 and 32 concurrent clients, each level for a fixed time;
  * the same ONNX model in-process: onnxruntime `session.run` in a loop at batch 1 and batch 32,
    while the server sits idle;
  * the ratio service@32 clients / in-process batch-32 throughput (goal >= 0.6) and the p99
    latency at one client (goal < 20 ms).

Service levels and in-process loops alternate for --rounds rounds (default 3) and the medians are
reported: on a shared 2-core VM single 10-second figures drift by +-10 %.

Clients are asyncio connections in this process (keep-alive, prebuilt request bytes) and talk
only to 127.0.0.1; counts and durations are bounded by the arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop

REPO = Path(__file__).resolve().parents[1]
MAX_CLIENTS = 256
MAX_SECONDS_PER_LEVEL = 120
MAX_ROUNDS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resnet18_onnx(path: Path, resolution: int = 64) -> Path:
    import torch
    import torchvision

    from ctsynth.export import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=2)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return export_onnx(model.eval(), resolution, ["normal", "squamous"], path)


def model_bytes(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """The ONNX file to serve and to run in-process, and where it came from."""
    if args.onnx:
        return Path(args.onnx), f"file {args.onnx}"
    if not args.resnet18:
        try:
            from ctsynth.registry import load_champion

            champion = load_champion()
            path = workdir / "champion.onnx"
            path.write_bytes(champion.onnx_bytes)
            return path, f"registry champion {champion.name} v{champion.version}"
        except Exception as exc:  # no champion yet: fall back to the benchmark's own model
            print(f"no registry champion ({exc.__class__.__name__}); exporting a ResNet18 at 64 px", file=sys.stderr)
    return resnet18_onnx(workdir / "resnet18_64.onnx"), "ResNet18 (random weights) at 64 px, exported by ctsynth.export"


def sample_png(resolution: int) -> bytes:
    """A real CT slice (pydicom's CT_small.dcm) in the lung window, as a prepared-size PNG."""
    from PIL import Image
    from pydicom.data import get_testdata_file

    from ctsynth.data.preprocess import decode_image, square_resize

    decoded = decode_image(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    buffer = io.BytesIO()
    Image.fromarray(square_resize(decoded.pixels, resolution)).save(buffer, format="PNG")
    return buffer.getvalue()


def in_process_throughput(onnx_path: Path, resolution: int, batch: int, seconds: float) -> float:
    """Images per second of a plain onnxruntime loop (CPU provider, default threads)."""
    from ctsynth.export import onnx_session

    session = onnx_session(onnx_path)
    x = np.random.default_rng(0).uniform(-1, 1, (batch, 1, resolution, resolution)).astype(np.float32)
    for _ in range(3):
        session.run(["logits"], {"image": x})
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(["logits"], {"image": x})
        done += batch
    return done / (time.perf_counter() - start)


def predict_request(host: str, port: int, png: bytes) -> bytes:
    """The whole HTTP/1.1 request, built once: POST /predict with one `image` file part, as
    `curl -F image=@slice.png` sends it."""
    boundary = "ctsynth-serve-load"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="slice.png"\r\n'
        f"Content-Type: image/png\r\n\r\n"
    ).encode() + png + f"\r\n--{boundary}--\r\n".encode()
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    """Status code of one HTTP/1.1 response with a Content-Length (what the service sends); the body is read and dropped."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def load_level(url: str, png: bytes, clients: int, seconds: float, warmup: float) -> dict:
    # Each client is one keep-alive connection sending prebuilt bytes. The clients share the 2
    # cores with the server, so what they spend per request is taken from the service: with uvloop
    # this costs half of what aiohttp did (0.05 vs 0.1 cores at 32 clients).
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = predict_request(host, int(port), png)
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.perf_counter() + warmup + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                writer.write(request)
                try:
                    status = await asyncio.wait_for(read_response(reader), timeout=60)
                except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    if measuring:
                        errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                    continue
                if measuring:
                    if status == 200:
                        latencies.append(time.perf_counter() - start)
                    else:
                        errors += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(warmup)
    measuring, measure_start = True, time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - measure_start
    ms = np.array(latencies) * 1000.0
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "throughput": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
    }


def measure_level(url: str, png: bytes, clients: int, seconds: float, warmup: float) -> dict:
    before = batch_counts(url)
    result = uvloop.run(load_level(url, png, clients, seconds, warmup))
    after = batch_counts(url)
    batches = after[0] - before[0]
    result["mean_batch"] = (after[1] - before[1]) / batches if batches else float("nan")
    return result


def describe(result: dict) -> str:
    return (
        f"service {int(result['clients']):3d} clients: {result['throughput']:7.1f} img/s  p50 {result['p50_ms']:6.1f} ms  "
        f"p95 {result['p95_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms  mean batch {result['mean_batch']:4.1f}  "
        f"({int(result['requests'])} requests, {int(result['errors'])} errors)"
    )


def batch_counts(url: str) -> tuple[int, int]:
    """(batches, images) the model service has run so far, from POST /model."""
    import requests

    info = requests.post(f"{url}/model", json={}, timeout=30).json()["predict"]
    return int(info["batches"]), int(info["images"])


def start_server(onnx_path: Path, log_path: Path, threads: int | None, max_clients: int) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    env = {
        **os.environ,
        "CTSYNTH_ONNX_MODEL": str(onnx_path),
        "CTSYNTH_ORT_DEVICE": "cpu",
        # this checkout's code, whatever an installed ctsynth points at
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        # every client in flight plus the /model reads: no request of the benchmark is refused with 429
        "CTSYNTH_MAX_CONCURRENCY": str(max_clients + 8),
    }
    if threads:
        env["CTSYNTH_ORT_THREADS"] = str(threads)
    bentoml = Path(sys.executable).with_name("bentoml")
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [str(bentoml), "serve", "serving.service:CTSynthClassifier", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bentoml serve exited with {process.returncode}; see {log_path}")
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    raise SystemExit(f"bentoml serve not ready after 180 s; see {log_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service on 127.0.0.1 (default: start one)")
    parser.add_argument("--onnx", help="ONNX model to serve / run in-process (default: champion, else ResNet18@64)")
    parser.add_argument("--resnet18", action="store_true", help="use the ResNet18@64 benchmark model even if a champion exists")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    parser.add_argument("--rounds", type=int, default=3, help="repeat every level and the in-process loop; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads in the server")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (exported model, server log)")
    args = parser.parse_args(argv)

    levels = [int(c) for c in args.clients.split(",")]
    if any(c < 1 or c > MAX_CLIENTS for c in levels) or not 0 < args.seconds <= MAX_SECONDS_PER_LEVEL or not 1 <= args.rounds <= MAX_ROUNDS:
        parser.error(f"clients must be 1..{MAX_CLIENTS}, seconds 0..{MAX_SECONDS_PER_LEVEL}, rounds 1..{MAX_ROUNDS}")
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        parser.error("--url must be on 127.0.0.1: this benchmark loads only the local machine")

    from ctsynth.export import read_onnx_info

    workdir = Path(tempfile.mkdtemp(prefix="ctsynth-serve-load-"))
    onnx_path, source = model_bytes(args, workdir)
    resolution = read_onnx_info(onnx_path).resolution
    png = sample_png(resolution)
    print(f"model: {source} ({resolution} px, {onnx_path.stat().st_size / 1e6:.1f} MB); CPU cores: {os.cpu_count()}")

    process = None
    url = args.url
    if url is None:
        process, url = start_server(onnx_path, workdir / "server.log", args.threads, max(levels))
        print(f"started bentoml serve at {url} (log {workdir / 'server.log'})")

    def measure_service(order: list[int]) -> dict[int, dict]:
        return {clients: measure_level(url, png, clients, args.seconds, args.warmup) for clients in order}

    def measure_in_process(order: tuple[int, ...]) -> dict[int, float]:
        return {batch: in_process_throughput(onnx_path, resolution, batch, args.seconds) for batch in order}

    rounds = []
    try:
        for round_index in range(args.rounds):
            # This VM's speed drifts under sustained load, so the order alternates (ABBA): one round
            # runs the service first with the most clients last, the next the in-process loop first
            # and the most clients first; either way the two figures of the ratio are neighbours.
            # While the loop runs, the server sits idle (onnxruntime does not spin between runs).
            if round_index % 2 == 0:
                service = measure_service(sorted(levels))
                in_process = measure_in_process((32, 1))
            else:
                in_process = measure_in_process((1, 32))
                service = measure_service(sorted(levels, reverse=True))
            service = {clients: service[clients] for clients in levels}
            rounds.append({"service": service, "in_process": in_process})
            for result in service.values():
                print(f"round {round_index + 1}  " + describe(result))
            print(
                f"round {round_index + 1}  in-process onnxruntime: batch 1 {in_process[1]:7.1f} img/s, "
                f"batch 32 {in_process[32]:7.1f} img/s"
            )
    finally:
        if process is not None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)

    top, one = max(levels), min(levels)
    ratios_32 = [r["service"][top]["throughput"] / r["in_process"][32] for r in rounds]
    ratios_1 = [r["service"][top]["throughput"] / r["in_process"][1] for r in rounds]
    p99_one = [r["service"][one]["p99_ms"] for r in rounds]
    print(f"\nmedian of {len(rounds)} rounds:")
    for clients in levels:
        print(describe({k: float(np.median([r["service"][clients][k] for r in rounds])) for k in rounds[0]["service"][clients]}))
    for batch in (1, 32):
        print(f"in-process onnxruntime batch {batch:2d}: {np.median([r['in_process'][batch] for r in rounds]):7.1f} img/s")
    ratio, p99 = float(np.median(ratios_32)), float(np.median(p99_one))
    print(
        f"ratio service@{top} clients / in-process batch 32: {ratio:.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios_32)}; "
        f"goal >= 0.60: {'met' if ratio >= 0.6 else 'NOT met'}); vs in-process batch 1: {np.median(ratios_1):.2f}"
    )
    print(f"p99 latency at {one} client: {p99:.1f} ms (goal < 20 ms: {'met' if p99 < 20 else 'NOT met'})")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": source, "cpu_count": os.cpu_count(), "rounds": rounds, "ratio_32": ratio, "p99_ms_one_client": p99}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
