"""serve.py's HTTP side (FastAPI, run by uvicorn): inspect, health, model, the review page.

Endpoints (docs/live_inspection.md):
  POST /inspect            the image as the body (application/octet-stream or image/*) or as the
                           multipart field `image`; ?pictures=true adds the overlay and mask PNGs
  GET  /health             200 once the model is loaded: the model in use, batching, memory
  GET  /model              the model's description and the thresholds in force
  GET  /                   the review page; POST /review/<id> records a correction
  GET  /pictures/<id>/overlay.png, /pictures/<id>/mask.png
Bad input is a 4xx with a JSON `error` line; the server goes on serving.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hmac
import io
import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from PIL import Image
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from anomaly_model.files import storage_message
from dataset_manager import DataError, printable_path
from pipeline.inspection import Inspection, Inspector, PreparedImage
from pipeline.live import BatchingWorker, ModelHolder, log, process_memory_mb
from pipeline.pictures import png_bytes
from pipeline.review_page import LABELS, RecentImages, render_page, render_refusal
from pipeline.watching import FolderWatcher
from settings import SettingsError

ACCEPTED_TYPES = "application/octet-stream, image/* or multipart/form-data (field `image`)"


def is_loopback(host: str) -> bool:
    """Whether `host` (SERVE_HOST) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from the network


def check_exposure(host: str, token: str) -> None:
    """Bound to anything but loopback, the server must have a token: refuse to start without one."""
    if not is_loopback(host) and not token:
        raise SettingsError(
            f"SERVE_HOST={host!r} is reachable from other machines: set SERVE_TOKEN=<a secret> (every inspect and "
            "correction request must then carry it), or serve on 127.0.0.1"
        )


class RequestError(Exception):
    """A bad request: its HTTP status and the one-line `error` the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


INSPECT_QUERY = {"pictures", "token"}  # the query parameters POST /inspect reads
YES, NO = ("true", "1", "yes", "on"), ("false", "0", "no", "off")  # the values ?pictures= takes, in any case
BODY_SECONDS = 60.0  # a request body must have arrived within this: a stalled client does not hold a connection for ever


def pictures_wanted(request: Request) -> bool:
    """?pictures=true (1, yes, on) or false (0, no, off), given at most once; anything else is a 400."""
    values = request.query_params.getlist("pictures")
    if len(values) > 1:
        raise RequestError(400, f"pictures is given {len(values)} times: give it once (pictures=true or pictures=false)")
    if not values:
        return False
    value = values[0].strip().lower()
    if value not in YES + NO:
        raise RequestError(400, f"pictures={printable_path(values[0])!r} is not allowed: give pictures=true or pictures=false")
    return value in YES


@dataclass(frozen=True)
class RequestLimits:
    """How much one image may take: bytes received (SERVE_MAX_BYTES) and pixels decoded
    (SERVE_MAX_PIXELS; a few kilobytes of PNG can claim gigabytes once decoded)."""

    max_bytes: int
    max_pixels: int

    def check_pixels(self, data: bytes, name: str) -> None:
        """A DataError when the image's header claims more than `max_pixels`; reads the header only
        (what cannot be opened is left to the decoder, which names the problem)."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception:  # noqa: BLE001 - not an image the header reader knows: the decoder says why
            return
        if width * height > self.max_pixels:
            raise DataError(f"cannot read {name}: it is {width} x {height} pixels, over SERVE_MAX_PIXELS={self.max_pixels}: "
                            "send a smaller image, or raise SERVE_MAX_PIXELS if the server has the memory")


@dataclass
class LiveService:
    """Everything one serve.py process runs: the model, the batching worker, the latest images,
    the watched folder (or None), and the request limits."""

    holder: ModelHolder
    worker: BatchingWorker
    recent: RecentImages
    limits: RequestLimits
    token: str = ""
    watcher: FolderWatcher | None = None
    started: float = field(default=0.0)

    def prepare(self, data: bytes, name: str) -> PreparedImage:
        """Decode and preprocess with the model in use (the worker prepares again if it changed meanwhile),
        once the header says the image is within `limits.max_pixels`."""
        self.limits.check_pixels(data, name)
        return self.holder.current.prepare(data, name)

    def notify(self, source: str):
        def add(name: str, data: bytes, inspection: Inspection, inspector: Inspector) -> str:
            return self.recent.add(source, name, data, inspection, inspector)

        return add

    def health(self) -> dict:
        inspector = self.holder.current
        watch = None
        if self.watcher is not None:
            watch = {"folder": printable_path(self.watcher.folder), "running": self.watcher.running, "inspected": self.watcher.n_inspected,
                     "unreadable": self.watcher.n_unreadable, "problem": self.watcher.problem}
        status = "ok"
        if watch is not None and not watch["running"]:
            status = "the folder watcher stopped: see the log, restart serve.py"
        elif watch is not None and watch["problem"]:
            status = f"the folder watcher is waiting: {watch['problem']}"
        return {
            "status": status,
            "model": inspector.model_id,
            "model_name": inspector.name,
            "runtime": inspector.detector.runtime,
            "note": self.holder.note,
            "batches": self.worker.n_batches,
            "images": self.worker.n_images,
            "mean_batch_size": round(self.worker.mean_batch_size, 3),
            "rss_mb": round(process_memory_mb(), 1),
            "watch": watch,
        }

    def token_ok(self, request: Request, form_token: str | None = None) -> bool:
        """No token configured, or the request carries it (Authorization: Bearer, X-Token, ?token= or a form field)."""
        if not self.token:
            return True
        header = request.headers.get("authorization", "")
        offered = (
            header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-token") or request.query_params.get("token") or form_token or ""
        )
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def require_token(self, request: Request, how: str = "send Authorization: Bearer <SERVE_TOKEN>") -> None:
        """A 401 RequestError unless `token_ok`; `how` says how to send it."""
        if not self.token_ok(request):
            raise RequestError(401, f"this server needs its token: {how}")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (before reading it all
    when Content-Length says so)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(413, f"the body is {int(length)} bytes, over SERVE_MAX_BYTES={limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_SECONDS):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"the body is over SERVE_MAX_BYTES={limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"the body did not arrive within {BODY_SECONDS:g} s ({size} bytes came): send it whole, at once") from None
    return b"".join(chunks)


async def _image_bytes(request: Request, limit: int) -> tuple[bytes, str]:
    """The image's bytes and the name to show for it, from a raw body or a multipart field `image`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (content_type == "application/octet-stream" or content_type.startswith("image/") or content_type == "multipart/form-data"):
        raise RequestError(415, f"content type {content_type or '(none)'!r} is not accepted: send {ACCEPTED_TYPES}")
    body = await _read_body(request, limit)
    if content_type != "multipart/form-data":
        if not body:
            raise RequestError(400, "the body is empty: send the image file's bytes")
        return body, "(request body)"
    request._body = body  # starlette parses the form from the body already read (and capped) above
    try:
        form = await request.form(max_files=1, max_fields=10)
    except Exception as error:  # malformed multipart: the parser's own words
        words = " ".join(str(getattr(error, "detail", error)).split())
        if "Too many files" in words:
            words = "it holds more than one file: send one, in the field `image`"
        raise RequestError(400, f"the multipart body cannot be read: {words}") from None
    upload = form.get("image")
    if isinstance(upload, str):  # a part without a filename (or with RFC 7578's filename* only) is a text field
        raise RequestError(400, "the multipart field `image` is not a file: send it with a filename, as curl -F image=@part.png does")
    if upload is None:
        raise RequestError(400, "the multipart body has no file field `image`")
    data = await upload.read()
    if not data:
        raise RequestError(400, "the multipart field `image` is empty: send the image file's bytes")
    shown = "".join(c if c.isprintable() else "?" for c in printable_path(upload.filename or ""))  # a NUL or newline only for show
    return data, shown or "(multipart field image)"


def create_app(service: LiveService) -> FastAPI:
    """The FastAPI application serving `service`."""
    app = FastAPI(title="Defect inspection", docs_url=None, redoc_url=None, openapi_url=None)
    # the multipart parser logs each malformed body as a bare warning line ("Expected boundary
    # character ..."); the client's 400 already says it, and the server's log keeps its own lines
    logging.getLogger("python_multipart").setLevel(logging.ERROR)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:  # an unknown path, a wrong method
        return JSONResponse({"error": f"{request.method} {request.url.path}: {error.detail}"}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:  # FastAPI's own checks: one line too
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"error": f"{request.method} {request.url.path}: {where}: {first.get('msg', 'not valid')}"}, status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, error: ClientDisconnect) -> Response:  # nobody to answer: one log line, no traceback
        log(f"a client disconnected before its {request.method} {request.url.path} body was complete")
        return Response(status_code=400)

    @app.post("/inspect")
    async def inspect(request: Request) -> JSONResponse:
        service.require_token(request)
        unknown = sorted(set(request.query_params) - INSPECT_QUERY)
        if unknown:  # a misspelt option (?picture=true) would otherwise be ignored without a word
            raise RequestError(400, f"unknown query parameter {unknown[0]!r}: /inspect takes {', '.join(sorted(INSPECT_QUERY))}")
        pictures = pictures_wanted(request)
        data, name = await _image_bytes(request, service.limits.max_bytes)
        try:
            prepared = await run_in_threadpool(service.prepare, data, name)
        except DataError as error:
            raise RequestError(422, " ".join(str(error).split())) from None
        inspector, inspection = await asyncio.wrap_future(service.worker.submit(prepared))
        image_id = service.recent.add("http", name, data, inspection, inspector)
        answer = {**inspection.fields(), "id": image_id}
        if pictures:
            overlay, mask = await asyncio.wrap_future(service.worker.call(inspector.pictures, inspection, prepared.rgb, 640))
            answer["overlay_png"] = base64.b64encode(png_bytes(overlay)).decode()
            answer["mask_png"] = base64.b64encode(png_bytes(mask)).decode()
        return JSONResponse(answer)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what monitoring probes send
    async def health() -> JSONResponse:
        return JSONResponse(service.health())

    @app.api_route("/model", methods=["GET", "HEAD"])
    async def model(request: Request) -> JSONResponse:
        service.require_token(request)
        return JSONResponse(service.holder.current.description())

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def review(request: Request) -> HTMLResponse:
        if not service.token_ok(request):  # the page shows the inspected parts: as private as inspecting them
            return HTMLResponse(render_refusal(), status_code=401)
        inspector = service.holder.current
        model_line = f"model {inspector.name} ({inspector.model_id[:12]}, {inspector.detector.runtime})"
        return HTMLResponse(render_page(service.recent, model_line, service.token, service.holder.note))  # the request proved it holds it

    @app.post("/review/{image_id}")
    async def correct(request: Request, image_id: str) -> Response:
        form = await request.form(max_files=0, max_fields=5)
        if not service.token_ok(request, str(form.get("token") or "")):
            raise RequestError(401, "corrections need the server's token: open the page as /?token=<SERVE_TOKEN>")
        label = str(form.get("label") or "")
        if label not in LABELS:
            how = "" if label else " (send it as a form field: label=good or label=defect, as the page's buttons do)"
            raise RequestError(400, f"label {label!r} is not one of {', '.join(LABELS)}{how}")
        image = service.recent.get(image_id)
        if image is None:
            raise RequestError(404, f"no image {image_id!r}: unknown, or no longer kept (only the latest {service.recent.keep} are)")
        try:
            await run_in_threadpool(service.recent.correct, image, label)
        except OSError as error:  # REVIEW_DIR full or read-only: the reviewer's click must not vanish into a 500 page
            status = 507 if error.errno in (errno.ENOSPC, errno.EDQUOT) else 500
            raise RequestError(status, f"the correction was not saved: {storage_message(error, service.recent.review_dir / label)}") from None
        token = request.query_params.get("token") or str(form.get("token") or "")
        location = f"/?token={quote(token, safe='')}#image-{image_id}" if token else f"/#image-{image_id}"
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"id": image_id, "label": label})
        return RedirectResponse(location, status_code=303)

    @app.api_route("/pictures/{image_id}/{kind}", methods=["GET", "HEAD"])
    async def picture(request: Request, image_id: str, kind: str) -> Response:
        service.require_token(request, "open the review page as /?token=<SERVE_TOKEN>")
        image = service.recent.get(image_id)
        if image is None or kind not in ("overlay.png", "mask.png"):
            raise RequestError(404, f"no picture {kind!r} of image {image_id!r} (only the latest {service.recent.keep} images are kept)")
        draw = service.recent.overlay if kind == "overlay.png" else service.recent.mask
        return Response(await run_in_threadpool(draw, image), media_type="image/png")

    return app


def model_results_dir(results_dir: str, inspector: Inspector) -> Path:
    """RESULTS_DIR/<model name>, where test.py writes too."""
    return Path(results_dir) / inspector.name
