"""The isolation protocol on ``head/watch`` (WCFS.md §2): links, watches and pins.

Each ``open()`` of ``head/watch`` is a ``WatchLink``: a full-duplex channel of
lines ``<stream> <payload>\\n``.  The client sends requests on odd streams
(``watch <foid> @<at>``, ``watch <foid> -``, ``bye``); the server answers on
the same stream (``ok`` / ``error …``) and sends its own requests on even
streams (``pin <foid> #<blk> @<rev|head>``), which the client answers with
``ack``.  Stream 0 carries the server's last words (``error: …`` /
``fatal: …``) before it closes the link.

Guarantees:

* ``ok`` to ``watch <foid> @<at>`` is sent only when head >= at and every pin
  that makes the client's view of the blocks it could have cached equal to
  ``@at`` was acknowledged (§2.4).  Moving a watch from at_i to at_j ends in
  the same pinned state as a fresh watch at at_j.
* A read of a head block that changed after some watcher's ``at`` completes
  only after that watcher acknowledged the pin (``pin_on_read``, §2.5).
* A client that fails a pin (timeout, EOF, anything but ``ack``) is shut out
  and, unless it is already exiting, killed: SIGBUS, then SIGKILL (§2.6).  If
  it cannot be killed, the filesystem switches to EIO mode: correctness is
  never traded for liveness.
* Bounded input: a line longer than ``MAX_LINE`` or more than ``MAX_REQUESTS``
  client requests in flight is a protocol error (the reference has no bound).

Concurrency model.  FUSE handlers never block on the protocol: a ``read`` of
the link with nothing to say is parked (deferred reply) and answered by
whoever queues the next message; ``write`` only parses and dispatches --
client requests run on the ``requests`` thread pool, replies to server
requests wake the waiting pin sender.  Pin senders wait on a per-request
event with the pin deadline.

Locks, in acquisition order (after the filesystem's head lock, which reads
and watch setups hold shared):

1. ``WatchLink.setup_mu[foid]`` -- one watch setup per file per link.
2. ``BigFile.watch_mu`` -- protects ``BigFile.watches``.
3. ``Watch.mu`` -- protects ``Watch.at`` and ``Watch.pinned``.
4. ``WatchLink.mu`` -- protects the link's queues, pending server requests,
   its watch table and ``down``; a leaf: nothing is acquired under it and no
   reply is sent while holding it.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .rwlock import RWLock

if TYPE_CHECKING:
    from .fs import WCFS, BigFile

log = logging.getLogger("wcfs")

MAX_LINE = 1024            # longest line accepted from a client (bytes, LF included)
MAX_REQUESTS = 64          # client requests in flight per link
CONTROL_TIMEOUT = 1.0      # how long the last words on stream 0 wait to be read
LIVENESS_POLL = 0.1

_HEX16 = re.compile(r"^[0-9a-fA-F]{16}$")
_STREAM = re.compile(r"^[0-9]+$")


def hex16(v: int) -> str:
    return f"{v:016x}"


def go_duration(seconds: float) -> str:
    """Render a duration like Go's time.Duration.String (e.g. 1m30.5s, 250ms)."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    out = ""
    if h:
        out += f"{int(h)}h"
    if h or m:
        out += f"{int(m)}m"
    return out + f"{round(s, 6):g}s"


class PinError(Exception):
    """A pin was not acknowledged.  ``kind``: 'timeout', 'io' (link/EOF) or 'reply'."""

    def __init__(self, kind: str, cause: str) -> None:
        super().__init__(cause)
        self.kind = kind


@dataclass
class Watch:
    """One file watched on one link at ``at``."""
    link: "WatchLink"
    file: "BigFile"
    at: int
    pinned: dict[int, int] = field(default_factory=dict)    # blk -> rev (TID_HEAD never stored)
    mu: threading.Lock = field(default_factory=threading.Lock)      # protects `pinned`
    atlock: RWLock = field(default_factory=RWLock)   # exclusive: setup changes `at`; shared: read pins

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other) -> bool:
        return self is other


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    reply: str | None = None
    error: PinError | None = None


class WatchLink:
    """One open of head/watch."""

    def __init__(self, fs: "WCFS", pid: int, fh: int) -> None:
        self.fs = fs
        self.pid = pid
        self.fh = fh
        self.mu = threading.Lock()
        self.txq: deque[bytes] = deque()
        self.txbuf = b""                         # part of a line not yet read by the client
        self.parked: tuple | None = None         # (read request, size) parked until there is data
        self.rxbuf = bytearray()
        self.pending: dict[int, _Waiter] = {}    # server stream -> waiter
        self.next_sid = 2
        self.nrequests = 0
        self.byfile: dict[int, Watch] = {}       # foid -> watch
        self.setup_mu: dict[int, threading.Lock] = {}
        self.down = False
        self.down_reason = ""
        self.killed = threading.Event()          # the kill path ran for this link (once)
        self._kill_mu = threading.Lock()

    # --- transmit -------------------------------------------------------------------
    def _send_locked(self, line: str):
        """Queue a line; return a parked read to answer (outside the lock) if any."""
        self.txq.append(line.encode() + b"\n")
        parked, self.parked = self.parked, None
        return parked

    def _take_locked(self, size: int) -> bytes:
        out = bytearray(self.txbuf)
        self.txbuf = b""
        while self.txq and len(out) < size:
            out += self.txq.popleft()
        if len(out) > size:
            self.txbuf = bytes(out[size:])
            del out[size:]
        return bytes(out)

    def _answer_parked(self, parked: tuple | None) -> None:
        if parked is None:
            return
        req, size = parked
        with self.mu:
            data = self._take_locked(size)
            if not data and not self.down:
                if self.parked is None:
                    self.parked = parked     # nothing to say after all: park again
                    return
        try:
            req.reply_data(data)
        except Exception as exc:             # the read was interrupted meanwhile
            log.debug("watch link %d: reply to parked read: %s", self.fh, exc)

    def send(self, line: str) -> None:
        with self.mu:
            if self.down:
                return
            parked = self._send_locked(line)
        self._answer_parked(parked)

    # --- FUSE handlers ----------------------------------------------------------------
    def on_read(self, req, size: int) -> None:
        with self.mu:
            data = self._take_locked(size)
            if not data and not self.down:
                if self.parked is not None and not self.parked[0].replied:
                    raise OSError(errno.EBUSY, "only one reader at a time on a watch link")
                self.parked = (req, size)
                req.set_interrupt_handler(self._interrupted)
                return
        req.reply_data(data)

    def _interrupted(self, req) -> None:
        with self.mu:
            if self.parked is None or self.parked[0] is not req:
                return
            self.parked = None
        if not req.replied:
            req.reply_err(errno.EINTR)

    def on_write(self, data: bytes) -> None:
        with self.mu:
            if self.down:
                raise OSError(errno.EPIPE, "watch link is down")
            self.rxbuf += data
            lines = []
            while True:
                i = self.rxbuf.find(b"\n")
                if i < 0:
                    break
                lines.append(bytes(self.rxbuf[:i]))
                del self.rxbuf[:i + 1]
            overlong = len(self.rxbuf) >= MAX_LINE
        for line in lines:
            if len(line) >= MAX_LINE:
                return self.protocol_error(f"line too long ({len(line)} bytes)")
            self._dispatch(line.decode("utf-8", "replace"))
        if overlong:
            self.protocol_error(f"line too long (> {MAX_LINE} bytes without newline)")

    def _dispatch(self, line: str) -> None:
        sp = line.find(" ")
        stream_s = line[:sp] if sp >= 0 else ""
        if sp < 0 or not _STREAM.match(stream_s) or int(stream_s) >= 2**64:
            return self.protocol_error(f'invalid frame: "{line}" (invalid stream)')
        stream, payload = int(stream_s), line[sp + 1:]
        if stream % 2 == 0:
            with self.mu:
                w = self.pending.pop(stream, None)
            if w is None:
                return self.protocol_error(f"{stream}: unexpected reply (no such server request)")
            w.reply = payload
            w.event.set()
            return
        with self.mu:
            if self.down:
                return
            if self.nrequests >= MAX_REQUESTS:
                overflow = True
            else:
                overflow = False
                self.nrequests += 1
        if overflow:
            return self.protocol_error(f"too many requests in flight (> {MAX_REQUESTS})")
        if payload == "bye":
            self._finish_request()
            return self.shutdown("bye", control=None, graceful=True)
        # One thread per request: a setup may wait for head or for pin acks for long.
        threading.Thread(target=self._serve_request, args=(stream, payload),
                         name=f"wcfs-watch-{self.fh}", daemon=True).start()

    def _finish_request(self) -> None:
        with self.mu:
            self.nrequests -= 1

    def _serve_request(self, stream: int, payload: str) -> None:
        try:
            reply = self.fs.handle_watch_request(self, payload)
        except Exception as exc:
            log.exception("watch link %d: request %r", self.fh, payload)
            reply = f"error {exc}"
        finally:
            self._finish_request()
        if reply is not None:
            self.send(f"{stream} {reply}")

    # --- server requests ----------------------------------------------------------------
    def start_request(self, payload: str) -> tuple[int, "_Waiter"]:
        """Send a server request; the reply is awaited with ``wait_reply``.

        Split in two so that a caller can put many requests in flight (pins
        to several watchers, or many pins of one setup) and then wait for
        all: they travel concurrently without a thread per request.
        """
        w = _Waiter()
        with self.mu:
            if self.down:
                raise PinError("io", f"link is down ({self.down_reason})")
            sid = self.next_sid
            self.next_sid = (self.next_sid + 2) % 2**64 or 2
            self.pending[sid] = w
            parked = self._send_locked(f"{sid} {payload}")
        self._answer_parked(parked)
        return sid, w

    def wait_reply(self, sid: int, w: "_Waiter", deadline: float) -> str:
        """The reply to request ``sid``, waiting until ``deadline`` (monotonic)."""
        if not w.event.wait(max(0.0, deadline - time.monotonic())):
            with self.mu:
                self.pending.pop(sid, None)
            raise PinError("timeout", "timeout")
        if w.error is not None:
            raise w.error
        return w.reply or ""

    def request(self, payload: str, deadline: float) -> str:
        """Send a server request and wait for the reply until ``deadline`` (monotonic)."""
        sid, w = self.start_request(payload)
        return self.wait_reply(sid, w, deadline)

    # --- shutdown ----------------------------------------------------------------------
    def protocol_error(self, why: str) -> None:
        log.warning("watch link %d (pid %d): protocol error: %s", self.fh, self.pid, why)
        self.shutdown(why, control=f"0 error: {why}")

    def shutdown(self, reason: str, control: str | None, graceful: bool = False) -> None:
        """Close the link: last words on stream 0, EOF for the reader, pending pins fail."""
        with self.mu:
            if self.down:
                return
            if control is not None:
                self.txq.append(control.encode() + b"\n")
            self.down = True
            self.down_reason = reason
            pending, self.pending = self.pending, {}
            parked, self.parked = self.parked, None
        kind = "io"
        for w in pending.values():
            w.error = PinError(kind, "link is down (bye)" if graceful else f"link is down ({reason})")
            w.event.set()
        self._answer_parked(parked)
        self.fs.unregister_link_watches(self)

    def on_release(self) -> None:
        self.shutdown("closed", control=None)

    # --- faulty clients -------------------------------------------------------------------
    def pin_failed(self, blk: int, rev: str, err: PinError, deadline: float) -> None:
        """§2.6: shut the link down with a fatal notice and deal with the client process."""
        if err.kind == "io" and self.down and self.down_reason == "bye":
            return          # the pin failed because of a polite close: never a kill reason
                            # (a nak or a timeout is a fault even if bye follows)
        self.shutdown(f"pin #{blk} @{rev}: {err}", control=f"0 fatal: pin #{blk} @{rev}: {err}")
        with self._kill_mu:
            if self.killed.is_set():
                return
            self.killed.set()
            self.fs.deal_with_faulty_client(self, err, deadline, blk, rev)


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, flags) of a process, None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2:].split()
    return rest[0], int(rest[6])


PF_EXITING = 0x4


def proc_alive(pid: int) -> bool:
    """Alive = exists, not a zombie, not exiting."""
    st = proc_state(pid)
    if st is None:
        return False
    state, flags = st
    return state not in ("Z", "X", "x") and not flags & PF_EXITING


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(LIVENESS_POLL)
    return True


def kill_faulty(pid: int, pin_timeout: float, why: str) -> bool:
    """SIGBUS, wait pintimeout/6, SIGKILL, wait until pintimeout/3 after start.  True if gone."""
    start = time.monotonic()
    log.warning("pid%d: killing faulty client: %s", pid, why)
    for sig, until in ((signal.SIGBUS, pin_timeout / 6), (signal.SIGKILL, pin_timeout / 3)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError as exc:
            log.critical("pid%d: cannot kill faulty client: %s", pid, exc)
            return False
        if wait_gone(pid, max(0.0, start + until - time.monotonic())):
            return True
    return not proc_alive(pid)
