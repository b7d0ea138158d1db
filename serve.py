"""Serve: keep a model loaded and inspect images as they arrive, over HTTP and from a watched folder.

    python serve.py [KEY=VALUE ...]

Loads the model test.py would use (MODEL_DIR, MODEL_NAME, RUNTIME) once and serves on
SERVE_HOST:SERVE_PORT: POST /inspect, GET /health, GET /model, and the review page at /.
WATCH_DIR=<folder> also inspects every image that lands there (RESULTS_DIR/<model>/live-<date>/).
IMAGE_FALSE_REJECT_RATE / CLASSIFIER_FALSE_REJECT_RATE on the command line move the operating
point. Ctrl-C or SIGTERM finishes the image in hand and stops. See docs/live_inspection.md.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import uvicorn

from anomaly_model import distributed
from anomaly_model.files import check_writable
from pipeline.cli import chosen_model_dir, run
from pipeline.inspection import OperatingPoint, load, training_only_notes
from pipeline.live import BatchingWorker, ModelHolder, claim_folder, log
from pipeline.review_page import RecentImages
from pipeline.serving import LiveService, RequestLimits, check_exposure, create_app, model_results_dir
from pipeline.watching import FolderWatcher, WatchSettings
from settings import SettingsError
from settings import load as load_settings


def _listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so a taken port is one line, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by each connection: no delayed-ACK stall between response parts
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise SettingsError(f"cannot listen on {host}:{port} ({error.strerror or error}): choose another SERVE_PORT or SERVE_HOST") from None
    sock.listen(128)
    return sock


def main(argv: list[str]) -> None:
    settings, extra = load_settings(argv)
    if extra:
        raise SettingsError(f"serve.py takes only KEY=VALUE settings, not {extra[0]!r}")
    if distributed.active():  # every rank would bind the same port: the second's "address in use" would mislead
        raise SettingsError("serve.py runs as one process (it batches requests itself): start it with python serve.py, not torchrun")
    check_exposure(settings.SERVE_HOST, settings.SERVE_TOKEN)
    # held until the process ends: two servers of different models sharing REVIEW_DIR mixed their
    # corrections (each teaches its own model) and could overwrite each other's
    review = Path(settings.REVIEW_DIR)
    claim_folder(review, "REVIEW_DIR", f"REVIEW_DIR={review} is used by another serve.py: give each server its own REVIEW_DIR "
                         "(its corrections teach that server's model)")
    model_dir = chosen_model_dir(settings, "to say which model serves,")
    point = OperatingPoint.from_command_line(argv, settings)

    def load_model(folder: Path):
        return load(folder, settings.DEVICE, settings.RUNTIME, point, settings.BATCH_SIZE)

    worker = BatchingWorker(settings.SERVE_THREADS)
    holder = worker.start(lambda: ModelHolder(model_dir, load_model))  # loaded on the worker's thread: see BatchingWorker
    holder.current.detector.report_differences(settings)
    for line in [*training_only_notes(argv), *holder.current.notes]:
        log(line)
    recent = RecentImages(settings.SERVE_RECENT, Path(settings.REVIEW_DIR), worker.pictures)
    limits = RequestLimits(settings.SERVE_MAX_BYTES, settings.SERVE_MAX_PIXELS)
    service = LiveService(holder, worker, recent, limits, settings.SERVE_TOKEN, started=time.time())
    if settings.WATCH_DIR:
        watch = WatchSettings(
            Path(settings.WATCH_DIR), settings.WATCH_SORT, settings.WATCH_SETTLE_SECONDS,
            model_results_dir(settings.RESULTS_DIR, holder.current), settings.SAVE_PICTURES,
        )
        check_writable(watch.model_results)  # its rows and pictures: refused now, not at the first file
        service.watcher = FolderWatcher(watch, service.prepare, worker, service.notify("folder"))
    sock = _listening_socket(settings.SERVE_HOST, settings.SERVE_PORT)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False, timeout_graceful_shutdown=30))
    received = []
    # uvicorn stops on SIGINT / SIGTERM and hands the signal back afterwards: recorded here, so the
    # worker and the watcher are stopped below and the process exits 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: received.append(number))
    if service.watcher is not None:
        service.watcher.start()
    host = f"[{settings.SERVE_HOST}]" if ":" in settings.SERVE_HOST else settings.SERVE_HOST  # an IPv6 address, as a URL writes it
    first = holder.current  # not kept: a name held here for the server's life kept the first model in memory after every swap
    log(f"serving model {first.name} ({first.model_id[:12]}, {first.detector.runtime}) on http://{host}:{sock.getsockname()[1]}/")
    del first
    try:
        server.run(sockets=[sock])
    finally:
        if service.watcher is not None:
            service.watcher.stop()  # the file in hand is finished first
        worker.stop()
        sock.close()
    log(f"stopped: {worker.n_images} images in {worker.n_batches} batches (mean batch size {worker.mean_batch_size:.2f})")


if __name__ == "__main__":
    run(main)
