"""A child process with a capped address space, for work on untrusted bytes (defence in depth).

The DICOM decode checks every codestream's real dimensions before a pixel is decoded
(`transforms.dicom_codestream`); if a codec ever allocates past those checks anyway, the allocation
fails in this child, not in the worker that holds the model and the job's state. The child is
started once per DoFn instance (``spawn``: the worker's threads and gRPC channels are not forked)
and caps itself with ``RLIMIT_AS`` at its address space after imports plus `headroom_bytes`, so the
cap does not depend on what the libraries map at start-up. A child killed or out of memory is
replaced for the next call.

Flows: `call(function, *args)` -> what ``function(*args)`` returns or raises in the child;
`ChildFailed` when the child died instead (the caller turns it into a rejection).
"""

from __future__ import annotations

import multiprocessing
import resource
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool


class ChildFailed(RuntimeError):
    """The capped child ended without an answer (killed, or out of memory outside Python's reach)."""


def _cap_address_space(warm_up: str, headroom_bytes: int) -> None:
    __import__(warm_up)  # the libraries the work needs, mapped before the cap is measured
    with open("/proc/self/status") as status:
        size_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = size_kib * 1024 + headroom_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def address_space_limit() -> int:
    """This process's RLIMIT_AS soft limit, in bytes (the child reports it in tests)."""
    return resource.getrlimit(resource.RLIMIT_AS)[0]


class CappedProcess:
    """One child process, its address space capped at its size after importing `warm_up` plus
    `headroom_bytes`. Not thread-safe: one per DoFn instance (`setup` / `teardown`)."""

    def __init__(self, warm_up: str, headroom_bytes: int):
        self._warm_up = warm_up
        self._headroom = headroom_bytes
        self._pool: ProcessPoolExecutor | None = None

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_cap_address_space, initargs=(self._warm_up, self._headroom))
        return self._pool

    def call(self, function, *args):
        try:
            return self._started().submit(function, *args).result()
        except BrokenProcessPool:
            self.close()
            raise ChildFailed("the capped child process died") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
