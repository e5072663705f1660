"""A raw Python watch-link client for protocol tests (WCFS.md §2).

It speaks the wire format directly so that tests can also misbehave on
purpose (raw bytes, wrong replies, no replies).  A receiver thread reads
lines: odd streams complete the client's own requests, even streams are
queued as server requests, stream 0 is recorded as control messages.

Can be used as a script for child-process clients::

    python wlink.py MNT MODE FOID AT     # MODE: ack | noack | nak | closenoack | bye

which sets up the watch (acking setup pins except in `noack`/`nak`
modes), prints "ready <pins>" and then handles later pins per MODE.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from concurrent.futures import Future


class PinReq:
    def __init__(self, stream: int, msg: str) -> None:
        self.stream = stream
        self.msg = msg
        parts = msg.split(" ")
        self.foid = int(parts[1], 16) if len(parts) > 1 else None
        self.blk = int(parts[2][1:]) if len(parts) > 2 else None
        at = parts[3][1:] if len(parts) > 3 else None
        self.at = None if at in (None, "head") else int(at, 16)

    def __repr__(self) -> str:
        return f"PinReq({self.stream} {self.msg!r})"


class RawWatchLink:
    def __init__(self, mnt: str) -> None:
        self.fd = os.open(os.path.join(mnt, "head/watch"), os.O_RDWR)
        self._mu = threading.Lock()
        self._next = 1
        self._waiting: dict[int, Future] = {}
        self.requests: "queue.Queue[PinReq | None]" = queue.Queue()
        self.control: list[str] = []
        self.eof = threading.Event()
        self._rx = threading.Thread(target=self._recv_loop, daemon=True)
        self._rx.start()

    def _recv_loop(self) -> None:
        buf = b""
        try:
            while True:
                data = os.read(self.fd, 4096)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._dispatch(line.decode())
        except OSError:
            pass
        finally:
            self.eof.set()
            self.requests.put(None)
            with self._mu:
                waiting, self._waiting = self._waiting, {}
            for fut in waiting.values():
                fut.set_exception(EOFError("link closed"))

    def _dispatch(self, line: str) -> None:
        stream_s, _, payload = line.partition(" ")
        stream = int(stream_s)
        if stream == 0:
            self.control.append(payload)
        elif stream % 2:
            with self._mu:
                fut = self._waiting.pop(stream, None)
            if fut is not None:
                fut.set_result(payload)
        else:
            self.requests.put(PinReq(stream, payload))

    def write_raw(self, data: bytes) -> None:
        os.write(self.fd, data)

    def send_async(self, msg: str) -> Future:
        fut: Future = Future()
        with self._mu:
            stream = self._next
            self._next += 2
            self._waiting[stream] = fut
        os.write(self.fd, f"{stream} {msg}\n".encode())
        return fut

    def send_req(self, msg: str, timeout: float = 30) -> str:
        return self.send_async(msg).result(timeout)

    def recv_req(self, timeout: float = 10) -> PinReq | None:
        return self.requests.get(timeout=timeout)

    def reply(self, req: PinReq, msg: str = "ack") -> None:
        os.write(self.fd, f"{req.stream} {msg}\n".encode())

    def watch(self, foid: int, at: int | None, timeout: float = 30) -> tuple[str, list[PinReq]]:
        """Send a watch request acking every pin until the reply; return (reply, pins)."""
        fut = self.send_async(f"watch {foid:016x} " + ("-" if at is None else f"@{at:016x}"))
        pins = []
        while not fut.done():
            try:
                req = self.requests.get(timeout=0.05)
            except queue.Empty:
                continue
            if req is None:
                break
            pins.append(req)
            self.reply(req)
        return fut.result(timeout), pins

    def bye(self) -> None:
        try:
            os.write(self.fd, f"{self._next} bye\n".encode())
        except OSError:
            pass
        self._next += 2

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        self._rx.join(timeout=10)


def _child_main(argv: list[str]) -> None:
    mnt, mode, foid, at = argv[0], argv[1], int(argv[2], 16), int(argv[3], 16)
    wl = RawWatchLink(mnt)
    reply, pins = wl.watch(foid, at)
    print("ready", reply, " ".join(p.msg.replace(" ", "_") for p in pins), flush=True)
    while True:
        req = wl.recv_req(timeout=3600)
        if req is None:
            print("eof", " | ".join(wl.control), flush=True)
            return
        print("pin", req.msg, flush=True)
        if mode == "ack":
            wl.reply(req)
        elif mode == "nak":
            wl.reply(req, "nak: refusing on purpose")
        elif mode == "closenoack":
            os._exit(0)
        elif mode == "bye":
            wl.bye()
        # noack: ignore it


if __name__ == "__main__":
    _child_main(sys.argv[1:])
