"""A lean, single-threaded watch-link client for timing the isolation protocol (WCFS.md §2).

The test-suite's client (tests/wlink.py) hands every message through a
receiver thread and a queue; that is right for tests that misbehave on
purpose, but each hand-over is a thread wake-up (tens of µs on our VMs), which
would be charged to the server.  Here one thread does everything: it writes
a request and then reads lines, answering every server request (even
stream) with ``ack`` the moment it is parsed, until the reply on its own
stream arrives.  That is the fastest a Python client can answer, so the
figures measure the server plus the unavoidable kernel round trips.

As a child process (one watcher of the ``pin_rtt`` benchmark)::

    python -m bench.wclient MNT FOID_HEX AT_HEX

sets up the watch, prints ``ready <npins>``, then acks every pin until its
stdin reaches EOF; it then says ``bye`` and exits.  The ack loop owns the
link's read side; the stdin thread only writes ``bye`` (the server opens
``head/watch`` as a stream, so a write does not wait for the blocked read).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (interrupts a blocked read).

    The server answers a FUSE interrupt of a pending watch-link read with
    EINTR (WCFS.md §1.5), so the signal really unblocks us.  Outside the
    main thread this is a no-op (signals only reach the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame) -> None:
        raise TimeoutError(f"{what}: no answer in {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class WatchClient:
    """One watch link; not thread-safe except `bye` (see module docstring).

    ``batch_acks``: answer all pins that one ``read()`` brought in with one
    ``write()`` (the protocol allows several lines per write) instead of one
    write per pin -- every write is a FUSE request the server handles on
    its own, so this shows how much of a setup is per-ack overhead.
    """

    def __init__(self, mnt: str, record: bool = False, batch_acks: bool = False) -> None:
        self.fd = os.open(os.path.join(mnt, "head/watch"), os.O_RDWR)
        self._buf = b""
        self._next = 1              # next client stream id (odd)
        self.npins = 0              # pins acknowledged so far
        self.record = record
        self.batch_acks = batch_acks
        self.pins: list[str] = []   # payloads of the pins acknowledged, if recording
        self.closed = False

    def _serve_chunk(self) -> dict[int, str]:
        """Read once, ack the pins in what came, return the replies to our requests {stream: payload}.

        Raises EOFError when the server closed the link.
        """
        data = os.read(self.fd, 65536)
        if not data:
            self.closed = True
            raise EOFError("watch link closed by the server")
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        replies: dict[int, str] = {}
        acks: list[bytes] = []
        for line in lines:
            sid, _, payload = line.partition(b" ")
            n = int(sid)
            if n % 2:
                replies[n] = payload.decode()
            elif n:
                ack = sid + b" ack\n"
                if self.batch_acks:
                    acks.append(ack)
                else:
                    os.write(self.fd, ack)
                self.npins += 1
                if self.record:
                    self.pins.append(payload.decode())
            else:
                raise ConnectionError(f"server: {payload.decode()}")
        if acks:
            os.write(self.fd, b"".join(acks))
        return replies

    def request(self, msg: str, timeout: float = 60.0) -> str:
        """Send a request; ack every pin that arrives meanwhile; return the reply payload."""
        stream = self._next
        self._next += 2
        with deadline(timeout, msg):
            os.write(self.fd, f"{stream} {msg}\n".encode())
            while True:
                reply = self._serve_chunk().get(stream)
                if reply is not None:
                    return reply

    def watch(self, foid: int, at: int, timeout: float = 60.0) -> str:
        return self.request(f"watch {foid:016x} @{at:016x}", timeout)

    def ack_forever(self) -> None:
        """Acknowledge every pin until the link is closed."""
        try:
            while True:
                self._serve_chunk()
        except EOFError:
            pass

    def bye(self) -> None:
        try:
            os.write(self.fd, f"{self._next} bye\n".encode())
        except OSError:
            pass
        self._next += 2

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "WatchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.bye()
        self.close()


def _child_main(argv: list[str]) -> int:
    mnt, foid, at = argv[0], int(argv[1], 16), int(argv[2], 16)
    wc = WatchClient(mnt)
    reply = wc.watch(foid, at)
    if reply != "ok":
        print(f"error {reply}", flush=True)
        return 1
    print(f"ready {wc.npins}", flush=True)

    def on_stdin_eof() -> None:
        sys.stdin.read()
        wc.bye()

    threading.Thread(target=on_stdin_eof, daemon=True).start()
    t0 = time.monotonic()
    try:
        wc.ack_forever()
    except OSError:
        pass
    print(f"done {wc.npins} {time.monotonic() - t0:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
