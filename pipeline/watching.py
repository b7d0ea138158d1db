"""serve.py's watched folder: every image that lands in WATCH_DIR is inspected once, whole.

A file counts as completely written once its size and modification time have not changed for
WATCH_SETTLE_SECONDS (a camera or a copy still writing keeps changing them). One that cannot be
decoded then is tried again while it keeps still, and reported unreadable only after five times
that long, so a writer that pauses is not caught half-way.

Exactly once across restarts: a ledger (RESULTS_DIR/<model>/live-ledger.jsonl) records each file
by name, size, modification time and content hash, with its row, before the row is written; a
restart skips what the ledger holds and scores the rest (a new file reusing an old name differs in
one of them), and first writes the last entry's row again if a kill came between the two.
Rows go to RESULTS_DIR/<model>/live-<date>/predictions.csv (test.py's columns plus `error`), each
appended whole and flushed to disk, so a crash loses no row of a file the ledger holds; pictures go beside
it as test.py writes them. With WATCH_SORT the file then moves into good/, defect/ or unreadable/
inside WATCH_DIR, which the watcher does not descend into.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

from anomaly_model.files import storage_message
from dataset_manager import IMAGE_EXTENSIONS, DataError, printable_path
from dataset_manager.layouts import SORTED_FOLDERS
from pipeline.inspection import Inspection, Inspector, PreparedImage
from pipeline.live import BatchingWorker, claim_folder, log
from pipeline.prediction import COLUMNS, PREVIEW_SIZE, csv_values
from pipeline.pictures import write_pictures

LIVE_COLUMNS = COLUMNS + ["model", "error"]  # model: the id of the model that judged the file (it may change under the server)
UNREADABLE_PATIENCE = 5  # an undecodable file is given up after this many settle times of keeping still
GROUP = 8  # files read and queued together: the worker scores them as one batch
RESULTS_RETRY_SECONDS = 5.0  # how often a watcher whose results cannot be written tries again (each try scores a file)
NAME_BYTES = 255  # the longest file name most file systems take


class ResultsUnwritable(Exception):
    """The results folder refused a row or a picture (full, read-only): the file is tried again later, not skipped."""


@dataclass(frozen=True)
class FileState:
    """What identifies one version of a file in the folder."""

    name: str
    size: int
    mtime_ns: int


class Ledger:
    """The files already inspected (one JSON line each, appended and flushed to disk)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._records: dict[tuple, str] = {}  # (name, size, mtime_ns, sha256) -> verdict
        self.last: dict | None = None  # the last whole entry: its row may be missing after a kill (`LiveResults.restore`)
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self._records[(entry["name"], entry["size"], entry["mtime_ns"], entry["sha256"])] = entry["verdict"]
                    self.last = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash: its file is scored again

    def verdict(self, state: FileState, sha256: str) -> str | None:
        return self._records.get((state.name, state.size, state.mtime_ns, sha256))

    def add(self, state: FileState, sha256: str, verdict: str, row: tuple[Path, str]) -> None:
        """The file as done, with (the predictions file, its row as CSV text) that is written next."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"name": state.name, "size": state.size, "mtime_ns": state.mtime_ns, "sha256": sha256, "verdict": verdict, "at": time.time(),
                 "csv": str(row[0]), "row": row[1]}
        with open(self.path, "a") as file:
            file.write(json.dumps(entry) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self._records[(state.name, state.size, state.mtime_ns, sha256)] = verdict


class LiveResults:
    """RESULTS_DIR/<model>/live-<date>/: predictions.csv rows appended whole, and the pictures."""

    def __init__(self, model_results: Path) -> None:
        self.root = Path(model_results)

    def folder(self) -> Path:
        return self.root / f"live-{date.today().strftime('%Y%m%d')}"

    def row(self, values: list[str]) -> tuple[Path, str]:
        """(the predictions file of today the row goes to, the row as CSV text): what the ledger keeps."""
        folder = self.folder()
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        csv.writer(buffer).writerow(values)
        return self._csv(folder), buffer.getvalue()

    @staticmethod
    def write(path: Path, text: str) -> None:
        """One row, written in one call and flushed to disk; the header starts a new file."""
        path = Path(path)
        if not path.exists() or path.stat().st_size == 0:
            buffer = io.StringIO()
            csv.writer(buffer).writerow(LIVE_COLUMNS)
            text = buffer.getvalue() + text
        with open(path, "a", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())

    def restore(self, entry: dict) -> bool:
        """The ledger's last entry's row, written again when its predictions file does not end with
        it (a kill between the ledger entry and the row); True when it was missing."""
        path, text = Path(entry.get("csv", "")), entry.get("row")
        if not isinstance(text, str) or not entry.get("csv"):
            return False  # an entry of an older version, written after its row
        if path.exists():
            with open(path, newline="") as file:
                if file.read().endswith(text):
                    return False
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write(path, text)
        return True

    @staticmethod
    def _csv(folder: Path) -> Path:
        """predictions.csv, or predictions-2.csv, -3, ... when a file of that day has other columns
        (written by an older version): rows are never appended under a header they do not match."""
        header = ",".join(LIVE_COLUMNS)
        for number in range(1, 1000):
            path = folder / ("predictions.csv" if number == 1 else f"predictions-{number}.csv")
            if not path.exists() or path.stat().st_size == 0:
                return path
            with open(path, newline="") as file:
                if file.readline().rstrip("\r\n") == header:
                    return path
        raise OSError(f"{folder} holds 999 predictions files with other columns: move them away")


@dataclass
class _Ready:
    state: FileState
    data: bytes
    sha256: str
    still_for: float  # seconds the file has kept still
    prepared: PreparedImage | None = None
    future: Future | None = None
    error: str = ""


# what the watcher calls to inspect: (bytes, shown name) -> a prepared image (DataError when undecodable)
Prepare = Callable[[bytes, str], PreparedImage]
# told of each inspected file: (shown name, bytes, inspection, inspector)
Notify = Callable[[str, bytes, Inspection, Inspector], None]


@dataclass
class WatchSettings:
    folder: Path
    sort: bool
    settle_seconds: float
    model_results: Path  # RESULTS_DIR/<model name>
    pictures: bool  # SAVE_PICTURES


class FolderWatcher:
    """Polls the folder in a thread; `stop()` lets the file in hand finish, then ends."""

    def __init__(self, settings: WatchSettings, prepare: Prepare, worker: BatchingWorker, notify: Notify) -> None:
        self.settings = settings
        self.folder = Path(settings.folder)
        self._prepare, self._notify = prepare, notify
        self._worker = worker  # scores the files, and makes their pictures (torch runs on its thread only)
        # before anything is read: a second watcher would inspect every file twice (each keeps its own pending files)
        self._claim = claim_folder(self.folder, "WATCH_DIR", f"WATCH_DIR={self.folder} is watched by another serve.py: one server per watched folder "
                                                "(stop it, or give another WATCH_DIR)")
        self.ledger = Ledger(settings.model_results / "live-ledger.jsonl")
        self.results = LiveResults(settings.model_results)
        if self.ledger.last is not None and self.results.restore(self.ledger.last):
            log(f"wrote the row of {printable_path(self.ledger.last['name'])} again: the last run was stopped between its ledger entry and its row")
        self._pending: dict[str, tuple[FileState, float]] = {}  # name -> (state last seen, since when unchanged)
        self._links_noted: set[str] = set()  # links are not followed: each named once in the log
        self._said: set[str] = set()  # warnings that would repeat at every poll: each said once
        self._problem: tuple[str, str] | None = None  # (what keeps it from inspecting, the line once it is over): said when each happens
        self._done: dict[str, FileState] = {}  # the files in the folder inspected in the version they have now
        self._numbered: dict[tuple[str, str], int] = {}  # (verdict, name) -> the next number to try for a name taken in its folder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="folder-watcher", daemon=True)
        self.n_inspected = 0
        self.n_unreadable = 0
        self.poll_seconds = min(0.5, settings.settle_seconds / 2)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.settings.sort:
            for name in SORTED_FOLDERS:
                (self.folder / name).mkdir(exist_ok=True)
        self._thread.start()
        log(f"watching {self.folder} (files unchanged for {self.settings.settle_seconds:g} s are inspected; rows in {self.results.folder()})")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=300)
        if self._claim is not None:
            os.close(self._claim)  # the kernel drops the lock (and does so for a killed process too)
            self._claim = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
                if self._problem is not None:
                    log(self._problem[1])
                    self._problem = None
            except ResultsUnwritable as error:  # RESULTS_DIR full or read-only: the file waits, unscored, until rows can be written
                self._meet(f"cannot write the results in {self.results.folder()} ({error}): files in {self.folder} wait until "
                           f"they can be written (looking again every {RESULTS_RETRY_SECONDS:g} s)", "the results can be written again")
                self._stop.wait(RESULTS_RETRY_SECONDS)  # not every poll: each try scores an image again
            except OSError as error:  # the folder vanished or a disk filled: say so once, keep watching
                self._meet(f"watched folder {self.folder}: {error}; looking again every {self.poll_seconds:g} s",
                           f"watched folder {self.folder} can be read again")
            except Exception as error:  # a fault of ours must not silently end the watching: said once per kind, watching goes on
                self._say_once(f"WARNING: the watcher of {self.folder} met an error ({type(error).__name__}: {' '.join(str(error).split())}); it keeps watching")
            self._stop.wait(self.poll_seconds)

    def _meet(self, problem: str, recovered: str) -> None:
        """A problem that keeps the watcher from inspecting: logged when it begins (or changes), and
        `recovered` logged once a poll succeeds again."""
        if self._problem is None or self._problem[0] != problem:
            log(f"WARNING: {problem}")
        self._problem = (problem, recovered)

    def _say_once(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            log(line)

    @property
    def problem(self) -> str | None:
        """What keeps the watcher from inspecting (the folder unreadable, the results unwritable), None when nothing: /health says it."""
        return self._problem[0] if self._problem else None

    @property
    def running(self) -> bool:
        """Whether the watching thread is alive (/health says so)."""
        return self._thread.is_alive()

    def _listing(self) -> dict[str, FileState]:
        states = {}
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        if entry.is_symlink() and entry.name not in self._links_noted:
                            self._links_noted.add(entry.name)
                            log(f"note: {entry.name} in {self.folder} is a link: not inspected (copy or move the image itself into the folder)")
                        continue
                    stat = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                states[entry.name] = FileState(entry.name, stat.st_size, stat.st_mtime_ns)
        return states

    def poll(self) -> None:
        """One look at the folder: inspect the files that have kept still long enough."""
        now = time.monotonic()
        states = self._listing()
        for remembered in (self._pending, self._done):  # files moved or removed: forgotten (the ledger knows them if they come back)
            for name in [name for name in remembered if name not in states]:
                del remembered[name]
        ready: list[tuple[FileState, float]] = []
        for name in sorted(states):
            state = states[name]
            if self._done.get(name) == state:
                continue
            seen = self._pending.get(name)
            if seen is None or seen[0] != state:
                self._pending[name] = (state, now)
            elif now - seen[1] >= self.settings.settle_seconds:
                ready.append((state, now - seen[1]))
        for start in range(0, len(ready), GROUP):
            if self._stop.is_set():
                return
            self._inspect_group(ready[start : start + GROUP])

    def _read(self, state: FileState, still_for: float) -> _Ready | None:
        path = self.folder / state.name
        try:
            data = path.read_bytes()
            stat = path.stat()
        except FileNotFoundError:
            return None  # removed meanwhile
        except OSError as error:  # no read permission, an I/O error: said once, read when it can be
            self._say_once(f"WARNING: cannot read {printable_path(state.name)} in the watched folder ({error.strerror or error}): "
                           "it is inspected once it can be read")
            return None
        if (len(data), stat.st_size, stat.st_mtime_ns) != (state.size, state.size, state.mtime_ns):
            self._pending.pop(state.name, None)  # still changing after all: start its wait again
            return None
        return _Ready(state, data, hashlib.sha256(data).hexdigest(), still_for)

    def _inspect_group(self, group: list[tuple[FileState, float]]) -> None:
        items = []
        for state, still_for in group:
            item = self._read(state, still_for)
            if item is None:
                continue
            known = self.ledger.verdict(state, item.sha256)
            if known is not None:  # inspected before a restart
                self._finish(item, self._destination(self.folder / state.name, known))
                continue
            try:
                item.prepared = self._prepare(item.data, printable_path(state.name))
                item.future = self._worker.submit(item.prepared)
            except DataError as error:
                if still_for < UNREADABLE_PATIENCE * self.settings.settle_seconds:
                    continue  # maybe still being written by a writer that paused: look again later
                item.error = " ".join(str(error).split())
            items.append(item)
        for item in items:  # rows in folder order; stop between files
            self._record(item)
            if self._stop.is_set():
                return

    def _record(self, item: _Ready) -> None:
        path = self.folder / item.state.name
        if item.future is None:
            destination = self._destination(path, "unreadable")
            self._add_row(item, "unreadable", [printable_path(destination)] + [""] * (len(COLUMNS) - 1) + ["", item.error])
            self.n_unreadable += 1
            log(f"unreadable {item.state.name}: {item.error}")
            self._finish(item, destination)
            return
        try:
            inspector, inspection = item.future.result()
        except Exception as error:  # scoring failed (out of memory, ...): not recorded, tried again next poll
            log(f"WARNING: {item.state.name} could not be scored: {' '.join(str(error).split())}")
            self._pending.pop(item.state.name, None)
            return
        destination = self._destination(path, inspection.verdict)
        overlay_path = mask_path = ""
        if self.settings.pictures:
            pictures = self.results.folder() / "pictures"
            stem = f"{printable_path(Path(item.state.name).stem)}-{item.sha256[:8]}"
            arrays = self._worker.pictures(inspector.drawer, inspection, item.prepared.rgb, PREVIEW_SIZE)
            try:
                pictures.mkdir(parents=True, exist_ok=True)
                overlay_file, mask_file = write_pictures(pictures, stem, arrays)
            except OSError as error:
                raise ResultsUnwritable(storage_message(error, pictures)) from error
            overlay_path, mask_path = f"pictures/{overlay_file.name}", f"pictures/{mask_file.name}"
        self._add_row(item, inspection.verdict, csv_values(destination, inspection, overlay_path, mask_path) + [inspection.model, ""])
        self.n_inspected += 1
        self._notify(printable_path(item.state.name), item.data, inspection, inspector)
        self._finish(item, destination)

    def _add_row(self, item: _Ready, verdict: str, values: list[str]) -> None:
        """The ledger entry (with the row), then the row: a kill between them is mended at the next start."""
        try:
            csv_path, text = self.results.row(values)
            self.ledger.add(item.state, item.sha256, verdict, (csv_path, text))
            self.results.write(csv_path, text)
        except OSError as error:
            raise ResultsUnwritable(storage_message(error, self.results.folder())) from error

    def _destination(self, path: Path, verdict: str) -> Path:
        """Where the file will be once sorted (where it is without WATCH_SORT); a name already taken there gets -2, -3, ..."""
        if not self.settings.sort:
            return path
        folder = self.folder / verdict
        target = folder / path.name
        number = self._numbered.get((verdict, path.name), 2)  # a camera that always writes part.png: no count from -2 each time
        while os.path.lexists(target):
            ending = f"-{number}{path.suffix}"  # a 255-byte name shortened to leave room for it
            stem = path.stem.encode()[: NAME_BYTES - len(ending.encode())].decode(errors="ignore")
            target = folder / f"{stem}{ending}"
            self._numbered[(verdict, path.name)] = number = number + 1
        return target

    def _finish(self, item: _Ready, destination: Path) -> None:
        """Moved to `destination` (WATCH_SORT: its verdict's folder), and remembered as done in this version."""
        path = self.folder / item.state.name
        if destination != path:
            try:
                destination.parent.mkdir(exist_ok=True)  # the watched folder may have been made anew since start
                os.replace(path, destination)
            except OSError as error:
                log(f"WARNING: could not move {path} into {destination.parent}: {error}")
        self._done[item.state.name] = item.state
        self._pending.pop(item.state.name, None)
