"""What serve.py keeps running: the model in use (switched when a new one is saved in its folder)
and one worker thread that scores queued images in batches (and runs serve.py's other torch work).

Requests and the watched folder decode and preprocess their images in their own threads
(`Inspector.prepare`) and queue them here; the worker takes whatever is queued (up to the model's
batch size) and scores it together, so concurrent requests share one backbone pass while one image
alone goes straight through. Between batches it checks whether the model folder changed (a
retrain or export swaps it atomically) and switches, so no batch mixes two models and no request
is dropped; a new model that cannot be loaded keeps the old one serving and says why.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.inspection import Inspection, Inspector, PictureDrawer, PreparedImage
from settings import SettingsError

try:
    import fcntl
except ImportError:  # not POSIX: no claim on a folder
    fcntl = None

IDLE_CHECK_SECONDS = 1.0  # how often an idle worker looks for a new model in the folder


def claim_folder(folder: Path, setting: str, refusal: str) -> int | None:
    """An open descriptor of `folder` (made if missing) holding an exclusive lock on it (no file is
    added to it), or a SettingsError saying `refusal` when another process holds it: one serve.py
    per watched folder and per review folder. The kernel drops the lock when the descriptor is
    closed or the process dies. None without POSIX locks. A folder that cannot be made or opened
    (a file there, no permission) is one line naming `setting`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return None
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise SettingsError(f"{setting}={folder} cannot be used as a folder ({error.strerror or error}"
                            f"{': ' + str(error.filename) if error.filename and str(error.filename) != str(folder) else ''}): give a folder") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise SettingsError(refusal) from None
    return descriptor


def log(line: str) -> None:
    """One line of the server's log (stderr), with the time."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _folder_signature(model_dir: Path) -> tuple[int, int, int] | None:
    """What changes when model.json is replaced (train.py's atomic swap, export.py's rewrite): None while absent."""
    try:
        stat = (model_dir / "model.json").stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class ModelHolder:
    """The Inspector in use, switched to the model saved later in the same folder."""

    def __init__(self, model_dir: Path, load_model: Callable[[Path], Inspector]) -> None:
        self.model_dir = Path(model_dir)
        self._load = load_model
        self.signature = _folder_signature(self.model_dir)
        self.current = load_model(self.model_dir)
        self.note = ""  # why a newer model in the folder is not the one in use ("" when it is)
        self._refused: tuple | None = None  # signature of the model.json that could not be loaded
        self._gone = False  # model.json vanished from the folder (deleted or moved away): said once

    def refresh(self) -> Inspector:
        """The model to score the next batch with: a new one when the folder changed and it loads."""
        signature = _folder_signature(self.model_dir)
        if signature is None:
            if not self._gone:  # an atomic swap never shows this: the folder was deleted or moved
                self._gone = True
                self.note = f"{self.model_dir} holds no model now (deleted or moved?); still serving {self.current.model_id[:12]} until one is saved there"
                log(f"WARNING: {self.note}")
            return self.current
        if self._gone:
            self._gone = False
            self.note = "" if signature == self.signature else self.note
            log(f"{self.model_dir} holds a model again" + (f": the same one, {self.current.model_id[:12]}, still serving" if signature == self.signature else ""))
        if signature == self.signature or signature == self._refused:
            return self.current
        try:
            new = self._load(self.model_dir)
        except Exception as error:  # any failure, a damaged file's included: the old model serves on
            self._refused = signature
            self.note = f"the model saved in {self.model_dir} could not be loaded ({' '.join(str(error).split())}); still serving {self.current.model_id[:12]}"
            log(f"WARNING: {self.note}")
            return self.current
        old = self.current
        self.current, self.signature, self.note, self._refused = new, signature, "", None
        if new.model_id == old.model_id:  # model.json rewritten, the model the same (export.py adds its ONNX file)
            log(f"reloaded model {self.model_dir.name}: {new.model_id[:12]}, unchanged ({new.detector.runtime})")
        else:
            log(f"switched model {self.model_dir.name}: {old.model_id[:12]} -> {new.model_id[:12]}")
        for line in new.notes:
            log(line)
        return new


@dataclass
class _Job:
    prepared: PreparedImage
    future: Future  # -> (Inspector that judged it, Inspection)


@dataclass
class _Call:
    function: Callable[[], object]  # torch work for another thread (pictures), run between batches
    future: Future  # -> what it returns


class BatchingWorker:
    """One thread that loads the model and scores queued images, several at a time when they
    arrive together.

    Torch's parallel work runs on this thread only, the model's loading and the pictures' map
    resizing included (`call`): while another living thread had run a parallel region, OpenMP
    (libgomp) ran this one's at about half speed on the 2-core machine (the MobileNetV2 backbone
    17.8 against 7.5 ms per image when serve.py loaded the model on its main thread; one client's
    latency 28.7 -> 40.6 ms after one picture was drawn in a request thread; docs/live_inspection.md)."""

    def __init__(self, threads: int = 0) -> None:
        self.holder: ModelHolder | None = None  # set by `start`
        self.threads = threads  # torch's CPU threads for scoring (SERVE_THREADS), set once in the worker; 0 = torch's default
        self._queue: queue.Queue[_Job | _Call | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.n_batches = 0
        self.n_images = 0
        self._lock = threading.Lock()

    def start(self, make_holder: Callable[[], ModelHolder]) -> ModelHolder:
        """Starts the thread, which first builds the holder (loads the model) with `make_holder`;
        returns it once loaded, or raises here what loading raised (the thread has then ended)."""
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(make_holder, loaded), name="inspection-worker", daemon=True)
        self._thread.start()
        self.holder = loaded.result()
        return self.holder

    def submit(self, prepared: PreparedImage) -> "Future[tuple[Inspector, Inspection]]":
        future: Future = Future()
        self._queue.put(_Job(prepared, future))
        return future

    def call(self, function: Callable[..., object], *args) -> Future:
        """Runs `function(*args)` on this thread, after the batch in hand: torch work that other
        threads would otherwise run themselves (the pictures' map resizing)."""
        future: Future = Future()
        self._queue.put(_Call(lambda: function(*args), future))
        return future

    def pictures(self, drawer: PictureDrawer, inspection: Inspection, rgb: np.ndarray, preview_size: int) -> tuple[np.ndarray, np.ndarray]:
        """`PictureDrawer.pictures`, computed on this thread; waits for it."""
        return self.call(drawer.pictures, inspection, rgb, preview_size).result()

    def stop(self) -> None:
        """Score what is queued, then end the thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=120)

    @property
    def mean_batch_size(self) -> float:
        with self._lock:
            return self.n_images / self.n_batches if self.n_batches else 0.0

    def _run(self, make_holder: Callable[[], ModelHolder], loaded: Future) -> None:
        if self.threads:  # once, here: request threads run no torch operations (their preprocessing is numpy)
            torch.set_num_threads(self.threads)
        try:
            self.holder = make_holder()
        except BaseException as error:  # serve.py's main thread reports it and exits
            loaded.set_exception(error)
            return
        loaded.set_result(self.holder)
        stopping = False
        while not stopping:
            try:
                job = self._queue.get(timeout=IDLE_CHECK_SECONDS)
            except queue.Empty:
                self.holder.refresh()  # idle: a swapped model is loaded now, and /health names it
                continue
            if job is None:
                break
            jobs, calls = [], []
            limit = self.holder.current.batch_size
            while job is not None:  # whatever else is already waiting joins this batch; nothing waits for more
                (calls if isinstance(job, _Call) else jobs).append(job)
                if len(jobs) >= limit:
                    break
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                stopping = job is None
            if jobs:
                self._score(jobs)
            for call in calls:
                self._run_call(call)

    @staticmethod
    def _run_call(call: _Call) -> None:
        try:
            call.future.set_result(call.function())
        except Exception as error:  # answered to the caller; the worker goes on
            call.future.set_exception(error)

    def _score(self, jobs: list[_Job]) -> None:
        inspector = self.holder.refresh()
        try:
            results = inspector.score([job.prepared for job in jobs])
        except Exception as error:  # a failure of this batch answers its requests; the worker goes on
            for job in jobs:
                job.future.set_exception(error)
            return
        with self._lock:
            self.n_batches += 1
            self.n_images += len(jobs)
        for job, result in zip(jobs, results):
            job.future.set_result((inspector, result))


def process_memory_mb() -> float:
    """Resident memory of this process now, in MB (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError):
        return 0.0
