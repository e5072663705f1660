"""Tests of wcfs._fuse, the libfuse3 low-level binding, against real FUSE mounts.

Every test mounts tests/fusetestfs.py in a child process on a fresh mountpoint
under /tmp and drives it through its JSON control channel (stdin/stdout).  The
file operations of a test run in helper threads or child processes with a
timeout, so a misbehaving server fails the test instead of hanging it; the
fixture then stops the server (gracefully, else SIGKILL by pid, else — if it
hangs in the kernel — by aborting its connection through fusectl, which also
unblocks stuck callers), unmounts with `fusermount3 -u` / `umount -l` and
removes the mountpoint.

Page-cache checks use mincore(2) on a mapping of the file right after the
access that populated the cache: this machine reclaims idle page cache within
seconds, so checks that pages *stay* cached are retried a few times, while
checks that pages are *gone* must hold every time.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import fusetestfs as tfs
from wcfs import _fuse

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fusetestfs.py")
PAGE = mmap.PAGESIZE
MiB = 1 << 20
RETRIES = 5

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


# ---------------------------------------------------------------- helpers

def _mountinfo_entry(mnt: str) -> tuple[str, str, str] | None:
    """(device, fstype, source) of the mount at mnt, from /proc/self/mountinfo
    (never touches the mount itself, which may hang), or None."""
    def unescape(s: str) -> str:
        return s.encode().decode("unicode_escape") if "\\" in s else s
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if unescape(fields[4]) == mnt:
                fstype, source = right.split()[:2]
                return fields[2], fstype, unescape(source)
    return None


def _mountinfo(mnt: str) -> tuple[str, str] | None:
    """(fstype, source) of the mount at mnt, or None."""
    e = _mountinfo_entry(mnt)
    return None if e is None else (e[1], e[2])


def mounted(mnt: str) -> bool:
    return _mountinfo_entry(mnt) is not None


def abort_connection(mnt: str) -> None:
    """Abort the FUSE connection of mnt: every request fails, blocked callers return."""
    e = _mountinfo_entry(mnt)
    if e is None:
        return
    try:
        with open(f"/sys/fs/fuse/connections/{e[0].split(':')[1]}/abort", "w") as f:
            f.write("1")
    except OSError:
        pass


def run_bounded(argv: list[str], timeout: float = 10.0) -> None:
    """Run a helper; give up on it (kill, do not wait) if it hangs, e.g. in the kernel."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            pass


def in_thread(fn, *args, timeout: float = 15.0):
    """fn(*args) in a helper thread; fail the test if it does not finish in time."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)}{args} did not finish within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def pread_all(fd: int, size: int, off: int = 0) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, min(MiB, size - len(out)), off + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def residency(fd: int, size: int) -> list[bool]:
    """Which pages of [0, size) of fd's file are in the page cache (mincore)."""
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr == _MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, f"mmap: {os.strerror(e)}")
    try:
        n = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * n)()
        if _libc.mincore(addr, size, vec) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mincore: {os.strerror(e)}")
        return [bool(v & 1) for v in vec]
    finally:
        _libc.munmap(addr, size)


class Server:
    """tests/fusetestfs.py running in a child process on a fresh mountpoint."""

    def __init__(self, logdir: str, *args: str) -> None:
        self.mnt = tempfile.mkdtemp(prefix="wcfs-fusetest-", dir="/tmp")
        self.logpath = os.path.join(logdir, f"fusetestfs-{os.path.basename(self.mnt)}.log")
        self._buf = b""
        self.proc: subprocess.Popen | None = None
        try:
            with open(self.logpath, "wb") as logf:
                self.proc = subprocess.Popen([sys.executable, SERVER, self.mnt, *args],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=logf, close_fds=True)
            self.ready = self.recv(30)
            assert self.ready.get("ready"), self.ready
        except BaseException:
            self.stop()
            raise
        self.conn = self.ready["conn"]

    def path(self, name: str) -> str:
        return os.path.join(self.mnt, name)

    def log(self) -> str:
        with open(self.logpath, errors="replace") as f:
            return f.read()

    def recv(self, timeout: float = 15.0) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from the test server within {timeout} s\n"
                                   f"{self.log()[-3000:]}")
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    raise EOFError(f"test server exited ({self.proc.poll()})\n{self.log()[-3000:]}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, op: str, timeout: float = 15.0, **kw) -> dict:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}).encode() + b"\n")
        self.proc.stdin.flush()
        return self.recv(timeout)

    def stats(self) -> dict:
        return self.cmd("stats")

    def stop(self) -> None:
        """Quit gracefully; else kill by pid, and if the server hangs in the kernel
        (e.g. a notification waiting for a page lock) abort its connection.
        Always unmount and remove the mountpoint."""
        p = self.proc
        try:
            if p is not None and p.poll() is None:
                try:
                    p.stdin.write(b'{"op": "quit"}\n')
                    p.stdin.flush()
                    p.stdin.close()
                except OSError:
                    pass
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    try:
                        p.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        abort_connection(self.mnt)
                        p.wait(timeout=15)
        finally:
            if p is not None:
                for f in (p.stdin, p.stdout):
                    try:
                        if f is not None:
                            f.close()
                    except OSError:
                        pass
            if mounted(self.mnt):
                if p is None or p.poll() is not None:
                    abort_connection(self.mnt)      # no server: nothing to wait for
                run_bounded(["fusermount3", "-u", self.mnt])
            if mounted(self.mnt):
                run_bounded(["umount", "-l", self.mnt])
            try:
                os.rmdir(self.mnt)
            except OSError:
                pass


@pytest.fixture
def make_fs(tmp_path):
    servers: list[Server] = []

    def make(*args: str) -> Server:
        s = Server(str(tmp_path), *args)
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            s.stop()
        for s in servers:
            assert not mounted(s.mnt), f"{s.mnt} still mounted"
            assert s.proc is None or s.proc.poll() is not None, "test server still running"


@pytest.fixture
def fs(make_fs) -> Server:
    return make_fs()


# ---------------------------------------------------------------- in-process API checks

def test_api_errors_without_mount(tmp_path):
    with pytest.raises(TypeError):
        _fuse.Request()
    a = _fuse.Attr(ino=5, mode=0o100444, size=10, mtime_ns=-1)
    a.size = 11
    assert (a.ino, a.size, a.mtime_ns, a.nlink) == (5, 11, -1, 1)
    assert isinstance(_fuse.FUSE_VERSION, int) and _fuse.FUSE_VERSION >= 312

    s = _fuse.Session(_fuse.Operations(), str(tmp_path / "missing"), [])
    assert s.fd == -1 and s.conn is None
    with pytest.raises(OSError) as ei:
        s.notify_inval_inode(1, 0, 0)
    assert ei.value.errno == errno.ENOTCONN
    with pytest.raises(RuntimeError):
        s.loop()
    with pytest.raises(OSError) as ei:
        s.mount()                       # mountpoint does not exist
    assert "missing" in str(ei.value)
    s.close()
    s.close()

    s = _fuse.Session(_fuse.Operations(), str(tmp_path), ["no_such_option=1"])
    with pytest.raises(OSError) as ei:
        s.mount()
    assert "no_such_option" in str(ei.value)
    s.close()


# ---------------------------------------------------------------- basic requests

def test_tree_attrs_and_static_reads(make_fs):
    fsname = "file:///x,y/Data.fs"           # a comma must survive libfuse's -o parsing
    fs = make_fs("--fsname", fsname)
    assert _mountinfo(fs.mnt) == ("fuse.wcfstest", fsname)

    names = in_thread(os.listdir, fs.mnt)
    assert sorted(names) == sorted(n.name.decode() for n in tfs.FILES)
    many = in_thread(os.listdir, fs.path("many"))       # several READDIR chunks
    assert sorted(many) == sorted(tfs.many_name(i).decode() for i in range(tfs.MANY_N))

    st = in_thread(os.stat, fs.path("hello"))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444
    assert st.st_size == len(tfs.HELLO)
    assert st.st_mtime_ns == tfs.MTIME0_NS
    assert st.st_blksize == tfs.PERIOD
    assert stat.S_ISDIR(in_thread(os.stat, fs.path("many")).st_mode)
    assert in_thread(read_file, fs.path("hello")) == tfs.HELLO

    with pytest.raises(FileNotFoundError):
        in_thread(os.stat, fs.path("nope"))
    with pytest.raises(OSError) as ei:                  # no mkdir handler: libfuse's ENOSYS
        in_thread(os.mkdir, fs.path("newdir"))
    assert ei.value.errno == errno.ENOSYS
    vfs = in_thread(os.statvfs, fs.mnt)
    assert (vfs.f_bsize, vfs.f_namemax) == (tfs.PERIOD, 255)

    def read_at(name: str, off: int, n: int) -> bytes:
        fd = os.open(fs.path(name), os.O_RDONLY)
        try:
            return pread_all(fd, n, off)
        finally:
            os.close(fd)

    for off, n in [(0, 100), (PAGE - 7, 3 * PAGE), (2 * MiB + 5, MiB), (tfs.PERIOD - 1, 2)]:
        assert in_thread(read_at, "cache", off, n) == tfs.pattern(9, off, n)
    assert in_thread(read_at, "big", 1000 * MiB - 3, 7) == tfs.pattern(3, 1000 * MiB - 3, 7)
    assert in_thread(read_at, "cache", 4 * MiB - 10, 100) == tfs.pattern(9, 4 * MiB - 10, 10)

    # lookups are cached for the entry timeout; notify_inval_entry drops the entry
    in_thread(os.stat, fs.path("hello"))
    n0 = fs.stats()["lookups"]["hello"]
    in_thread(os.stat, fs.path("hello"))
    assert fs.stats()["lookups"]["hello"] == n0
    assert fs.cmd("inval_entry", parent=1, name="hello")["ok"]
    in_thread(os.stat, fs.path("hello"))
    assert fs.stats()["lookups"]["hello"] == n0 + 1


def test_connection_negotiated(fs):
    c = fs.conn
    assert c["proto_major"] == 7 and c["proto_minor"] >= 15
    assert c["explicit_inval_data"]
    assert c["want"] & _fuse.CAP_EXPLICIT_INVAL_DATA
    assert not c["want"] & _fuse.CAP_AUTO_INVAL_DATA
    assert c["want"] & _fuse.CAP_ASYNC_READ
    assert c["max_write"] == MiB
    assert fs.ready["fd"] >= 0
    assert fs.cmd("conn")["conn"] == c


# ---------------------------------------------------------------- replies

def test_deferred_replies_do_not_hold_workers(make_fs):
    fs = make_fs("--max-threads", "2")
    n = 6
    results: dict[int, bytes] = {}

    def reader(i: int) -> None:
        fd = os.open(fs.path("parked"), os.O_RDONLY)
        try:
            results[i] = os.pread(fd, 4096, i * 4096)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    wait_for(lambda: fs.stats()["parked"] == n, what=f"{n} parked reads")
    # all parked, 2 worker threads at most: other requests are still served
    assert in_thread(read_file, fs.path("hello")) == tfs.HELLO
    assert in_thread(read_file, fs.path("slow")) == tfs.pattern(4, 0, 256 * 1024)  # timer thread
    assert fs.cmd("release_parked")["released"] == n
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert results == {i: tfs.pattern(13, i * 4096, 4096) for i in range(n)}


def test_handler_exceptions_answer_eio(fs):
    with pytest.raises(OSError) as ei:
        in_thread(read_file, fs.path("fail"))
    assert ei.value.errno == errno.EIO
    with pytest.raises(OSError) as ei:
        in_thread(os.stat, fs.path("boom"))
    assert ei.value.errno == errno.EIO
    with pytest.raises(OSError) as ei:
        in_thread(read_file, fs.path("drop"))      # Request dropped unanswered
    assert ei.value.errno == errno.EIO
    # the filesystem keeps working
    assert in_thread(read_file, fs.path("hello")) == tfs.HELLO
    log = fs.log()
    assert "read handler failed" in log and "Traceback" in log
    assert "injected read failure" in log and "injected lookup failure" in log
    assert "dropped without a reply" in log


def test_second_reply_raises(fs):
    assert in_thread(read_file, fs.path("double")) == b"once"
    errs = fs.stats()["double_errors"]      # two per READ (the kernel may READ again at EOF)
    assert errs and len(errs) % 2 == 0 and all("already answered" in e for e in errs)
    assert in_thread(read_file, fs.path("hello")) == tfs.HELLO


CHILD_READER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    os.read(fd, 4096)
except KeyboardInterrupt:
    sys.exit(7)
except OSError as e:
    sys.exit(8)
sys.exit(9)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("name", ["block", "blocklate"])
def test_interrupt_unblocks_killed_reader(fs, name, sig):
    # "blocklate" registers its interrupt handler only after the interrupt arrived
    child = subprocess.Popen([sys.executable, "-c", CHILD_READER, fs.path(name)])
    try:
        wait_for(lambda: fs.stats()["blocked"] == 1, what="the read to reach the server")
        child.send_signal(sig)
        rc = child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    # SIGINT: the read fails with EINTR, then Python raises KeyboardInterrupt
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 7)
    st = wait_for(lambda: (lambda s: s if s["interrupts"] == 1 and s["blocked"] == 0 else None)(
        fs.stats()), what="the server to see the interrupt")
    assert st["interrupts"] == 1 and st["interrupted_flags"] == [True]
    assert st["block_pids"] == [child.pid]
    assert in_thread(read_file, fs.path("hello")) == tfs.HELLO


CHILD_RACER = r"""
import os, sys, threading
fd = os.open(sys.argv[1], os.O_RDONLY)
def spin():
    while True:
        os.pread(fd, 4096, 0)
for i in range(8):
    threading.Thread(target=spin, daemon=True).start()
print("go", flush=True)
threading.Event().wait()
"""


def test_interrupts_racing_replies(fs):
    """Readers killed at random moments while their reads are answered from other
    threads: interrupt callbacks arrive before, during and after the replies."""
    rng = random.Random(1)
    for _ in range(8):
        child = subprocess.Popen([sys.executable, "-c", CHILD_RACER, fs.path("race")],
                                 stdout=subprocess.PIPE)
        try:
            assert child.stdout.readline() == b"go\n"
            time.sleep(rng.uniform(0.05, 0.2))
            child.kill()
            assert child.wait(timeout=10) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            child.stdout.close()
    race = fs.stats()["race"]
    assert race.get("replied", 0) > 0 and race.get("interrupted", 0) > 0, race
    assert in_thread(read_file, fs.path("hello")) == tfs.HELLO
    assert in_thread(read_file, fs.path("race")) == tfs.pattern(16, 0, 4096)
    assert fs.proc.poll() is None
    assert "dropped without a reply" not in fs.log() and "Traceback" not in fs.log()


def _park_reader(fs: Server, fd: int, ino: int) -> tuple[threading.Thread, dict]:
    got: dict = {}
    reader = threading.Thread(target=lambda: got.setdefault("data", os.read(fd, 100)), daemon=True)
    reader.start()
    wait_for(lambda: fs.stats()["stream_readers"][str(ino)] == 1, what="a parked stream reader")
    return reader, got


def test_stream_read_does_not_block_write(fs):
    fd = os.open(fs.path("stream"), os.O_RDWR)
    try:
        reader, got = _park_reader(fs, fd, 8)
        # same fd, other thread, while the read is blocked in the kernel
        assert in_thread(os.write, fd, b"ping", timeout=10) == 4
        reader.join(10)
        assert got.get("data") == b"ping"
        assert in_thread(os.write, fd, b"pong") == 4
        assert in_thread(os.read, fd, 100) == b"pong"
    finally:
        os.close(fd)

    # control: the same file opened without FOPEN_STREAM serializes the two
    # calls on the file position lock -- the write waits for the read
    fd = os.open(fs.path("nostream"), os.O_RDWR)
    try:
        reader, got = _park_reader(fs, fd, 15)
        wrote: dict = {}
        writer = threading.Thread(target=lambda: wrote.setdefault("n", os.write(fd, b"ping")),
                                  daemon=True)
        writer.start()
        writer.join(0.5)
        assert writer.is_alive(), "write went through without FOPEN_STREAM: control is void"
        assert fs.cmd("feed", ino=15, data="fed")["fed"]      # answer the read from the server
        reader.join(10)
        writer.join(10)
        assert got.get("data") == b"fed" and wrote.get("n") == 4
    finally:
        os.close(fd)


# ---------------------------------------------------------------- page cache

def test_notify_inval_inode_drops_exactly_the_range(fs):
    size = 4 * MiB
    lo, hi = MiB // PAGE, 2 * MiB // PAGE

    def attempt() -> bool:
        fd = os.open(fs.path("cache"), os.O_RDONLY)
        try:
            assert pread_all(fd, size) == tfs.pattern(9, 0, size)
            if not all(residency(fd, size)):
                return False                   # reclaimed under our feet: retry
            assert fs.cmd("inval", ino=9, off=MiB, len=MiB)["ok"]
            r = residency(fd, size)
        finally:
            os.close(fd)
        assert not any(r[lo:hi]), "invalidated range still cached"
        return all(r[:lo]) and all(r[hi:])

    assert any(in_thread(attempt) for _ in range(RETRIES)), "pages outside the range dropped"

    # attributes-only and errors
    assert fs.cmd("inval", ino=9, off=-1, len=0)["ok"]
    r = fs.cmd("inval", ino=9999, off=0, len=0)
    assert not r["ok"] and r["errno"] == errno.ENOENT


def test_notify_store_fills_cache_without_read(fs):
    in_thread(os.stat, fs.path("store"))       # the kernel must know the inode

    def attempt(off: int, n: int, byte: int) -> bool:
        assert fs.cmd("inval", ino=10, off=0, len=0)["ok"]
        reads0 = len(fs.stats()["store_reads"])
        r = fs.cmd("store", ino=10, off=off, len=n, byte=byte)
        assert r["ok"], r
        fd = os.open(fs.path("store"), os.O_RDONLY)
        try:
            data = pread_all(fd, n, off)
        finally:
            os.close(fd)
        reads = fs.stats()["store_reads"][reads0:]
        touched = [(o, s) for o, s in reads if o < off + n and o + s > off]
        if touched:
            return False                       # some stored pages were reclaimed: retry
        assert data == bytes([byte]) * n
        return True

    assert any(in_thread(attempt, 0, 2 * MiB, 0x58) for _ in range(RETRIES))
    # one store larger than max_write, at an unaligned-to-block offset
    assert any(in_thread(attempt, 2 * MiB + PAGE, 4 * MiB, 0x59) for _ in range(RETRIES))
    # unknown inode
    r = fs.cmd("store", ino=9999, off=0, len=PAGE, byte=1)
    assert not r["ok"] and r["errno"] == errno.ENOENT


def test_notify_retrieve_returns_cached_bytes(fs):
    size = 4 * MiB

    def attempt() -> bool:
        fd = os.open(fs.path("cache"), os.O_RDONLY)
        try:
            pread_all(fd, size)
        finally:
            os.close(fd)
        r1 = fs.cmd("retrieve", ino=9, off=0, size=MiB)
        off2 = MiB + PAGE
        r2 = fs.cmd("retrieve", ino=9, off=off2, size=2 * MiB)   # capped by max_write
        if r1["len"] != MiB or r2["len"] != MiB:
            return False                       # reclaimed meanwhile: retry
        assert r1["offset"] == 0 and r1["ino"] == 9
        assert r1["sha256"] == hashlib.sha256(tfs.pattern(9, 0, MiB)).hexdigest()
        assert r2["offset"] == off2
        assert r2["sha256"] == hashlib.sha256(tfs.pattern(9, off2, MiB)).hexdigest()
        return True

    assert any(in_thread(attempt) for _ in range(RETRIES))
    assert fs.cmd("inval", ino=9, off=0, len=MiB)["ok"]
    assert fs.cmd("retrieve", ino=9, off=0, size=MiB)["len"] == 0    # nothing cached there
    r = fs.cmd("retrieve", ino=9999, off=0, size=PAGE)
    assert not r["ok"] and r["errno"] == errno.ENOENT


@pytest.mark.parametrize("op", ["inval", "store"])
def test_notify_waits_for_parked_read(fs, op):
    """A notification on pages a pending READ holds locked waits in the kernel until
    another server thread answers that READ: the binding must not hold the GIL
    while it waits (else the answer could never be sent)."""
    got: dict = {}

    def client() -> None:
        fd = os.open(fs.path("pcache"), os.O_RDONLY)
        try:
            got["data"] = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)

    reader = threading.Thread(target=client, daemon=True)
    reader.start()
    wait_for(lambda: fs.stats()["parked"] >= 1, what="the buffered READ to be parked")
    assert fs.cmd("release_parked_later", delay=0.3)["ok"]
    if op == "inval":
        r = fs.cmd("inval", ino=17, off=0, len=0)
    else:
        r = fs.cmd("store", ino=17, off=0, len=64 * 1024, byte=0x5A)
    assert r["ok"], r
    # the reader may have lost its freshly read page to the invalidation and
    # READ again: keep answering until it is done
    wait_for(lambda: fs.cmd("release_parked") and not reader.is_alive(),
             what="the reader to finish")
    assert got["data"] in (tfs.pattern(17, 0, 4096), b"\x5a" * 4096)


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "no-explicit"])
def test_attr_changes_keep_cache_with_explicit_inval_data(make_fs, explicit):
    fs = make_fs() if explicit else make_fs("--no-explicit-inval")
    assert fs.conn["explicit_inval_data"] is explicit
    assert not fs.conn["want"] & _fuse.CAP_AUTO_INVAL_DATA
    size = 4 * MiB
    mtime = tfs.MTIME0_NS

    def attempt() -> bool:
        nonlocal mtime
        fd = os.open(fs.path("attrs"), os.O_RDONLY)
        try:
            pread_all(fd, size)
            if not all(residency(fd, size)):
                return False
            # mtime change (attr timeout 0: the next stat fetches it)
            mtime += 10**9
            assert fs.cmd("set_attr", ino=11, mtime_ns=mtime)["ok"]
            assert os.stat(fs.path("attrs")).st_mtime_ns == mtime
            after_mtime = residency(fd, size)
            # size change (growth)
            assert fs.cmd("set_attr", ino=11, size=size + MiB)["ok"]
            assert os.stat(fs.path("attrs")).st_size == size + MiB
            after_size = residency(fd, size)
            assert fs.cmd("set_attr", ino=11, size=size)["ok"]
            assert os.stat(fs.path("attrs")).st_size == size
        finally:
            os.close(fd)
        if not explicit:
            assert not any(after_size), "size change kept the cache without EXPLICIT_INVAL_DATA"
        return all(after_mtime) and (all(after_size) if explicit else True)

    assert any(in_thread(attempt) for _ in range(RETRIES)), "attribute change dropped the cache"


# ---------------------------------------------------------------- loop lifecycle

def test_exit_makes_loop_return(fs):
    r = fs.cmd("exit_loop")
    assert r["ok"] and r["loop_returned"]
    bye = fs.recv()
    assert bye["bye"] and bye.get("ok"), bye
    assert fs.proc.wait(10) == 0
    assert not mounted(fs.mnt)


@pytest.mark.parametrize("how", ["fusermount3", "Session.unmount"])
def test_unmount_ends_loop(fs, how):
    if how == "fusermount3":
        subprocess.run(["fusermount3", "-u", fs.mnt], check=True, timeout=10, capture_output=True)
        msgs = [fs.recv()]
    else:
        # the loop may end (and say so) before the command's own answer
        msgs = [fs.cmd("unmount"), fs.recv()]
        assert {"ok": True} in msgs
    ev = [m for m in msgs if "event" in m]
    assert ev and ev[0]["event"] == "loop_returned" and ev[0].get("ok"), msgs
    assert not mounted(fs.mnt)


def test_auto_unmount_when_server_dies(make_fs):
    fs = make_fs("-o", "auto_unmount", "-o", "allow_other")
    assert in_thread(read_file, fs.path("hello")) == tfs.HELLO
    fs.proc.kill()
    assert fs.proc.wait(10) == -signal.SIGKILL
    wait_for(lambda: not mounted(fs.mnt), what="fusermount3's auto unmount")


# ---------------------------------------------------------------- throughput

def _bdi_read_ahead(mnt: str) -> str:
    return f"/sys/class/bdi/0:{os.minor(os.stat(mnt).st_dev)}/read_ahead_kb"


def _cold_read_gbps(path: str, total: int) -> float:
    buf = bytearray(MiB)
    fd = os.open(path, os.O_RDONLY)    # no keep_cache: the open drops "big"'s cache
    try:
        t0 = time.perf_counter()
        off = 0
        while off < total:
            n = os.preadv(fd, [buf], off)
            assert n > 0
            off += n
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return total / dt / 1e9


def test_read_throughput_report(fs, record_property):
    """Cold sequential read of a trivial in-memory file; reported, not asserted."""
    total = 1024 * MiB
    ra = _bdi_read_ahead(fs.mnt)
    with open(ra) as f:
        ra0 = f.read().strip()
    # warm-up: on this VM the first touch of fresh guest memory alone runs at
    # ~0.8 GB/s (dd to tmpfs), which would hide the binding's own speed
    in_thread(_cold_read_gbps, fs.path("big"), total, timeout=120)
    gbps = in_thread(_cold_read_gbps, fs.path("big"), total, timeout=120)
    with open(ra, "w") as f:
        f.write("2048")
    gbps2 = in_thread(_cold_read_gbps, fs.path("big"), total, timeout=120)
    reads = int(fs.stats()["reads"]["3"])
    record_property("cold_read_GBps_ra_default", round(gbps, 2))
    record_property("cold_read_GBps_ra_2048", round(gbps2, 2))
    print(f"\ncold read of 1 GiB: {gbps:.2f} GB/s (read_ahead_kb={ra0}), "
          f"{gbps2:.2f} GB/s (read_ahead_kb=2048); {reads} READ requests")
    assert reads >= 3 * total // MiB       # every pass reached the server (cold)
