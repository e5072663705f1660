"""A writer-preferring reader/writer lock.

The server's head lock (WCFS.md §3.7) is held shared by reads, lookups and
watch setups and exclusively by commit processing.  Writer preference keeps a
stream of reads from starving commit processing: once a writer waits, new
readers queue behind it.  Consequently a thread must never take the lock
shared twice (the second acquisition could wait behind a queued writer that
waits for the first) -- the server's code paths take it once per request.

Concurrency: one ``threading.Condition`` protects the counters.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())   # protects the three counters
        self._readers = 0          # readers holding the lock
        self._writer = False       # a writer holds the lock
        self._writers_waiting = 0

    def acquire_shared(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()
