"""serving/guard.py, the outermost ASGI layer: unknown paths stop there, bodies have limits, and every
refusal leaves as {"error", "code"}. The app behind it answers with the exact bodies BentoML's own
middlewares send (bentoml/_internal/server/http/traffic.py); tests/e2e/test_service.py checks the
same against a real `bentoml serve`."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib

import pytest
from starlette.responses import JSONResponse, PlainTextResponse

from serving.guard import RequestGuard


class App:
    """Answers each path with a fixed response; records which paths reached it and the body it read."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        self.seen.append(scope["path"])
        responses = {
            "/ok": JSONResponse({"label": "normal"}),
            "/busy": JSONResponse({"error": "Too many requests"}, status_code=429),
            "/slow": JSONResponse({"error": "Not able to process the request in 30 seconds"}, status_code=504),
            "/shed": JSONResponse({"detail": "the batch queue is full"}, status_code=503),
            "/text": PlainTextResponse("Method Not Allowed", status_code=405),
            "/invalid": JSONResponse(
                {"error": "1 validation error for Input", "detail": [{"loc": ["images"], "msg": "Value error, images has shape (2,)"}]},
                status_code=400,
            ),
            "/listed": JSONResponse([{"error": "Bad input"}], status_code=400),
            "/ours": JSONResponse({"error": "field 'image': empty file", "code": "invalid_image"}, status_code=400),
            "/big_error": PlainTextResponse("x" * 100_000, status_code=500),
        }
        if scope["path"] == "/upload":
            body = b""
            try:
                while True:
                    message = await receive()
                    body += message.get("body", b"")
                    if not message.get("more_body", False):
                        break
            except Exception:  # what a framework does with a failing body: a 500
                await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
                return
            self.bodies.append(body)
            await JSONResponse({"bytes": len(body)})(scope, receive, send)
            return
        await responses[scope["path"]](scope, receive, send)


KNOWN = {"/invalid", "/listed", "/ok", "/busy", "/slow", "/shed", "/text", "/ours", "/big_error", "/upload"}


def _call(guard: RequestGuard, path: str, body_chunks: list[bytes] = (), headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, dict, bytes]:
    """One request through the guard as an ASGI server would send it."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers), "query_string": b""}
    chunks = list(body_chunks) or [b""]
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


@pytest.fixture
def app_and_guard():
    app = App()
    return app, RequestGuard(app, KNOWN, body_limits={"/upload": 1000}, default_body_limit=100)


@pytest.mark.parametrize(
    ("path", "status", "code", "message"),
    [
        ("/busy", 429, "too_many_requests", "Too many requests"),
        ("/slow", 504, "timeout", "Not able to process the request in 30 seconds"),
        ("/shed", 503, "unavailable", "the batch queue is full"),
        ("/text", 405, "method_not_allowed", "Method Not Allowed"),
        ("/invalid", 400, "invalid_input", "1 validation error for Input; images: Value error, images has shape (2,)"),
        ("/listed", 400, "invalid_input", "Bad input"),
    ],
)
def test_refusals_from_inside_get_the_one_json_shape(app_and_guard, path, status, code, message):
    _, guard = app_and_guard
    got_status, headers, body = _call(guard, path)
    assert got_status == status
    assert headers["content-type"] == "application/json" and int(headers["content-length"]) == len(body)
    assert json.loads(body) == {"error": message, "code": code}


def test_answers_already_in_shape_and_successes_pass_unchanged(app_and_guard):
    _, guard = app_and_guard
    assert _call(guard, "/ours")[2] == json.dumps({"error": "field 'image': empty file", "code": "invalid_image"}, separators=(",", ":")).encode()
    assert json.loads(_call(guard, "/ok")[2]) == {"label": "normal"}
    status, _, body = _call(guard, "/big_error")  # not a refusal body: passed on as it is
    assert status == 500 and body == b"x" * 100_000


def test_unknown_paths_stop_at_the_guard(app_and_guard):
    app, guard = app_and_guard
    for path in ("/admin", "/.env", "/predict/../etc/passwd", "/ok/"):
        status, _, body = _call(guard, path)
        assert status == 404 and json.loads(body)["code"] == "not_found", path
    assert app.seen == []  # nothing behind the guard (BentoML's metrics) saw them


def test_bodies_over_the_limit_are_refused(app_and_guard):
    app, guard = app_and_guard
    # declared too large: refused before a byte is read
    status, _, body = _call(guard, "/upload", [b"x" * 10], headers=[(b"content-length", b"5000")])
    assert status == 413 and json.loads(body) == {"error": "request body exceeds the limit of 1000 bytes for /upload", "code": "too_large"}
    # no length declared (chunked): cut off when the count passes the limit, whatever the app then answers
    status, _, body = _call(guard, "/upload", [b"x" * 600, b"x" * 600])
    assert status == 413 and json.loads(body)["code"] == "too_large"
    assert app.bodies == []
    # within the limit: the app reads all of it
    status, _, body = _call(guard, "/upload", [b"x" * 600, b"x" * 400])
    assert status == 200 and json.loads(body) == {"bytes": 1000}
    # every other route has the default limit
    status, _, _ = _call(guard, "/ok", [b"{}" * 60], headers=[(b"content-length", b"120")])
    assert status == 413


def test_a_route_with_no_limit_reads_its_own_body():
    app = App()
    guard = RequestGuard(app, KNOWN, body_limits={"/upload": None}, default_body_limit=100)
    status, _, body = _call(guard, "/upload", [b"x" * 5000])
    assert status == 200 and json.loads(body) == {"bytes": 5000}


def test_the_service_decodes_inline_by_header_pixels_not_by_bytes():
    from serving.service import INLINE_DECODE_MAX_PIXELS, decodes_inline

    def png_header(width: int, height: int) -> bytes:
        def chunk(kind: bytes, payload: bytes) -> bytes:
            return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")

    # ~100 bytes that promise 39 M pixels: decoded in a thread, not on the event loop
    assert not decodes_inline(png_header(39_000, 1_000))
    assert decodes_inline(png_header(64, 64))
    assert not decodes_inline(png_header(INLINE_DECODE_MAX_PIXELS + 1, 1))
    assert not decodes_inline(b"\x00" * 128 + b"DICM" + b"\x00" * 64)  # DICOM: always in a thread
