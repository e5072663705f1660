"""Leveled log format shared by the ``wcfs`` command line and the server.

Every record is rendered as one header followed by the message::

    <L><mmdd hh:mm:ss.uuuuuu> <tid> <file>:<line>] <logger>: <message>

``L`` is the first letter of the level name (D, I, W, E, C), the time is local
time with microseconds, ``tid`` is the kernel thread id of the emitting thread
(what ``/proc/<pid>/task`` and debuggers show, unlike Python's thread ident).
This is the format of the C++ client core too, so interleaved logs of the
server, the management code and clients read alike.

The thread id is taken when the record is formatted.  ``logging.StreamHandler``
formats synchronously in the emitting thread, which is how `setup_logging`
configures it; a queue-based handler would report the consumer's thread.

`setup_logging` installs one stderr handler on the root logger and is
idempotent: calling it again only changes the level, so the CLI can configure
logging before handing over to the server without the server duplicating
output.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

__all__ = ["WcfsFormatter", "setup_logging", "parse_level"]


class WcfsFormatter(logging.Formatter):
    """Formats records as ``<L><mmdd hh:mm:ss.uuuuuu> <tid> <file>:<line>] <logger>: <msg>``."""

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        lt = time.localtime(created)
        usec = int(round((created - int(created)) * 1e6))
        if usec >= 1000000:     # rounding carried into the next second
            usec = 999999
        header = (f"{record.levelname[:1]}{lt.tm_mon:02d}{lt.tm_mday:02d} "
                  f"{lt.tm_hour:02d}:{lt.tm_min:02d}:{lt.tm_sec:02d}.{usec:06d} "
                  f"{threading.get_native_id()} {record.filename}:{record.lineno}] "
                  f"{record.name}: ")
        text = header + record.getMessage()
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def parse_level(name: str) -> int:
    """Standard logging level name (case-insensitive) or number -> level; ValueError if unknown."""
    s = name.strip()
    if s.isdigit():
        return int(s)
    level = logging.getLevelName(s.upper())
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {name!r}")
    return level


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (it may be replaced, e.g. by pytest)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


_handler_lock = threading.Lock()     # protects _handler
_handler: logging.Handler | None = None


def setup_logging(level: int | str = logging.INFO) -> None:
    """Log to stderr in the wcfs format at `level` (root logger); idempotent."""
    global _handler
    if isinstance(level, str):
        level = parse_level(level)
    with _handler_lock:
        root = logging.getLogger()
        if _handler is None or _handler not in root.handlers:
            _handler = _StderrHandler()
            _handler.setFormatter(WcfsFormatter())
            root.addHandler(_handler)
        root.setLevel(level)
