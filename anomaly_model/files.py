"""Model and result folders on disk: written atomically, every file checksummed, nothing pickled.

An `AtomicFolder` is filled under a temporary name beside its target and renamed into place
when complete, so a crash never leaves a half-written model or result. Large arrays are float32
`.npy` files written and read in row blocks (a header and raw rows: like JSON, reading one cannot
run code), so a model's statistics never need a second full copy in memory.

Crash safety. Replacing a model takes two renames (old -> `.<name>.previous-<run>`, or
`.<name>.retired-<run>` when it is to become `<name>.backup-1`; new `.<name>.partial-<run>` ->
`<name>`); a kill between them strands both. Each run holds an advisory lock on
`.<name>.lock-<run>` from before its temporary folder exists until after it is gone, so the next
run in that folder (`sweep`, called on every save and load) can tell a killed run's leftovers
(lock free) from a live run's (lock held): it puts a stranded previous or retired folder back
where its target is missing, makes a retired one `<name>.backup-1` where the new model is in
place, and removes the rest. The kernel drops the lock of a killed
process, so this works after SIGKILL and across containers sharing the disk (not across
machines on a network filesystem without lock support, where nothing is cleaned).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from anomaly_model.errors import ModelError

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so leftovers are never cleaned (never a live run's either)
    fcntl = None

CHUNK_ROWS = 128  # rows per block read: ~78 MB of Wide-ResNet PaDiM factors

# Write failures that are the disk's or the folder's, not the program's: one line, not a traceback
# (a name too long for the file system, a folder removed or replaced by a file while a run wrote into it).
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                  errno.ENAMETOOLONG, errno.ENOENT, errno.ENOTDIR}
_MODEL_LOCK = re.compile(r"^\.(?P<name>.+)\.lock$")  # `model_lock`'s file beside a model folder
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|previous|retired|lock|locking)-(?P<run>[0-9a-f-]+)$")


class StorageError(Exception):
    """The disk is full, read-only or not ours to write: a one-line message naming the folder."""


def storage_message(error: OSError, folder: Path | str | None = None) -> str:
    """One line for a write that failed for a reason of the disk or folder."""
    place = folder or error.filename or "the output folder"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk holding {place} is full ({error.strerror}): free space there or choose a folder on another disk"
    if error.errno == errno.EFBIG:
        return f"a file is larger than the file system holding {place} takes ({error.strerror}; FAT32 takes 4 GB): choose a folder on another disk"
    if error.errno == errno.ENAMETOOLONG:
        return f"a name is too long for the file system holding {place} ({error.filename}): shorten the folder's name or MODEL_NAME"
    if error.errno == errno.ENOENT:
        return f"{error.filename or place} does not exist (any more: removed while the command ran?): check it and run the command again"
    if error.errno == errno.ENOTDIR:
        return f"a file stands where a folder is needed ({error.filename or place}): move it away or choose another folder"
    if error.errno == errno.EROFS:
        return f"{place} is on a read-only disk: choose a writable folder"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission for {place} ({error.strerror}): change its permissions or choose a folder you can write to"
    return f"cannot write {place} ({error.strerror})"


def check_writable(folder: Path, keep: bool = False) -> list[Path]:
    """Fail before any long work when results could not be written to `folder`. Folders made to
    find out are removed again unless `keep` (a run that fails before saving leaves no empty
    MODEL_DIR behind); with `keep`, returns the folders made, outermost last, for `remove_made`."""
    folder = Path(folder)
    if _dangling(folder):  # mkdir would say only "File exists"
        raise StorageError(f"cannot write to {_dangling(folder)}: make it reachable or choose another folder")
    made, missing = [], folder
    while not os.path.lexists(missing) and missing != missing.parent:
        made.append(missing)
        missing = missing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        remove_made(made)
        raise StorageError(f"cannot write to {folder} ({error.strerror}): choose a writable folder") from None
    if not keep:
        remove_made(made)
        return []
    return made


def _dangling(path: Path) -> str:
    """What is wrong with `path` when it is a link whose target does not exist, else ""."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"{path}: it is a link to {os.path.realpath(path)}, which does not exist (an unmounted disk, or a link to itself?)"
    return ""


def check_replaceable(target: Path) -> None:
    """A model save replaces `target` (kept as a backup, or deleted with MODEL_BACKUPS=0): only a
    model (a folder holding model.json) or an empty folder may stand there. Anything else a user
    keeps at MODEL_DIR/<name> is refused before any work, never moved or deleted; so is a link
    whose folder is missing (an unmounted disk: the model would land on the system disk)."""
    target = Path(target)
    if _dangling(target):
        raise ModelError(f"{_dangling(target)}: make it reachable, or remove the link to save the model in MODEL_DIR; nothing was changed")
    if not os.path.lexists(target):
        return
    try:
        if target.is_dir() and ((target / "model.json").is_file() or not any(target.iterdir())):
            return
    except OSError:
        return  # not readable: the save's own write fails with a storage error naming it
    held = "files that are not a model (no model.json)" if target.is_dir() else "a file, not a model folder"
    raise ModelError(f"{target} holds {held}: move them away or choose another MODEL_NAME / MODEL_DIR; nothing was changed")


def remove_made(folders: list[Path]) -> None:
    """Remove folders `check_writable` made, innermost first, where they are still empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def remove_entry(path: Path) -> None:
    """Remove a leftover file, folder or symbolic link (a link itself, never what it points to)."""
    if os.path.islink(path) or os.path.isfile(path):
        try:
            os.unlink(path)
        except OSError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


# --- file names that come from model.json: one checked way into a model folder -------------------


def damaged_model(folder: Path | str, detail: str) -> ModelError:
    """The one error for a model.json the code cannot use, naming the file and the entry."""
    return ModelError(f"model {Path(folder) / 'model.json'} is damaged or incompatible ({detail}): retrain with python train.py")


def name_problem(name: object) -> str | None:
    """Why `name` is not a plain file name inside a folder (None when it is): a model.json entry
    naming `../x`, `/etc/x` or `sub/x` must never reach a file outside its model folder."""
    if not isinstance(name, str) or not name.strip():
        return "not a file name"
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name) or (os.altsep and os.altsep in name):
        return "not a plain file name inside the model folder"
    return None


def shown_name(name: object) -> str:
    """A file name as an error shows it: quoted, cut after 200 characters."""
    text = repr(name)
    return text if len(text) <= 200 else text[:200] + "..."


def model_file(folder: Path, name: object, key: str) -> Path:
    """The path of the file that model.json's entry `key` names in model folder `folder`.

    The only way this code reads, hashes or deletes a file a model.json names: a name with a
    separator or `..`, an absolute path, or a symbolic link leading out of the folder is refused
    as a damaged model naming the entry, so nothing outside the folder is ever touched."""
    problem = name_problem(name)
    path = Path(folder) / str(name)
    if problem is None and os.path.islink(path):
        if Path(os.path.realpath(path)).parent != Path(os.path.realpath(folder)):
            problem = "a symbolic link leading out of the model folder"
    if problem is not None:
        raise damaged_model(folder, f"{key} names {shown_name(name)}, {problem}")
    return path


# --- locks --------------------------------------------------------------------------------------


def _take_lock(path: Path, wait: bool = False) -> int | None:
    """An open descriptor holding the lock on `path`; None when another process holds it or the
    file is gone."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


@contextmanager
def _folder_lock(folder: Path, shared: bool = False, wait: bool = True):
    """Serializes swaps and sweeps in one folder (an exclusive lock on the folder itself), so neither
    ever sees the other half done; loads hold it shared (`reading`), so a swap waits until they
    have read the whole model. Without lock support it only serializes nothing."""
    descriptor, locked = None, True
    if fcntl is not None:
        try:
            descriptor = os.open(folder, os.O_RDONLY)
            fcntl.flock(descriptor, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except OSError as error:
            locked = not isinstance(error, BlockingIOError)  # held by another: False; no lock support: go on
            if descriptor is not None:
                os.close(descriptor)
            descriptor = None
    try:
        yield locked
    finally:
        if descriptor is not None:
            os.close(descriptor)


_reading: dict[str, int] = {}  # folders this process holds a lock on: sweeps there would wait for ourselves


@contextmanager
def reading(model_dir: Path):
    """Hold while loading a model folder: a retrain's swap (old folder aside, new one in) waits
    until the load is done, so a load sees the old or the new model whole, never files of one
    with the checksums of the other. Leftovers are swept first (a sweep needs the lock alone)."""
    parent = os.path.dirname(os.path.realpath(model_dir))  # where a swap of it happens, through links too
    if parent not in _reading:
        sweep_model(Path(model_dir))
    _reading[parent] = _reading.get(parent, 0) + 1
    try:
        with _folder_lock(Path(parent), shared=True):
            yield
    finally:
        _reading[parent] -= 1
        if not _reading[parent]:
            del _reading[parent]


@contextmanager
def swapping(model_dir: Path):
    """Hold while replacing files inside a model folder (an export moving its file in and
    recording it): loads (`reading`) wait, so they see the old files or the new ones whole."""
    parent = os.path.dirname(os.path.realpath(model_dir))
    _reading[parent] = _reading.get(parent, 0) + 1
    try:
        with _folder_lock(Path(parent)), _signals_held():
            yield
    finally:
        _reading[parent] -= 1
        if not _reading[parent]:
            del _reading[parent]


# --- one run at a time on a model: exports and the swap of a retrain ----------------------------

EXPORT_STAGING_PREFIX = ".export-partial-"  # export.py's folder inside a model folder, while it checks its file


class ModelBusy(ModelError):
    """Another run holds the model's lock (exporting it, or swapping in a retrained one)."""


def _lock_path(model_dir: Path) -> Path:
    """`.<name>.lock` beside the folder a model's path leads to (through links): one lock per model."""
    real = Path(os.path.realpath(model_dir))
    return real.parent / f".{real.name}.lock"


def _lock_owner(descriptor: int) -> str:
    try:
        text = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another run"


_held_locks: set[Path] = set()  # model locks this process holds: taking one again is a no-op, not a deadlock


@contextmanager
def model_lock(model_dir: Path, purpose: str, wait: bool, reentrant: bool = False):
    """Hold the model's lock: a lock file beside its folder holding the owner (pid and what it
    does), removed when done. Busy: `ModelBusy` naming the owner, or with `wait` one line saying
    whom we wait for, then the wait. The kernel drops the lock of a killed process, so a lock
    file left by a kill is free and taken over. Held by this process already: `reentrant` goes on
    under it (a save's swap inside an update, which holds it from loading to saving), anything
    else is busy (a sweep must not remove this run's own export staging)."""
    path = _lock_path(model_dir)
    if fcntl is None:
        yield
        return
    if path in _held_locks:
        if not reentrant:
            raise ModelBusy(f"model {model_dir} is busy: this run holds it ({purpose})")
        yield
        return
    descriptor = None
    while descriptor is None:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # no folder to hold a model: nothing to guard (the load says what is missing)
            yield
            return
        except OSError as error:
            raise StorageError(storage_message(error, path.parent)) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _lock_owner(descriptor)
            if not wait:
                os.close(descriptor)
                raise ModelBusy(f"model {model_dir} is busy: {owner} (lock {path}); run this again when it has finished") from None
            print(f"waiting for {owner} to finish with model {model_dir} (lock {path}) ...", file=sys.stderr)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except OSError:
            current = False
        if not current:  # the owner we waited for removed that file: lock the one there now
            os.close(descriptor)
            descriptor = None
    _held_locks.add(path)
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} ({purpose})".encode(), 0)
        yield
    finally:
        _held_locks.discard(path)
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(descriptor)


def sweep_model(model_dir: Path) -> None:
    """`sweep` beside the model folder, and inside it the staging folder of an export that was
    killed (only when nobody holds the model's lock: a live export's folder is its own).
    Best effort, like `sweep`."""
    model_dir = Path(model_dir)
    wait = not os.path.lexists(model_dir)  # missing: maybe stranded by a kill mid-swap, to be put back first
    sweep(model_dir.parent, wait)  # else best effort: not behind another run's load
    real_parent = Path(os.path.realpath(model_dir)).parent
    if real_parent != Path(os.path.realpath(model_dir.parent)):
        sweep(real_parent, wait)  # a linked model folder: its leftovers lie beside the link's target
    try:
        staged = [entry for entry in os.listdir(model_dir) if entry.startswith(EXPORT_STAGING_PREFIX)]
    except OSError:
        return
    if not staged:
        return
    try:
        with model_lock(model_dir, "sweeping leftovers", wait=False):
            for entry in staged:
                remove_entry(model_dir / entry)
    except (ModelBusy, StorageError):
        pass


@contextmanager
def _signals_held():
    """SIGINT / SIGTERM wait until the block is done: a swap is never interrupted half-way."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _fsync_path(path: Path) -> None:
    """Flush a file or folder entry to disk (best effort for folders: not every system allows it)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError as error:
        if not path.is_dir() or error.errno in STORAGE_ERRNOS:
            raise
    finally:
        os.close(descriptor)


def sweep(folder: Path, wait: bool = True) -> None:
    """Clean up after killed runs in `folder`: a stranded previous folder goes back to its name
    when that is empty (the old model survives a kill between the two renames of a swap), other
    temporary folders are removed. Leftovers of live runs (their lock held) are left alone.
    Best effort: a folder we cannot change (read-only models) is left as it is."""
    folder = Path(folder)
    if fcntl is None or not folder.is_dir() or os.path.realpath(folder) in _reading:
        return
    try:
        with _folder_lock(folder, wait=wait) as locked:
            if not locked:
                return  # another run is loading or swapping here: the next sweep cleans up
            runs: dict[str, dict[str, tuple[str, Path]]] = {}
            for entry in os.listdir(folder):
                match = _LEFTOVER.match(entry)
                if match:
                    runs.setdefault(match["run"], {})[match["kind"]] = (match["name"], folder / entry)
                elif _MODEL_LOCK.match(entry):
                    _remove_free_lock(folder / entry)
            for parts in runs.values():
                _clean_run(folder, parts)
    except OSError:
        pass


def _remove_free_lock(path: Path) -> None:
    """A model lock file a killed run left (nobody holds its lock, and it holds `model_lock`'s
    "pid N (...)": never a user's own `.x.lock`) is removed."""
    descriptor = _take_lock(path)
    if descriptor is None:
        return
    try:
        ours = os.pread(descriptor, 4, 0) == b"pid "
        if ours and os.stat(path).st_ino == os.fstat(descriptor).st_ino:
            os.unlink(path)
    finally:
        os.close(descriptor)


def _clean_run(folder: Path, parts: dict[str, tuple[str, Path]]) -> None:
    lock = parts.get("lock") or parts.get("locking")
    descriptor = None
    if lock is not None:
        descriptor = _take_lock(lock[1])
        if descriptor is None:
            return  # a live run (or one that finished just now): its folders are its own
    # no lock file: a run that finished (or an older version's leftover); either way not live
    try:
        for kind in ("previous", "retired"):
            if kind not in parts:
                continue
            name, path = parts[kind]
            if not os.path.lexists(folder / name):
                os.replace(path, folder / name)  # killed between the two renames: the old one is back
            elif kind == "retired":  # killed after the new model took its place: the old one is its backup-1
                make_room_for_backup_1(folder / name)
                os.replace(path, backup_path(folder / name, 1))
            else:
                remove_entry(path)  # a link too (an older version swapped links aside)
        if "partial" in parts:
            remove_entry(parts["partial"][1])
        for kind in ("lock", "locking"):
            if kind in parts:
                parts[kind][1].unlink(missing_ok=True)
    finally:
        if descriptor is not None:
            os.close(descriptor)


def backup_path(target: Path, number: int) -> Path:
    return target.parent / f"{target.name}.backup-{number}"


def numbered_backups(target: Path) -> list[tuple[int, Path]]:
    """(N, path) of every `<name>.backup-N` beside `target`, newest (lowest N) first."""
    pattern = re.compile(rf"^{re.escape(target.name)}\.backup-(\d+)$")
    return sorted((int(match.group(1)), target.parent / entry) for entry in os.listdir(target.parent) if (match := pattern.match(entry)))


def make_room_for_backup_1(target: Path) -> list[tuple[Path, str]]:
    """Every `<name>.backup-N` beside `target` moves to 2, 3, ... in its order, without gaps (a
    backup-1 restored by hand leaves one), so that backup-1 is free; none is removed here.
    Returns (path now, name before) of each, newest first. A backup moving up one goes oldest first
    into the free name above it; one moving down (past a gap) newest first: no rename overwrites."""
    numbered = numbered_backups(target)
    moves = [(path, number, slot) for slot, (number, path) in enumerate(numbered, start=2) if number != slot]
    for path, number, slot in sorted((move for move in moves if move[1] < move[2]), key=lambda move: -move[2]):
        os.replace(path, backup_path(target, slot))
    for path, number, slot in sorted((move for move in moves if move[1] > move[2]), key=lambda move: move[2]):
        os.replace(path, backup_path(target, slot))
    return [(backup_path(target, slot), path.name) for slot, (_, path) in enumerate(numbered, start=2)]


# --- atomic folders -----------------------------------------------------------------------------


class AtomicFolder:
    """A folder written under a temporary name and renamed into place on success.

    replace=True (models): the previous folder of the same name is kept until the new one is
    complete, then removed; the swap holds the model's lock (`model_lock`: it waits for an export
    of the model to finish). A target that is a symbolic link is replaced where it leads: the
    link stays and shows the new folder, and nothing is left beside it. replace=False (results): an existing folder is never touched; the
    new one gets the first free name `<name>-2`, `<name>-3`, ... (`target` says which, after the
    block; files are not flushed to disk one by one, so a power cut, unlike a kill, may leave
    a result folder with empty pictures). `checksums` records the sha256 and size of every file
    written through this object.
    A write that fails because the disk is full, read-only or not writable is a StorageError
    naming the folder; the temporary folder is removed and an earlier folder survives.
    """

    def __init__(self, target: Path, replace: bool = True, backups: int | None = None) -> None:
        self.target = self._given = Path(target)
        self.backups = backups  # replace=True: earlier versions kept as <name>.backup-1 (newest) ... -<backups>; None: untouched
        if replace and os.path.islink(self.target):
            self.target = Path(os.path.realpath(self.target))  # the folder the link leads to is replaced
        self.replace = replace
        self._made: list[Path] = []  # folders made for the target (removed again when nothing is saved)
        self.run = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        beside = {kind: self.target.parent / f".{self.target.name}.{kind}-{self.run}" for kind in ("partial", "previous", "retired", "lock", "locking")}
        self.temporary = beside["partial"]
        self._previous, self._retired = beside["previous"], beside["retired"]
        self._lock_path, self._locking_path = beside["lock"], beside["locking"]
        self.checksums: dict[str, dict] = {}
        self._lock: int | None = None

    def __enter__(self) -> "AtomicFolder":
        if self.replace:
            check_replaceable(self._given)  # before anything is made or moved
        self._made = check_writable(self.target.parent, keep=True)
        sweep(self.target.parent)
        try:
            self._hold_lock()
            self.temporary.mkdir()
        except OSError as error:
            self._release_lock()
            remove_made(self._made)
            raise self._storage_error(error)
        return self

    def _hold_lock(self) -> None:
        """Take the run's lock before its folder exists: created under a second name, locked,
        then renamed, so no sweep ever sees it unlocked while this run is alive."""
        if fcntl is None:
            return
        self._lock = os.open(self._locking_path, os.O_CREAT | os.O_EXCL | os.O_RDONLY, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(self._locking_path, self._lock_path)

    def _release_lock(self) -> None:
        if self._lock is None:
            return
        self._lock_path.unlink(missing_ok=True)
        self._locking_path.unlink(missing_ok=True)
        os.close(self._lock)
        self._lock = None

    def _storage_error(self, error: BaseException) -> BaseException:
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return StorageError(storage_message(error, self.target) + "; nothing was overwritten")
        return error

    def write_bytes(self, name: str, data: bytes) -> None:
        with open(self.temporary / name, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        self.checksums[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def write_json(self, name: str, content: dict) -> None:
        self.write_bytes(name, json.dumps(content, indent=2).encode())

    def write_npy_chunks(self, name: str, shape: tuple, chunks: Iterable[np.ndarray], dtype: str = "<f4") -> None:
        """A .npy of `shape` written from an iterator of row blocks. Each block is hashed and
        written on a second thread while the next one is packed: for Wide-ResNet's 1.9 GB that
        takes ~6 s instead of ~10 s one after the other (hashlib and file writes release the GIL)."""
        digest, size = hashlib.sha256(), 0

        def hash_and_write(block: np.ndarray) -> None:
            digest.update(block)
            file.write(block)

        with open(self.temporary / name, "wb") as file, ThreadPoolExecutor(max_workers=1) as writer:
            np.lib.format.write_array_header_1_0(file, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
            header = file.tell()
            pending = None
            for chunk in chunks:
                block = np.ascontiguousarray(chunk, dtype=dtype)
                if pending is not None:
                    pending.result()  # at most two blocks in memory; re-raises a failed write
                pending = writer.submit(hash_and_write, block)
                size += block.nbytes
            if pending is not None:
                pending.result()
            file.flush()
            os.fsync(file.fileno())
        self.checksums[name] = {"sha256": digest.hexdigest(), "bytes": size, "header_bytes": header}

    def write_npy(self, name: str, array: np.ndarray, dtype: str = "<f4") -> None:
        """A whole (small) array as one .npy."""
        self.write_npy_chunks(name, tuple(array.shape), [array], dtype)

    def __exit__(self, kind, value, traceback) -> None:
        failed = False
        try:
            if kind is not None:
                shutil.rmtree(self.temporary, ignore_errors=True)
                failed = True
                error = self._storage_error(value)
                if error is not value:
                    raise error from None
                return
            try:
                if self.replace:
                    self._flush_unsynced()
                with self._model_lock(), _folder_lock(self.target.parent), _signals_held():
                    dropped = self._swap_keeping_backups() if self.replace else self._place_new()
                    _fsync_path(self.target.parent)
            except BaseException as error:
                shutil.rmtree(self.temporary, ignore_errors=True)
                failed = True
                if isinstance(error, OSError):
                    raise self._storage_error(error) from None
                raise
            for entry in dropped:
                remove_entry(entry)
                if os.path.lexists(entry):  # not ours to remove (a read-only backup): the note above must not be the last word
                    print(f"note: could not remove {entry} (no permission?): delete it by hand to free its space", file=sys.stderr)
        finally:
            self._release_lock()
            if failed:
                remove_made(self._made)

    def _swap_keeping_backups(self) -> list[Path]:
        """The swap, and with `backups` the replaced folder kept as `<name>.backup-1`, the existing
        backups following it renumbered 2, 3, ...; the newest `backups` are kept. Every step
        leaves what a kill can be recovered from (`sweep`): the backups make room first (none
        removed), the old model leaves as `.retired-<run>` (put back, or made backup-1, by the next
        run), and only then do the backups past the count go. Returns the folders to remove after
        the swap, each already renamed to a temporary name of this run."""
        keeping = bool(self.backups) and os.path.lexists(self.target)
        moved = make_room_for_backup_1(self.target) if keeping else []
        previous = self._swap(self._retired if keeping else self._previous)
        if previous is None or self.backups is None:
            return [] if previous is None else [previous]
        if keeping:
            os.replace(previous, backup_path(self.target, 1))
            excess = moved[self.backups - 1 :]
            dropped = []
        else:  # MODEL_BACKUPS=0: the replaced model and every earlier backup go
            excess = [(path, path.name) for _, path in numbered_backups(self.target)]
            dropped = [previous]
        if excess:  # never silently: these are earlier versions of the user's model
            print(f"note: MODEL_BACKUPS={self.backups}: removed {len(excess)} older backup{'s' if len(excess) != 1 else ''} "
                  f"(named {', '.join(name for _, name in excess)} before this save)", file=sys.stderr)
        for index, (path, _) in enumerate(excess):
            aside = Path(f"{self.temporary}-{index}")
            os.replace(path, aside)
            dropped.append(aside)
        return dropped

    def _model_lock(self):
        """A model's swap waits for a run holding the model (an export); results need no lock."""
        return model_lock(self.target, "saving a retrained model", wait=True, reentrant=True) if self.replace else nullcontext()

    def _flush_unsynced(self) -> None:
        """Files other code wrote straight into a model's temporary folder reach the disk before
        the swap, so a power cut never leaves a complete-looking model with an empty file. Not
        done for results (replace=False): ~5 ms per picture here, and results can be made again."""
        for root, _, names in os.walk(self.temporary):
            for name in names:
                path = Path(root) / name
                if path.parent != self.temporary or name not in self.checksums:
                    _fsync_path(path)
            _fsync_path(Path(root))

    def _swap(self, aside: Path) -> Path | None:
        """Old folder to `aside`, new one in; returns the old one's temporary name (None: there was none)."""
        previous = None
        if os.path.lexists(self.target):
            previous = aside
            os.replace(self.target, previous)
        try:
            os.replace(self.temporary, self.target)
        except OSError:
            if previous is not None:
                os.replace(previous, self.target)
            raise
        return previous

    def _place_new(self) -> list[Path]:
        """Rename into the first free name: `target`, `target-2`, ... (never over a folder); nothing to remove after."""
        base, number = self.target, 1
        while True:
            candidate = base if number == 1 else base.with_name(f"{base.name}-{number}")
            if not os.path.lexists(candidate):
                try:
                    os.rename(self.temporary, candidate)  # fails on a non-empty folder made meanwhile
                    self.target = candidate
                    return []
                except OSError as error:
                    if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                        raise
            number += 1


def write_file_atomically(path: Path, data: bytes) -> None:
    """Replace one file (model.json when export.py adds its section): written beside it under a
    temporary name, flushed to disk, then renamed over it, so a crash leaves the old or the new."""
    path = Path(path)
    temporary = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def file_checksum(path: Path) -> dict:
    """{"sha256", "bytes"} of a file, read in blocks (an exported Wide-ResNet model is 3.8 GB)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
            size += len(block)
    return {"sha256": digest.hexdigest(), "bytes": size}


def read_checked_json(folder: Path, name: str, files: dict, key: str):
    """A JSON file of a model folder (`read_checked_bytes`), parsed: content that is no JSON, or
    nested past the parser's depth, is a damaged model, never a traceback."""
    data = read_checked_bytes(folder, name, files, key)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise ModelError(f"model file {Path(folder) / name} is damaged ({type(error).__name__}): retrain with python train.py") from None


def read_checked_bytes(folder: Path, name: str, files: dict, key: str) -> bytes:
    """A file of a model folder that model.json's entry `key` names, verified against its checksum
    in `files` (model.json's "files")."""
    path = model_file(folder, name, key)
    expected = files.get(name)
    if expected is None or not path.is_file():
        raise ModelError(f"model file {path} is missing: retrain with python train.py")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise ModelError(f"model file {path} is damaged (checksum mismatch): retrain with python train.py")
    return data


def read_npy_chunks(folder: Path, name: str, files: dict, shape: tuple, dtype: str = "<f4") -> Iterator[np.ndarray]:
    """Row blocks of a .npy of a model folder, read with plain file reads and checked against the
    sha256 in `files` once all are read. Plain reads rather than a memory map: mapped pages would
    count toward the process's memory next to the unpacked state (+1.9 GB for Wide-ResNet)."""
    path = model_file(folder, name, f"files.{name}")
    if not path.is_file():
        raise ModelError(f"model file {path} is missing: retrain with python train.py")
    expected = files.get(name, {})
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            if np.lib.format.read_magic(file) != (1, 0):
                raise ValueError("unexpected .npy version")
            stored, fortran, stored_dtype = np.lib.format.read_array_header_1_0(file)
            if tuple(stored) != tuple(shape) or fortran or stored_dtype != np.dtype(dtype):
                raise ModelError(f"model file {path} holds {stored} {stored_dtype}, expected {shape} {np.dtype(dtype)}: retrain")
            row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
            if os.fstat(file.fileno()).st_size - file.tell() < shape[0] * row_bytes:  # before any block is allocated
                raise ValueError(f"the file is shorter than {shape} values")
            for start in range(0, shape[0], CHUNK_ROWS):
                rows = min(CHUNK_ROWS, shape[0] - start)
                data = bytearray(rows * row_bytes)
                if file.readinto(data) != len(data):
                    raise ValueError("file ends early")
                digest.update(data)
                yield np.frombuffer(data, dtype=dtype).reshape(rows, *shape[1:])
    except (OSError, ValueError) as error:
        raise ModelError(f"model file {path} is damaged or truncated ({error}): retrain with python train.py") from None
    if digest.hexdigest() != expected.get("sha256"):
        raise ModelError(f"model file {path} is damaged (checksum mismatch): retrain with python train.py")


def read_npy(folder: Path, name: str, files: dict, shape: tuple, dtype: str = "<f4") -> np.ndarray:
    """A whole (small) checked .npy of a model folder."""
    blocks = list(read_npy_chunks(folder, name, files, shape, dtype))
    return np.concatenate(blocks) if blocks else np.zeros(shape, dtype=dtype)
