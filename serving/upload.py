"""Reading a /predict upload: every check that must happen before the image is decoded.

The whole body is read once, refused as soon as it passes the byte limit, and parsed by Starlette's
multipart parser from that buffer; the answer to anything wrong is a RequestRejected carrying the
4xx JSON error (`{"error": ..., "code": ...}`) that every refusal of the service uses.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

IMAGE_FIELD = "image"
# Requests up to this much over the image itself are multipart framing, not image bytes.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The one shape of every refusal: a message for a person and a stable code for a program."""
    return JSONResponse({"error": message, "code": code}, status_code=status)


class RequestRejected(Exception):
    """A request we answer with a 4xx JSON error; `response` is that answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.response = error_response(status, code, message)


def _too_large(max_upload_bytes: int) -> RequestRejected:
    return RequestRejected(
        413,
        "too_large",
        f"request body exceeds the limit of {max_upload_bytes} bytes for the image (set CTSYNTH_MAX_UPLOAD_BYTES to change it)",
    )


async def read_body(request: Request, max_upload_bytes: int) -> bytes:
    """The whole body, refused as soon as it passes the limit (a declared Content-Length first)."""
    limit = max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(max_upload_bytes)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(max_upload_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestRejected(400, "incomplete_body", "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def replay(body: bytes):
    """An ASGI `receive` that hands over the already-read body once, for the form parser."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def read_image_upload(request: Request, max_upload_bytes: int) -> bytes:
    """The bytes of the one file in multipart field `image`, or RequestRejected saying what is wrong.

    Checked here, because a generic multipart parser would not: the byte limit while the body
    arrives, the content type, exactly one part and it named `image`, and a file rather than a
    text value (a text `image` holding a URL must never be fetched).
    """
    body = await read_body(request, max_upload_bytes)
    if not body:
        raise RequestRejected(400, "empty_body", f"empty request body: send multipart/form-data with a file field '{IMAGE_FIELD}'")
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise RequestRejected(
            415,
            "unsupported_media_type",
            f"Content-Type is {content_type or 'missing'!r}; send multipart/form-data with a file field "
            f"'{IMAGE_FIELD}' (curl -F {IMAGE_FIELD}=@slice.png ...)",
        )
    try:
        form = await Request(request.scope, replay(body)).form(max_files=4, max_fields=16)
    except Exception as exc:  # starlette raises MultiPartException / ValueError / KeyError on garbage
        raise RequestRejected(400, "malformed_multipart", f"the multipart body could not be parsed: {exc}") from None
    try:
        images = form.getlist(IMAGE_FIELD)
        others = sorted({k for k in form.keys() if k != IMAGE_FIELD})
        if not images:
            raise RequestRejected(
                400, "missing_field", f"multipart field '{IMAGE_FIELD}' is missing (got fields {others}); send the file as '{IMAGE_FIELD}'"
            )
        if others:
            raise RequestRejected(400, "unexpected_field", f"unexpected multipart fields {others}; send only '{IMAGE_FIELD}'")
        if len(images) > 1:
            raise RequestRejected(400, "too_many_files", f"{len(images)} files in field '{IMAGE_FIELD}'; send one image per request")
        upload = images[0]
        if not isinstance(upload, UploadFile):
            raise RequestRejected(
                400,
                "not_a_file",
                f"field '{IMAGE_FIELD}' is a text value, not a file upload (curl -F {IMAGE_FIELD}=@slice.png: note the @)",
            )
        if upload.size is not None and upload.size > max_upload_bytes:
            raise RequestRejected(413, "too_large", f"image has {upload.size} bytes; the limit is {max_upload_bytes}")
        return await upload.read()
    finally:
        await form.close()
