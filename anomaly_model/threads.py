"""CPU thread counts for work that more threads slow down.

On a CPU shared with other jobs, an OpenMP parallel region waits at its barrier for a thread the OS
has descheduled: many small operations (a batch of small matrices factorized, a network built and
probed) then take 10-100x longer with two threads than with one (figures where each is used:
`gaussian.FACTOR_THREADS`, `backbone.FeatureExtractor`). Such work runs inside `cpu_threads`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def cpu_threads(count: int, device: torch.device = torch.device("cpu")) -> Iterator[None]:
    """`count` torch CPU threads inside the block (nothing changes for work on a GPU); the caller's
    number is restored."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
