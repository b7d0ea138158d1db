"""Running the scripts under torchrun: one process ("rank") per GPU, or per CPU process with Gloo.

`python train.py` runs alone and never touches torch.distributed: every function here then acts
as for a job of one (a shard is everything, a gather returns [value], a reduction does nothing),
so the pipeline and the models have one code path for one process and for many.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set) `start` joins
the job: backend Gloo for CPU tensors and NCCL for CUDA tensors, so the backend follows each
tensor's device; device `cuda:LOCAL_RANK` (`rank_device`); ranks other than 0 print nothing
(rank 0 gathers what there is to say: one voice, no interleaved progress bars).

Failures. A rank that raises must not leave the others blocked in a collective until a
30-minute timeout, and torchrun kills every worker as soon as one exits with an error, before
rank 0 could clean up or say why. So every wait here is a poll that also watches a key in the
job's store (torchrun's TCPStore): the failing rank writes its one-line error there (first one
wins); the others raise `PeerFailed` at their next wait or batch (`watched`) and unwind through
their `with` blocks, which removes anything half-written; rank 0 prints the error; the other
ranks exit only after rank 0 has (`finish`), so torchrun never kills rank 0 mid-cleanup.

Values between ranks (`gather`, `all_gather`, `broadcast_object`) travel as JSON plus raw arrays
in numpy's .npy format read with allow_pickle=False (`encode` / `decode`), like the model files:
nothing is unpickled, so a rank reading another machine's bytes never runs code from them.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path, PurePath
from typing import Any, Iterable, Iterator, NoReturn, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from anomaly_model.errors import ModelError
from anomaly_model.files import AtomicFolder

T = TypeVar("T")

# How long a failing rank waits for rank 0 to report its error (rank 0 may be in serial work, such
# as the classifier's fit, before it looks), and rank 0 for the others to stop writing into a
# shared folder (they look after every image), before going ahead anyway.
_REPORT_TIMEOUT_S = 600.0
_STOP_TIMEOUT_S = 120.0
# A collective's own timeout. Failures are noticed through the store, not by timing out, so this
# only needs to outlast rank 0's serial work while the others wait (calibration, the classifier's
# XGBoost fit, eval's metrics and pictures, saving), which on large sets may pass the 30 min default.
_COLLECTIVE_TIMEOUT = timedelta(hours=3)
_ERROR_KEY = "error"


class _Job:
    """This process's place in the job; `store` is None when it runs alone."""

    store: dist.Store | None = None
    rank = 0
    world_size = 1
    local_rank = 0
    several_hosts = False


_job = _Job()


class PeerFailed(Exception):
    """Another rank of the job failed: `str` is its error line, prefixed with which rank it was."""

    def __init__(self, rank: int | None, code: int, line: str, host: str = "") -> None:
        line = line.removeprefix("error: ")
        where = f"rank {rank}" + (f" on {host}" if host else "") if rank is not None else ""
        super().__init__(f"{where}: {line}" if where else line)
        self.code = code


# --- the job ----------------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """torchrun's (env://) variables are set: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def start() -> None:
    """Join the job when started by torchrun (idempotent); alone, do nothing."""
    if not launched_by_torchrun() or _job.store is not None:
        return
    store, rank, world_size = next(dist.rendezvous("env://"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"  # CPU tensors (gathers of results) over Gloo, CUDA tensors over NCCL
        if local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=_COLLECTIVE_TIMEOUT)
    _job.store = dist.PrefixStore("anomaly-suite/", store)
    _job.rank, _job.world_size, _job.local_rank = rank, world_size, local_rank
    _job.several_hosts = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) < world_size
    if rank != 0:
        quiet = open(os.devnull, "w")
        sys.stdout = sys.stderr = quiet  # Python output only: C++ (Gloo, NCCL) diagnostics still show


def active() -> bool:
    """True in a torchrun job (even of one process), False alone."""
    return _job.store is not None


def rank() -> int:
    return _job.rank


def world_size() -> int:
    return _job.world_size


def is_main() -> bool:
    """Rank 0: the rank that writes models and results and prints."""
    return _job.rank == 0


def rank_device(name: str) -> str:
    """The DEVICE setting as this rank reads it: in a job "auto" and "cuda" mean cuda:LOCAL_RANK
    (CPU when there is no GPU: "auto" only); alone, unchanged."""
    if not active():
        return name
    if name == "auto" and not torch.cuda.is_available():
        return "cpu"
    if name in ("auto", "cuda"):
        count = torch.cuda.device_count()
        if _job.local_rank >= count:
            raise ModelError(
                f"LOCAL_RANK {_job.local_rank} has no GPU ({count} on this machine): start at most {count} "
                "processes per machine (torchrun --nproc_per_node) or set DEVICE=cpu"
            )
        return f"cuda:{_job.local_rank}"
    if name.startswith("cuda:"):
        raise ModelError(f"DEVICE={name} under torchrun: each rank uses cuda:LOCAL_RANK; set DEVICE=auto or cuda")
    return name


# --- failures -----------------------------------------------------------------------------------


def _peer_error() -> PeerFailed | None:
    """The failure another rank announced, if any."""
    try:
        if not _job.store.check([_ERROR_KEY]):
            return None
        entry = json.loads(_job.store.get(_ERROR_KEY))
    except (RuntimeError, ValueError) as error:  # the store is gone: its host (torchrun's agent or rank 0) stopped
        return PeerFailed(None, 1, f"lost contact with the other ranks ({error})")
    return PeerFailed(entry["rank"], entry["code"], entry["line"] or "stopped the job", entry["host"])


def check_peers() -> None:
    """Raise `PeerFailed` when another rank has failed; alone, nothing."""
    if active():
        failure = _peer_error()
        if failure is not None:
            raise failure


def watched(items: Iterable[T]) -> Iterator[T]:
    """`items`, stopping with `PeerFailed` between two of them once another rank has failed, so a
    failure anywhere stops every rank within one batch, not after its whole shard."""
    for item in items:
        check_peers()
        yield item


def announce_failure(code: int, line: str | None) -> None:
    """Tell the other ranks to stop; the first announcement is the one rank 0 reports."""
    if not active():
        return
    entry = {"rank": _job.rank, "code": code, "line": line, "host": socket.gethostname() if _job.several_hosts else ""}
    try:
        _job.store.compare_set(_ERROR_KEY, "", json.dumps(entry))
    except RuntimeError:
        pass  # the store is gone: the job is over anyway


def _wait_for(keys: list[str], timeout: float) -> bool:
    """Poll the store until every key exists; False on timeout or when the store is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _job.store.check(keys):
                return True
        except RuntimeError:
            return False
        time.sleep(0.05)
    return False


def _wait_for_others_to_stop() -> None:
    """Rank 0, failing: until every other rank has stopped (they finish within a batch)."""
    others = [f"done/{r}" for r in range(1, _job.world_size)]
    _wait_for(others, _STOP_TIMEOUT_S)


def finish(code: int, line: str | None, from_peer: bool = False) -> NoReturn:
    """End this process: `line` is its error (None on success). Alone: print it, exit with `code`.

    In a job a success waits for every rank (a rank failing meanwhile turns it into that
    failure); a failure is announced, rank 0 prints the error and exits first, the others
    after it, so torchrun (which kills the rest when a worker fails) never cuts rank 0 short."""
    gc.collect()  # finalizes generators an error abandoned: their progress bars end their lines first
    if not active():
        if line:
            print(line, file=sys.stderr)
        sys.exit(code)
    if code == 0:
        try:
            barrier()
        except PeerFailed as failure:
            code, line, from_peer = failure.code, f"error: {failure}", True
        except KeyboardInterrupt:  # everything was written; the job is being stopped
            code, line = 130, "interrupted: nothing was overwritten"
    if code == 0:
        dist.destroy_process_group()
        sys.exit(0)
    if not from_peer:
        announce_failure(code, line)
    if _job.rank == 0:
        print(line, file=sys.__stderr__)
        sys.__stderr__.flush()
        _set("done/0")
    else:
        _set(f"done/{_job.rank}")
        if not _wait_for(["done/0"], _REPORT_TIMEOUT_S) and not from_peer:
            print(line, file=sys.__stderr__)  # rank 0 never answered: say it here
            sys.__stderr__.flush()
    sys.__stdout__.flush()
    # No interpreter shutdown: a collective another rank abandoned would block its destructor.
    os._exit(code)


def _set(key: str) -> None:
    try:
        _job.store.set(key, "1")
    except RuntimeError:
        pass


# --- collectives, each a poll that stops when another rank fails ---------------------------------


def _wait(work) -> None:
    """Wait for an asynchronous collective; `PeerFailed` when another rank fails meanwhile.

    Spins for the first 2 ms (a small collective is done by then, and a sleep would cost more
    than it), then checks the store and sleeps between checks, up to 50 ms."""
    spin_until = time.perf_counter() + 0.002
    delay = 0.0005
    while not work.is_completed():
        if time.perf_counter() < spin_until:
            continue
        check_peers()
        time.sleep(delay)
        delay = min(2 * delay, 0.05)
    try:
        work.wait()
    except RuntimeError as error:  # a peer's connection closed: it stopped, maybe without a word
        check_peers()
        raise PeerFailed(None, 1, f"another rank stopped without a word ({str(error).splitlines()[0]})") from None


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (every rank gets the sum)."""
    if active():
        _wait(dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True))
    return tensor


def reduce_sum_(tensor: torch.Tensor, destination: int = 0) -> torch.Tensor:
    """Sum `tensor` over the ranks into rank `destination`'s, in place (the others' are left undefined)."""
    if active():
        _wait(dist.reduce(tensor, dst=destination, op=dist.ReduceOp.SUM, async_op=True))
    return tensor


def broadcast_(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `source`'s, in place."""
    if active():
        _wait(dist.broadcast(tensor, src=source, async_op=True))
    return tensor


def barrier() -> None:
    """Every rank has reached this point (on the CPU: no device needed)."""
    all_reduce_sum_(torch.zeros(1))


# --- values as data: JSON and .npy bytes -------------------------------------------------------

# Dataclasses a rank may rebuild from another's bytes: this project's own, already imported (a
# module is never imported because a peer named it).
_OWN_PACKAGES = ("anomaly_model", "classification_model", "dataset_manager", "evaluation", "pipeline")


def encode(value: Any) -> bytes:
    """`value` as bytes: an 8-byte header length, a JSON tree, then each array's .npy bytes.
    Holds None, bool, int, float, str, list, tuple, dict, paths, numpy arrays and scalars, CPU or
    CUDA tensors (sent from the CPU) and dataclasses of this project; anything else is a TypeError."""
    arrays: list[bytes] = []

    def array(data: np.ndarray) -> int:
        buffer = io.BytesIO()
        np.save(buffer, data, allow_pickle=False)
        arrays.append(buffer.getvalue())
        return len(arrays) - 1

    def tree(item: Any) -> Any:
        if isinstance(item, np.generic):  # before float: numpy's float64 is one
            return {"t": "scalar", "v": array(np.asarray(item))}
        if item is None or isinstance(item, (bool, int, float, str)):
            return item
        if isinstance(item, (list, tuple)):
            return {"t": type(item).__name__, "v": [tree(element) for element in item]}
        if isinstance(item, dict):
            return {"t": "dict", "v": [[tree(key), tree(element)] for key, element in item.items()]}
        if isinstance(item, PurePath):
            return {"t": "path", "v": str(item)}
        if isinstance(item, torch.Tensor):
            return {"t": "tensor", "v": array(item.detach().cpu().numpy())}
        if isinstance(item, np.ndarray):
            return {"t": "array", "v": array(item)}
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            fields = {field.name: tree(getattr(item, field.name)) for field in dataclasses.fields(item) if field.init}
            return {"t": "dataclass", "v": [f"{type(item).__module__}:{type(item).__qualname__}", fields]}
        raise TypeError(f"a {type(item).__name__} cannot be sent between ranks (only data: numbers, text, lists, arrays, ...)")

    header = json.dumps({"value": tree(value), "arrays": [len(data) for data in arrays]}).encode()
    return len(header).to_bytes(8, "little") + header + b"".join(arrays)


def _own_dataclass(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    module = sys.modules.get(module_name) if module_name.split(".")[0] in _OWN_PACKAGES else None
    cls = module
    for part in qualname.split(".") if module is not None else []:
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"{name!r} is not a dataclass of this project")
    return cls


def decode(data: bytes) -> Any:
    """The value `encode` wrote; arrays are read with allow_pickle=False. Malformed bytes: ValueError."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    arrays, start = [], 8 + size
    for length in header["arrays"]:
        arrays.append(np.load(io.BytesIO(data[start : start + length]), allow_pickle=False))
        start += length

    def value(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        kind, content = node["t"], node["v"]
        if kind in ("list", "tuple"):
            items = [value(element) for element in content]
            return items if kind == "list" else tuple(items)
        if kind == "dict":
            return {value(key): value(element) for key, element in content}
        if kind == "path":
            return Path(content)
        if kind in ("array", "tensor", "scalar"):
            loaded = arrays[content] if arrays[content].flags.writeable else arrays[content].copy()
            return torch.from_numpy(loaded) if kind == "tensor" else loaded[()] if kind == "scalar" else loaded
        if kind == "dataclass":
            name, fields = content
            return _own_dataclass(name)(**{key: value(element) for key, element in fields.items()})
        raise ValueError(f"unknown kind {kind!r}")

    return value(header["value"])


def _to_bytes(value: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(encode(value)), dtype=torch.uint8)


def _from_bytes(data: torch.Tensor) -> Any:
    return decode(data.numpy().tobytes())


def _sizes(payload: torch.Tensor) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(_job.world_size)]
    _wait(dist.all_gather(sizes, torch.tensor([payload.numel()]), async_op=True))
    return [int(size) for size in sizes]


def _padded(payload: torch.Tensor, length: int) -> torch.Tensor:
    out = torch.zeros(length, dtype=torch.uint8)
    out[: payload.numel()] = payload
    return out


def gather(value: T) -> list[T] | None:
    """Every rank's `value` (data `encode` holds: results of its shard) on rank 0, in rank order;
    None on the other ranks. Alone: [value]. Values travel as JSON and .npy bytes, never pickled."""
    if not active():
        return [value]
    payload = _to_bytes(value)
    sizes = _sizes(payload)
    received = [torch.empty(max(sizes), dtype=torch.uint8) for _ in sizes] if is_main() else None
    _wait(dist.gather(_padded(payload, max(sizes)), received, dst=0, async_op=True))
    if not is_main():
        return None
    return [_from_bytes(data[:size]) for data, size in zip(received, sizes)]


def gather_rows(rows: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's (n_r, ...) tensor on rank 0, in rank order; None on the other ranks. Alone:
    [rows]. For large arrays: sent as they are (no encoding), each padded to the longest."""
    if not active():
        return [rows]
    counts = all_gather(len(rows))
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: len(rows)] = rows
    received = [torch.empty_like(padded) for _ in counts] if is_main() else None
    _wait(dist.gather(padded, received, dst=0, async_op=True))
    return None if received is None else [part[:count] for part, count in zip(received, counts)]


def all_gather(value: T) -> list[T]:
    """Every rank's (small) `value` on every rank, in rank order. Alone: [value]."""
    if not active():
        return [value]
    payload = _to_bytes(value)
    sizes = _sizes(payload)
    received = [torch.empty(max(sizes), dtype=torch.uint8) for _ in sizes]
    _wait(dist.all_gather(received, _padded(payload, max(sizes)), async_op=True))
    return [_from_bytes(data[:size]) for data, size in zip(received, sizes)]


def broadcast_object(value: T, source: int = 0) -> T:
    """Rank `source`'s `value` on every rank. Alone: `value`."""
    if not active():
        return value
    payload = _to_bytes(value) if _job.rank == source else torch.empty(0, dtype=torch.uint8)
    size = broadcast_(torch.tensor([payload.numel()]), source)
    data = broadcast_(_padded(payload, int(size)), source)
    return _from_bytes(data)


def first_given(value: T | None) -> tuple[int, T | None]:
    """(the lowest rank whose `value` is not None, its value); (0, None) when no rank has one."""
    for source, given in enumerate(all_gather(value)):
        if given is not None:
            return source, given
    return 0, None


# --- sharding work and putting results back in order -------------------------------------------


def shard(count: int, batch_size: int) -> list[int]:
    """Indices (into `count` items, in order) this rank handles: whole batches of `batch_size`,
    batch k to rank k mod world size. Each rank's batches are batches one process would make
    (same images together: identical backbone results), and rank 0 holds the first one, whose
    mean is the shift of PaDiM's sums. Ranks beyond the number of batches get none."""
    size = max(1, int(batch_size))
    return [index for index in range(count) if (index // size) % _job.world_size == _job.rank]


def _in_order(parts: list[list[tuple[int, T]]]) -> list[T]:
    return [item for _, item in sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])]


def gather_in_order(items: list[tuple[int, T]]) -> list[T] | None:
    """Rank 0: every rank's (index, item) pairs as one list of items sorted by index, the order one
    process would have made them in; None on the other ranks. Items travel as JSON and .npy bytes
    (`encode`): give numpy arrays, Paths, numbers and text."""
    parts = gather(items)
    return None if parts is None else _in_order(parts)


def all_gather_in_order(items: list[tuple[int, T]]) -> list[T]:
    """`gather_in_order` on every rank, for small items (lists of skipped files)."""
    return _in_order(all_gather(items))


# --- a results folder every rank writes into ----------------------------------------------------


class SharedFolder:
    """An `AtomicFolder` that rank 0 makes and renames into place, and every rank may write into.

    Rank 0 creates the temporary folder and tells the others its path; the renaming waits until
    every rank has left the block. On a failure anywhere, rank 0 first tells the others to stop
    and waits until they have (`finish` marks each), then removes the folder: nobody can still be
    writing into it. Ranks on other machines need the folder on a filesystem they share
    (`check_visible`). Alone: a plain AtomicFolder. `temporary` is rank 0's; `target` too, and
    after the block on rank 0 the name it was given (replace=False: -2, -3, ... when taken).
    """

    def __init__(self, target: Path, replace: bool = True) -> None:
        self._atomic = AtomicFolder(target, replace=replace) if is_main() else None
        self.temporary = Path()
        self._target = Path(target)

    @property
    def target(self) -> Path:
        return self._atomic.target if self._atomic is not None else self._target

    def __enter__(self) -> "SharedFolder":
        if self._atomic is not None:
            self._atomic.__enter__()
        try:
            paths = (self._atomic.temporary, self._atomic.target) if self._atomic is not None else None
            self.temporary, self._target = broadcast_object(paths)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def check_visible(self) -> None:
        """Raise on a rank that cannot see rank 0's folder (another machine without a shared disk)."""
        if not self.temporary.is_dir():
            raise ModelError(
                f"rank {_job.rank} on {socket.gethostname()} cannot see {self.temporary.parent}: under torchrun on several "
                "machines RESULTS_DIR must be on a filesystem every machine shares (or set SAVE_PICTURES=False)"
            )

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            try:
                barrier()  # every rank has written its part
            except BaseException:
                kind, value, traceback = sys.exc_info()
                self._close(kind, value, traceback)
                raise
        self._close(kind, value, traceback)

    def _close(self, kind, value, traceback) -> None:
        if self._atomic is None:
            return
        try:
            if kind is not None and active():
                announce_failure(2, None)  # rank 0's own error line is printed by rank 0 itself
                if not issubclass(kind, KeyboardInterrupt):  # Ctrl-C and torchrun's SIGTERM reach every rank at once
                    _wait_for_others_to_stop()
        finally:  # even when a signal cuts the wait short
            self._atomic.__exit__(kind, value, traceback)
