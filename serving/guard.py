"""The outermost layer of the service's ASGI app: around BentoML's own middlewares, not inside them.

    request -> RequestGuard -> BentoML (metrics, tracing, access log, timeout, concurrency) -> routes

It does three things that no layer inside BentoML's can:
  - a path the service does not serve gets a 404 here, before BentoML's metrics middleware, which
    would otherwise add a Prometheus series for every URL a scanner tries (/metrics would grow
    without bound);
  - every request body has a byte limit (a declared Content-Length first, then counted as it
    arrives): /predict and /logits their own, everything else a small one;
  - every refusal leaves in one JSON shape, `{"error": "...", "code": "..."}`: BentoML's own 429
    (too many requests), 503 and 504 (timeout), its validation 400s and Starlette's 404/405 are
    rewritten; answers already in that shape pass unchanged.

`install(service, ...)` puts it around the app that `bentoml serve` builds for the service.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Callable

from serving.upload import error_response

# Codes for refusals that arrive without one (BentoML's, Starlette's).
CODE_BY_STATUS = {
    400: "invalid_input",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}
# Error bodies are a few hundred bytes; anything longer is passed through as it is.
MAX_REWRITTEN_ERROR_BYTES = 64 * 1024
# Paths served by BentoML itself; the service adds its API routes.
BENTOML_PATHS = frozenset({"/", "/docs.json", "/schema.json", "/livez", "/healthz", "/readyz", "/metrics"})
BENTOML_PREFIXES = ("/static_content/", "/assets/")


class BodyTooLarge(Exception):
    pass


def _refusal_body(status: int, raw: bytes) -> bytes | None:
    """The JSON error for an error response's body; None when it already has our shape."""
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str) and isinstance(parsed.get("code"), str):
        return None
    message = None
    if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict):
        parsed = parsed[0]  # BentoML sends some errors as a one-element list
    if isinstance(parsed, dict):
        message = parsed.get("error") or parsed.get("detail") or parsed.get("message")
        details = parsed.get("detail") if parsed.get("error") else None
        if isinstance(details, list):  # pydantic's validation errors: say which field and why
            described = [
                f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg', '')}" for d in details if isinstance(d, dict)
            ]
            message = "; ".join([str(message), *described])
    elif parsed is not None:
        message = parsed
    if message is None:
        message = raw.decode("utf-8", "replace").strip() if raw else ""
    if not isinstance(message, str):
        message = json.dumps(message)
    if not message:
        message = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else f"HTTP {status}"
    code = CODE_BY_STATUS.get(status, "client_error" if status < 500 else "server_error")
    return json.dumps({"error": message, "code": code}).encode()


class RequestGuard:
    """ASGI wrapper: unknown paths -> 404, body limits -> 413, every refusal -> {"error", "code"}."""

    def __init__(self, app: Any, known_paths: set[str], body_limits: dict[str, int | None], default_body_limit: int) -> None:
        self.app = app
        self.known_paths = frozenset(known_paths) | BENTOML_PATHS
        self.body_limits = body_limits
        self.default_body_limit = default_body_limit

    def _known(self, path: str) -> bool:
        return path in self.known_paths or path.startswith(BENTOML_PREFIXES)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if not self._known(path):
            await error_response(404, "not_found", f"{scope.get('method', '')} {path}: no such route")(scope, receive, send)
            return
        limit = self.body_limits.get(path, self.default_body_limit)
        if limit is None:  # a route that reads and limits its body itself, with its own message
            return await self.app(scope, receive, _RewritingSend(send, None, {"too_large": False}))
        refusal = error_response(413, "too_large", f"request body exceeds the limit of {limit} bytes for {path}")
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await refusal(scope, receive, send)
            return

        state = {"too_large": False}
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    state["too_large"] = True
                    raise BodyTooLarge(path)
            return message

        rewriting_send = _RewritingSend(send, refusal, state)
        try:
            await self.app(scope, counting_receive, rewriting_send)
        except BodyTooLarge:
            if not rewriting_send.started:
                await refusal(scope, receive, send)


class _RewritingSend:
    """An ASGI `send` that passes successful responses through and turns every error response
    (status >= 400, body up to MAX_REWRITTEN_ERROR_BYTES) into {"error", "code"}; when the request
    body was cut off at its limit (`state["too_large"]`), whatever the app answered becomes the 413."""

    def __init__(self, send: Callable, refusal: Any, state: dict) -> None:
        self.send = send
        self.refusal = refusal
        self.state = state
        self.started = False
        self.held_start: dict | None = None
        self.held_body: list[bytes] = []
        self.held_size = 0

    async def __call__(self, message: dict) -> None:
        send = self.send
        if message["type"] == "http.response.start":
            if message["status"] >= 400:
                self.held_start = message  # held until the whole (small) error body is here
                return
            self.started = True
            await send(message)
            return
        if message["type"] != "http.response.body" or self.held_start is None:
            await send(message)
            return
        self.held_body.append(message.get("body", b""))
        self.held_size += len(self.held_body[-1])
        if self.held_size > MAX_REWRITTEN_ERROR_BYTES:  # not a refusal: pass it on as it is
            start, chunks = self.held_start, list(self.held_body)
            self.held_start, self.held_body = None, []
            self.started = True
            await send(start)
            for chunk in chunks[:-1]:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({**message, "body": chunks[-1]})
            return
        if message.get("more_body", False):
            return
        status, raw = self.held_start["status"], b"".join(self.held_body)
        if self.state["too_large"] and self.refusal is not None:  # the app failed on the body we cut off
            status, new = 413, bytes(self.refusal.body)
        else:
            new = _refusal_body(status, raw)
        self.started = True
        if new is None:
            await send(self.held_start)
            await send({"type": "http.response.body", "body": raw, "more_body": False})
            return
        headers = [(k, v) for k, v in self.held_start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(new)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": new, "more_body": False})


class _Document:
    """What Service.openapi_spec returns, as far as BentoML's /docs.json view uses it."""

    def __init__(self, document: dict) -> None:
        self.document = document

    def asdict(self) -> dict:
        return self.document


def install(
    service: Any,
    known_paths: set[str],
    body_limits: dict[str, int | None],
    default_body_limit: int,
    fix_document: Callable[[dict], dict] | None = None,
) -> None:
    """Wrap the ASGI app that `bentoml serve` builds for `service` (Service.to_asgi) in a RequestGuard,
    and pass its OpenAPI document through `fix_document`.

    BentoML offers middlewares only inside its own (its metrics, timeout and concurrency layers come
    first), so the service object's class is swapped for a subclass whose to_asgi wraps the result.
    """
    base = type(service)

    class GuardedService(base):  # type: ignore[misc, valid-type]
        __slots__ = ()

        def to_asgi(self, *args: Any, **kwargs: Any) -> Any:
            return RequestGuard(super().to_asgi(*args, **kwargs), known_paths, body_limits, default_body_limit)

        @property
        def openapi_spec(self) -> Any:
            spec = super().openapi_spec
            return _Document(fix_document(spec.asdict())) if fix_document is not None else spec

    GuardedService.__name__ = GuardedService.__qualname__ = f"Guarded{base.__name__}"
    service.__class__ = GuardedService
