#!/usr/bin/env python3
"""A small filesystem on wcfs._fuse, served in a child process for the binding's tests.

    python tests/fusetestfs.py MOUNTPOINT [--no-explicit-inval] [--max-threads N]
                               [--fsname S] [-o MOUNTOPT]...

Each file exercises one feature of the binding (see FILES below): static and
pattern data, reads answered later from other threads, handlers that raise or
drop their request, reads that block until interrupted, replies racing
interrupts, a stream file with pipe semantics, and files whose attributes the
test changes.

The test drives the server through a control channel: one JSON object per line
on stdin, one JSON answer per line on stdout (the first line out is
{"ready": true, ...} once the kernel's INIT was negotiated; a line
{"event": "loop_returned"} comes unasked if the loop ends by itself).  Control
commands run on the main thread, never on a FUSE worker: a notification they
send may wait for a READ that another thread answers, never for one it would
have to answer itself (see MEASURED.md, pitfall 1).  EOF on stdin or
{"op": "quit"} stops the loop with Session.exit(), unmounts and exits.  All
state shared between FUSE workers, timers and the control thread is guarded by
TestFS.mu.
"""
from __future__ import annotations

import argparse
import collections
import errno
import hashlib
import json
import logging
import os
import queue
import random
import stat
import sys
import threading
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wcfs import _fuse  # noqa: E402

log = logging.getLogger("fusetestfs")

MiB = 1 << 20
PERIOD = 2 * MiB          # pattern files repeat with this period
ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 60.0
MTIME0_NS = 1_700_000_000 * 10**9

ROOT = _fuse.ROOT_ID
MANY_DIR = 20             # directory with MANY_N entries (readdir chunking)
MANY_N = 300


@dataclass
class Node:
    ino: int
    name: bytes
    kind: str                  # how reads are served, see TestFS.read
    size: int = 0
    seed: int = 0              # pattern files
    keep_cache: bool = False
    direct_io: bool = False
    nonseekable: bool = False
    stream: bool = False
    attr_timeout: float = ATTR_TIMEOUT
    mtime_ns: int = MTIME0_NS
    is_dir: bool = False


HELLO = b"hello, world\n"

FILES = [
    Node(2, b"hello", "static", size=len(HELLO), keep_cache=True),
    Node(3, b"big", "pattern", size=1024 * MiB, seed=3),                 # cold on every open
    Node(4, b"slow", "timer", size=256 * 1024, seed=4, direct_io=True),  # answered by a timer thread
    Node(5, b"fail", "raise", size=4096),
    Node(6, b"block", "block", size=4096, direct_io=True),
    Node(7, b"blocklate", "blocklate", size=4096, direct_io=True),
    Node(8, b"stream", "stream", direct_io=True, nonseekable=True, stream=True),
    Node(9, b"cache", "pattern", size=4 * MiB, seed=9, keep_cache=True),
    Node(10, b"store", "fill", size=8 * MiB, keep_cache=True),
    Node(11, b"attrs", "pattern", size=4 * MiB, seed=11, keep_cache=True, attr_timeout=0.0),
    Node(12, b"double", "double", size=4096, direct_io=True),
    Node(13, b"parked", "parked", size=64 * 1024, seed=13, direct_io=True),
    Node(14, b"drop", "drop", size=4096, direct_io=True),
    Node(15, b"nostream", "stream", direct_io=True, nonseekable=True),
    Node(16, b"race", "race", size=4096, seed=16, direct_io=True),     # reply races interrupt
    Node(17, b"pcache", "parked", size=4 * MiB, seed=17, keep_cache=True),  # parked, cached
    Node(MANY_DIR, b"many", "dir", is_dir=True),
]

STORE_FILL = b"S"          # what READs of "store" return; stores put other bytes


_bases: dict[int, bytes] = {}


def pattern_base(seed: int) -> bytes:
    """Two periods of the pattern of `seed`, so any slice up to PERIOD is contiguous."""
    b = _bases.get(seed)
    if b is None:
        one = random.Random(seed).randbytes(PERIOD)
        b = _bases[seed] = one + one
    return b


def pattern(seed: int, off: int, n: int) -> bytes:
    """Content of a pattern file with `seed` at [off, off+n)."""
    out = bytearray()
    base = pattern_base(seed)
    while n > 0:
        start = off % PERIOD
        k = min(n, PERIOD)
        out += base[start:start + k]
        off += k
        n -= k
    return bytes(out)


def many_name(i: int) -> bytes:
    return b"entry-%04d-%s" % (i, b"x" * 40)


class TestFS(_fuse.Operations):
    def __init__(self) -> None:
        self.session: _fuse.Session | None = None
        self.nodes = {n.ino: n for n in FILES}
        self.by_name = {n.name: n for n in FILES}
        self.many = [(many_name(i), 1000 + i, stat.S_IFREG | 0o444) for i in range(MANY_N)]
        self.mu = threading.Lock()
        self.retrieved_cv = threading.Condition(self.mu)
        self.ready = threading.Event()
        self.conn: _fuse.ConnInfo | None = None
        self.next_fh = 1
        self.reads: collections.Counter[int] = collections.Counter()
        self.store_reads: list[tuple[int, int]] = []             # (off, size) of READs of "store"
        self.lookups: collections.Counter[str] = collections.Counter()
        self.interrupts = 0
        self.interrupted_flags: list[bool] = []                 # Request.interrupted in handlers
        self.block_pids: list[int] = []                         # Request.pid of block reads
        self.blocked: set[_fuse.Request] = set()                 # block/blocklate reads
        self.parked: list[tuple[_fuse.Request, int, int, int]] = []  # parked (req, ino, size, off)
        self.stream_buf: dict[int, bytearray] = {8: bytearray(), 15: bytearray()}
        self.stream_readers: dict[int, collections.deque] = {8: collections.deque(),
                                                             15: collections.deque()}
        self.double_errors: list[str] = []
        self.retrieved: dict[int, tuple[int, int, bytes]] = {}
        self.race_q: queue.Queue = queue.Queue()
        self.race = collections.Counter()       # replied / interrupted / lost (raced)
        for i in range(2):
            threading.Thread(target=self.race_answerer, name=f"race-{i}", daemon=True).start()

    # ------------------------------------------------------------ attributes

    def attr(self, ino: int) -> _fuse.Attr:
        if ino == ROOT or ino == MANY_DIR:
            return _fuse.Attr(ino=ino, mode=stat.S_IFDIR | 0o755, nlink=2,
                              mtime_ns=MTIME0_NS, ctime_ns=MTIME0_NS)
        if ino >= 1000:
            return _fuse.Attr(ino=ino, mode=stat.S_IFREG | 0o444, size=0)
        n = self.nodes[ino]
        mode = stat.S_IFREG | (0o666 if n.kind == "stream" else 0o444)
        return _fuse.Attr(ino=ino, mode=mode, size=n.size, blksize=PERIOD,
                          blocks=(n.size + 511) // 512,
                          atime_ns=n.mtime_ns, mtime_ns=n.mtime_ns, ctime_ns=n.mtime_ns)

    def init(self, conn: _fuse.ConnInfo) -> None:
        self.conn = conn
        self.ready.set()

    def lookup(self, req: _fuse.Request, parent: int, name: bytes) -> None:
        with self.mu:
            self.lookups[name.decode()] += 1
        if parent == ROOT and name == b"boom":
            raise RuntimeError("injected lookup failure")
        if parent == ROOT:
            node = self.by_name.get(name)
            if node is None:
                req.reply_err(errno.ENOENT)
                return
            req.reply_entry(self.attr(node.ino), entry_timeout=ENTRY_TIMEOUT,
                            attr_timeout=node.attr_timeout)
            return
        if parent == MANY_DIR:
            for ent in self.many:
                if ent[0] == name:
                    req.reply_entry(self.attr(ent[1]), entry_timeout=ENTRY_TIMEOUT,
                                    attr_timeout=ATTR_TIMEOUT)
                    return
        req.reply_err(errno.ENOENT)

    def forget(self, ino: int, nlookup: int) -> None:
        pass

    def getattr(self, req: _fuse.Request, ino: int, fh: int | None) -> None:
        if ino != ROOT and ino != MANY_DIR and ino < 1000 and ino not in self.nodes:
            req.reply_err(errno.ENOENT)
            return
        timeout = self.nodes[ino].attr_timeout if ino in self.nodes else ATTR_TIMEOUT
        req.reply_attr(self.attr(ino), timeout)

    def statfs(self, req: _fuse.Request, ino: int) -> None:
        req.reply_statfs(bsize=PERIOD, frsize=PERIOD, namemax=255)

    # ------------------------------------------------------------ open / dirs

    def open(self, req: _fuse.Request, ino: int, flags: int) -> None:
        n = self.nodes.get(ino)
        if n is None or n.is_dir:
            req.reply_err(errno.EISDIR if n is not None else errno.ENOENT)
            return
        if (flags & os.O_ACCMODE) != os.O_RDONLY and n.kind != "stream":
            req.reply_err(errno.EACCES)
            return
        with self.mu:
            fh = self.next_fh
            self.next_fh += 1
        req.reply_open(fh, keep_cache=n.keep_cache, direct_io=n.direct_io,
                       nonseekable=n.nonseekable, stream=n.stream)

    def opendir(self, req: _fuse.Request, ino: int, flags: int) -> None:
        req.reply_open(0)

    def readdir(self, req: _fuse.Request, ino: int, size: int, off: int, fh: int) -> None:
        if ino == ROOT:
            entries = [(n.name, n.ino, stat.S_IFDIR if n.is_dir else stat.S_IFREG)
                       for n in FILES]
        else:
            entries = self.many
        req.reply_dir(entries, size, off)

    def releasedir(self, req: _fuse.Request, ino: int, fh: int) -> None:
        req.reply_err(0)

    def flush(self, req: _fuse.Request, ino: int, fh: int) -> None:
        req.reply_err(0)

    def release(self, req: _fuse.Request, ino: int, fh: int) -> None:
        req.reply_err(0)

    # ------------------------------------------------------------ data

    def data(self, n: Node, size: int, off: int):
        end = min(n.size, off + size)
        if off >= end:
            return b""
        if n.kind == "static":
            return HELLO[off:end]
        if n.kind == "fill":
            return STORE_FILL * (end - off)
        start = off % PERIOD
        return memoryview(pattern_base(n.seed))[start:start + (end - off)]

    def read(self, req: _fuse.Request, ino: int, size: int, off: int, fh: int) -> None:
        n = self.nodes[ino]
        with self.mu:
            self.reads[ino] += 1
            if ino == 10:
                self.store_reads.append((off, size))
        kind = n.kind
        if kind in ("static", "pattern", "fill"):
            req.reply_data(self.data(n, size, off))
        elif kind == "timer":
            t = threading.Timer(0.1, lambda: req.reply_data(self.data(n, size, off)))
            t.daemon = True
            t.start()
        elif kind == "parked":
            with self.mu:
                self.parked.append((req, ino, size, off))
        elif kind == "raise":
            raise RuntimeError("injected read failure")
        elif kind == "drop":
            return          # the Request dies unanswered: the binding must answer EIO
        elif kind in ("block", "blocklate"):
            with self.mu:
                self.block_pids.append(req.pid)
            if kind == "blocklate":
                # let the interrupt arrive before the handler is registered
                with self.mu:
                    self.blocked.add(req)
                time.sleep(0.5)
            with self.mu:
                self.blocked.add(req)
            req.set_interrupt_handler(self.on_interrupt)
        elif kind == "stream":
            with self.mu:
                buf = self.stream_buf[ino]
                if buf:
                    chunk = bytes(buf[:size])
                    del buf[:size]
                else:
                    self.stream_readers[ino].append((req, size))
                    chunk = None
            if chunk is not None:
                req.reply_data(chunk)
            else:
                req.set_interrupt_handler(self.on_interrupt)
        elif kind == "race":
            req.set_interrupt_handler(self.on_race_interrupt)
            self.race_q.put((req, size, off))
        elif kind == "double":
            req.reply_data(b"once" if off == 0 else b"")
            for again in (lambda: req.reply_data(b"twice"), lambda: req.reply_err(errno.EIO)):
                try:
                    again()
                except RuntimeError as e:
                    with self.mu:
                        self.double_errors.append(str(e))
        else:
            req.reply_err(errno.EIO)

    def on_interrupt(self, req: _fuse.Request) -> None:
        with self.mu:
            self.interrupts += 1
            self.interrupted_flags.append(req.interrupted)
            self.blocked.discard(req)
            for q in self.stream_readers.values():
                for item in list(q):
                    if item[0] is req:
                        q.remove(item)
        req.reply_err(errno.EINTR)

    def race_answerer(self) -> None:
        rng = random.Random()
        while True:
            req, size, off = self.race_q.get()
            time.sleep(rng.uniform(0, 0.002))
            try:
                req.reply_data(self.data(self.nodes[16], size, off))
                what = "replied"
            except RuntimeError:
                what = "lost"
            with self.mu:
                self.race[what] += 1

    def on_race_interrupt(self, req: _fuse.Request) -> None:
        try:
            req.reply_err(errno.EINTR)
            what = "interrupted"
        except RuntimeError:
            what = "lost"
        with self.mu:
            self.race[what] += 1

    def write(self, req: _fuse.Request, ino: int, data: bytes, off: int, fh: int) -> None:
        n = self.nodes[ino]
        if n.kind != "stream":
            req.reply_err(errno.EACCES)
            return
        # pipe semantics: hand the data to a parked reader, else buffer it
        with self.mu:
            readers = self.stream_readers[ino]
            reader = readers.popleft() if readers else None
            if reader is None:
                self.stream_buf[ino] += data
            else:
                rest = data[reader[1]:]
                self.stream_buf[ino] += rest
        if reader is not None:
            reader[0].reply_data(data[:reader[1]])
        req.reply_write(len(data))

    def retrieve_reply(self, cookie: int, ino: int, offset: int, data: bytes) -> None:
        with self.retrieved_cv:
            self.retrieved[cookie] = (ino, offset, data)
            self.retrieved_cv.notify_all()

    # ------------------------------------------------------------ control

    def stats(self) -> dict:
        with self.mu:
            return {
                "reads": {str(k): v for k, v in self.reads.items()},
                "lookups": dict(self.lookups),
                "interrupts": self.interrupts,
                "blocked": len(self.blocked),
                "parked": len(self.parked),
                "stream_readers": {str(k): len(v) for k, v in self.stream_readers.items()},
                "double_errors": list(self.double_errors),
                "interrupted_flags": list(self.interrupted_flags),
                "block_pids": list(self.block_pids),
                "race": dict(self.race),
                "store_reads": list(self.store_reads),
            }

    def release_parked(self) -> int:
        with self.mu:
            parked, self.parked = self.parked, []
        for req, ino, size, off in parked:
            req.reply_data(self.data(self.nodes[ino], size, off))
        return len(parked)

    def feed(self, ino: int, data: bytes) -> bool:
        """Answer a parked reader of a stream file from the control thread."""
        with self.mu:
            readers = self.stream_readers[ino]
            reader = readers.popleft() if readers else None
        if reader is None:
            return False
        reader[0].reply_data(data[:reader[1]])
        return True

    def retrieve(self, ino: int, off: int, size: int, timeout: float = 10.0) -> dict:
        assert self.session is not None
        cookie = self.session.notify_retrieve(ino, off, size)
        deadline = time.monotonic() + timeout
        with self.retrieved_cv:
            while cookie not in self.retrieved:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no retrieve_reply for cookie {cookie}")
                self.retrieved_cv.wait(left)
            rino, roff, data = self.retrieved.pop(cookie)
        return {"cookie": cookie, "ino": rino, "offset": roff, "len": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "head": data[:16].hex()}


def conn_dict(c: _fuse.ConnInfo) -> dict:
    return {k: getattr(c, k) for k in
            ("proto_major", "proto_minor", "capable", "want", "max_write", "max_read",
             "max_readahead", "max_background", "congestion_threshold", "explicit_inval_data")}


def handle(fs: TestFS, sess: _fuse.Session, loop_thread: threading.Thread,
           exiting: threading.Event, cmd: dict) -> dict:
    op = cmd["op"]
    try:
        if op == "stats":
            return {"ok": True, **fs.stats()}
        if op == "conn":
            return {"ok": True, "conn": conn_dict(fs.conn)}
        if op == "release_parked":
            return {"ok": True, "released": fs.release_parked()}
        if op == "release_parked_later":
            # from another thread, while this one may be blocked in a notification
            t = threading.Timer(cmd["delay"], fs.release_parked)
            t.daemon = True
            t.start()
            return {"ok": True}
        if op == "inval":
            sess.notify_inval_inode(cmd["ino"], cmd["off"], cmd["len"])
            return {"ok": True}
        if op == "inval_entry":
            sess.notify_inval_entry(cmd["parent"], cmd["name"].encode())
            return {"ok": True}
        if op == "store":
            data = bytearray(bytes([cmd["byte"]]) * cmd["len"])   # buffer protocol, not bytes
            t0 = time.perf_counter()
            sess.notify_store(cmd["ino"], cmd["off"], data)
            return {"ok": True, "seconds": time.perf_counter() - t0}
        if op == "retrieve":
            return {"ok": True, **fs.retrieve(cmd["ino"], cmd["off"], cmd["size"])}
        if op == "feed":
            return {"ok": True, "fed": fs.feed(cmd["ino"], cmd["data"].encode())}
        if op == "set_attr":
            n = fs.nodes[cmd["ino"]]
            with fs.mu:
                if "size" in cmd:
                    n.size = cmd["size"]
                if "mtime_ns" in cmd:
                    n.mtime_ns = cmd["mtime_ns"]
            return {"ok": True}
        if op == "unmount":
            sess.unmount()
            return {"ok": True}
        if op == "exit_loop":
            exiting.set()
            sess.exit()
            loop_thread.join(10)
            return {"ok": True, "loop_returned": not loop_thread.is_alive()}
        return {"ok": False, "error": f"unknown op {op!r}"}
    except OSError as e:
        return {"ok": False, "errno": e.errno, "error": str(e)}


_stdout_mu = threading.Lock()     # the control thread and the serve thread both write


def send(obj: dict) -> None:
    with _stdout_mu:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mountpoint")
    ap.add_argument("--no-explicit-inval", action="store_true")
    ap.add_argument("--max-threads", type=int, default=16)
    ap.add_argument("--fsname", default="fusetestfs")
    ap.add_argument("-o", dest="opts", action="append", default=[], help="extra mount option")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s: %(message)s")

    fs = TestFS()
    sess = _fuse.Session(fs, args.mountpoint,
                         [f"fsname={args.fsname}", "subtype=wcfstest", "default_permissions",
                          *args.opts],
                         explicit_inval_data=not args.no_explicit_inval,
                         max_threads=args.max_threads, max_idle_threads=4)
    fs.session = sess
    sess.mount()
    loop_result: dict = {}

    exiting = threading.Event()

    def serve() -> None:
        try:
            sess.loop()
            loop_result["ok"] = True
        except BaseException as e:
            log.exception("session loop failed")
            loop_result["error"] = repr(e)
        if not exiting.is_set():
            # the loop ended by itself (external unmount): tell the test
            send({"event": "loop_returned", **loop_result})

    loop_thread = threading.Thread(target=serve, name="serve")
    loop_thread.start()
    if not fs.ready.wait(15):
        send({"ready": False, "error": "no INIT within 15 s", **loop_result})
        sess.unmount()
        os._exit(2)
    send({"ready": True, "pid": os.getpid(), "fd": sess.fd, "conn": conn_dict(fs.conn),
          "fuse_version": _fuse.FUSE_VERSION})

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        send(handle(fs, sess, loop_thread, exiting, cmd))
        if cmd["op"] == "exit_loop":
            break

    exiting.set()
    sess.exit()
    loop_thread.join(10)
    if loop_thread.is_alive():
        log.error("loop did not return after exit(); unmounting")
        sess.unmount()
        loop_thread.join(10)
        if loop_thread.is_alive():
            os._exit(3)
    sess.close()
    send({"bye": True, **loop_result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
