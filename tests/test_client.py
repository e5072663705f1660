"""WCFS client library (wcfs_client, C++ core + bindings): WCFS.md §4-§6.3, API.md §4.

A real ``wcfs serve`` process serves a FileStorage that this test process
writes to; other client processes are real processes too (subprocess scripts
or os.fork).  Each test works on its own ZBigFile, so one server serves the
whole module; tests that need their own server (join, crash) start it.
"""
from __future__ import annotations

import errno
import faulthandler
import functools
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from ZODB.utils import p64

import wcfs_client
import wcfs_env
from wcfs_env import WcfsProc, WriterDB, stop_autostarted, wait_until
from wcfs import mgmt

BS = 64 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Exactly the blocks a test reads through head/ are loaded: no readahead.
read_file = functools.partial(wcfs_env.read_file, readahead=False)


def content(seed: int, n: int = BS) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()


ZERO = bytes(BS)


def blk(m, k: int) -> bytes:
    """Block k (absolute) of a Mapping."""
    i = k - m.blk_start
    return bytes(m.mem[i * BS:(i + 1) * BS])


class Env:
    """The module's server and writer, plus per-test Conns closed at teardown."""

    def __init__(self, db: WriterDB, srv: WcfsProc) -> None:
        self.db = db
        self.srv = srv
        self.conns: list = []
        self.procs: list[subprocess.Popen] = []

    def commit(self) -> int:
        tid = self.db.commit()
        self.srv.wait_head(tid)
        return tid

    def new_file(self, name: str, blocks: dict[int, bytes]):
        zf = self.db.new_file(name, BS)
        for k, data in blocks.items():
            zf.storeblk(k, data)
        return zf, self.commit()

    def connect(self, at: int):
        conn = self.wc.connect(at)
        self.conns.append(conn)
        return conn

    def head_path(self, zf) -> str:
        return self.srv.path("head", "bigfile", zf._p_oid.hex())

    def spawn(self, code: str, *args: str) -> subprocess.Popen:
        """A client process running `code` (argv: mnt zurl *args)."""
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), self.srv.mnt, self.db.zurl, *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT)
        self.procs.append(p)
        return p


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("client")
    db = WriterDB.filestorage(str(d / "Data.fs"))
    srv = WcfsProc(db.zurl, str(d / "mnt"))
    try:
        yield db, srv
    finally:
        srv.stop()
        db.close()


@pytest.fixture
def env(server):
    e = Env(*server)
    e.wc = wcfs_client.WCFS(e.srv.mnt, e.db.zurl, None)
    try:
        yield e
    finally:
        for p in e.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            for f in (p.stdin, p.stdout, p.stderr):
                f.close()
        for c in e.conns:
            try:
                c.close()
            except RuntimeError:
                pass


def readline(p: subprocess.Popen, timeout: float = 30) -> str:
    """Next stdout line of a child, bounded in time."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not out:
        raise TimeoutError(f"no line from child pid{p.pid} within {timeout}s")
    return out[0].rstrip("\n")


def wait_exit(p: subprocess.Popen, timeout: float = 30) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def waitpid(pid: int, timeout: float = 30) -> int:
    """os.waitpid with a deadline -> raw status."""
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"child pid{pid} did not exit within {timeout}s")
        time.sleep(0.01)


# --- isolation ----------------------------------------------------------------------

def test_isolation_while_writer_commits(env):
    zf, t0 = env.new_file("iso", {0: content(0), 1: content(1), 2: content(2), 3: content(3)})
    conn = env.connect(t0)
    assert conn.at() == p64(t0)
    fh = conn.open(zf._p_oid)
    assert fh.blksize == BS and fh.pinned == {} and fh.foid == zf._p_oid
    m = fh.mmap(0, 8)                     # blocks 4..7 are beyond the file: zeros
    assert (m.blk_start, m.blk_stop, len(m.mem)) == (0, 8, 8 * BS)
    assert m.mem.readonly
    with pytest.raises(TypeError):
        m.mem[0] = 1
    assert blk(m, 0) == content(0)        # block 0 is read (and cached) at t0

    zf.storeblk(0, content(10))
    zf.storeblk(2, content(12))
    zf.storeblk(5, content(15))           # grows the file to 6 blocks
    env.commit()
    zf.storeblk(2, content(22))
    t2 = env.commit()

    # Another reader loads the changed blocks at head: the server pins us first.
    assert read_file(env.head_path(zf), 0, 6 * BS)[:BS] == content(10)
    pinned = fh.pinned
    # block 5 did not exist at t0: it is pinned to some revision <= t0 where
    # the file is shorter, and shows zeros
    assert sorted(pinned) == [0, 2, 5] and pinned[0] == pinned[2] == p64(t0) and pinned[5] <= p64(t0)
    for k, want in enumerate([content(0), content(1), content(2), content(3), ZERO, ZERO, ZERO, ZERO]):
        assert blk(m, k) == want, k

    # A Conn opened now, at t0, sees head's size (6 blocks) but pins the
    # blocks beyond the t0 size to a revision where they do not exist: zeros.
    conn2 = env.connect(t0)
    fh2 = conn2.open(zf._p_oid)
    m2 = fh2.mmap(4, 3)
    assert blk(m2, 5) == ZERO and blk(m2, 4) == ZERO and blk(m2, 6) == ZERO
    assert 5 in fh2.pinned
    # ... while a Conn at t2 sees the new data.
    conn3 = env.connect(t2)
    m3 = conn3.open(zf._p_oid).mmap(0, 6)
    assert [blk(m3, k) for k in range(6)] == [content(10), content(1), content(22), content(3), ZERO,
                                              content(15)]
    assert blk(m, 2) == content(2)        # still isolated
    m.unmap()
    m.unmap()                             # idempotent


def test_pins_are_applied_under_a_faulting_thread(env):
    """A thread faulting on a changed block (holding the GIL) triggers the pin
    of that block to this very process; the C++ pinner re-maps the page while
    the fault waits for the server, and the read returns @at data."""
    zf, t0 = env.new_file("fault", {k: content(100 + k) for k in range(4)})
    conn = env.connect(t0)
    fh = conn.open(zf._p_oid)
    m = fh.mmap(0, 4)
    zf.storeblk(2, content(202))
    t1 = env.commit()
    assert fh.pinned == {}
    pins0 = env.srv.stats()["pin"]

    got: list = []
    t = threading.Thread(target=lambda: got.append(blk(m, 2)))
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert got == [content(102)]
    assert fh.pinned == {2: p64(t0)}
    assert env.srv.stats()["pin"] == pins0 + 1
    assert read_file(env.head_path(zf), 2 * BS, BS) == content(202)
    conn.resync(t1)
    assert blk(m, 2) == content(202) and fh.pinned == {}


# --- resync ---------------------------------------------------------------------------

def test_resync_forward(env):
    zf, t0 = env.new_file("fwd", {k: content(300 + k) for k in range(4)})
    conn = env.connect(t0)
    fh = conn.open(zf._p_oid)
    m = fh.mmap(0, 8)
    mtail = fh.mmap(5, 2)                 # starts beyond the head size: all zeros
    assert blk(m, 1) == content(301)

    zf.storeblk(1, content(411))
    zf.storeblk(5, content(415))          # the file grows to 6 blocks
    t1 = env.commit()
    read_file(env.head_path(zf), 1 * BS, BS)       # pins block 1 to t0
    read_file(env.head_path(zf), 5 * BS, BS)       # pins block 5 to t0 (beyond size then: zeros)
    assert sorted(fh.pinned) == [1, 5] and fh.pinned[1] == p64(t0)
    assert blk(m, 1) == content(301) and blk(m, 5) == ZERO and blk(mtail, 5) == ZERO

    zf.storeblk(5, content(515))
    t2 = env.commit()
    read_file(env.head_path(zf), 5 * BS, BS)

    conn.resync(t1)
    assert conn.at() == p64(t1)
    # block 5 grew into view and is pinned to t1 (head has t2 data there)
    assert fh.pinned == {5: p64(t1)}
    assert [blk(m, k) for k in range(8)] == [content(300), content(411), content(302), content(303),
                                             ZERO, content(415), ZERO, ZERO]
    assert blk(mtail, 5) == content(415) and blk(mtail, 6) == ZERO

    conn.resync(t2)
    assert fh.pinned == {}
    assert blk(m, 5) == content(515) and blk(mtail, 5) == content(515)
    conn.resync(t2)                       # same at again: fine
    assert conn.at() == p64(t2)


def test_resync_backwards_closes_the_conn(env):
    zf, t0 = env.new_file("back", {0: content(600)})
    zf.storeblk(0, content(601))
    t1 = env.commit()
    conn = env.connect(t1)
    fh = conn.open(zf._p_oid)
    m = fh.mmap(0, 1)
    assert blk(m, 0) == content(601)
    with pytest.raises(RuntimeError, match="going back in history is forbidden"):
        conn.resync(t0)
    assert m.efaulted
    with pytest.raises(RuntimeError, match="connection closed"):
        conn.open(zf._p_oid)
    with pytest.raises(RuntimeError, match="connection closed"):
        conn.resync(t1)
    with pytest.raises(RuntimeError, match="file already closed"):
        fh.mmap(0, 1)
    conn.close()                          # idempotent


# --- files, mappings, errors -------------------------------------------------------

def test_open_counting_and_file_already_closed(env):
    zf, t0 = env.new_file("cnt", {0: content(700), 1: content(701)})
    conn = env.connect(t0)
    fh1 = conn.open(zf._p_oid)
    fh2 = conn.open(int.from_bytes(zf._p_oid, "big"))     # int oid, same file
    assert env.srv.stats()["Watch"] >= 1
    fh1.close()                            # one open left: still usable
    m = fh2.mmap(0, 2)
    assert blk(m, 1) == content(701)
    fh2.close()                            # last open: unwatched, mappings fault
    assert m.efaulted
    with pytest.raises(RuntimeError, match="file already closed"):
        fh2.mmap(0, 1)
    fh2.close()                            # closing a closed file succeeds
    fh3 = conn.open(zf._p_oid)             # opens anew
    assert blk(fh3.mmap(0, 2), 0) == content(700)
    with pytest.raises(ValueError):
        fh3.mmap(-1, 1)
    with pytest.raises(ValueError):
        fh3.mmap(0, 0)
    with pytest.raises(TypeError):
        conn.open("x")
    with pytest.raises(ValueError):
        conn.open(b"123")
    with pytest.raises(RuntimeError, match="head/bigfile/00007fffffffffff: Invalid argument"):
        conn.open(0x7fffffffffff)            # no such object: the server refuses the lookup
    assert blk(fh3.mmap(1, 1), 1) == content(701)    # the Conn is still fine
    m3 = fh3.mmap(0, 1)
    view = m3.mem
    with pytest.raises(BufferError):
        m3.unmap()                         # a view of it exists
    view.release()
    m3.unmap()
    conn.close()
    with pytest.raises(RuntimeError, match="connection closed"):
        conn.open(zf._p_oid)


CLOSED_ACCESS = """
    import sys, wcfs_client
    mnt, zurl, at, foid, what = sys.argv[1:]
    wc = wcfs_client.WCFS(mnt, zurl, None)
    conn = wc.connect(int(at, 16))
    fh = conn.open(int(foid, 16))
    m = fh.mmap(0, 2)
    mem = m.mem
    print("before", mem[0], flush=True)
    (fh if what == "fileh" else conn).close()
    print("closed", m.efaulted, flush=True)
    print("NOT REACHED", mem[0], flush=True)
"""


@pytest.mark.parametrize("what", ["fileh", "conn"])
def test_access_to_closed_mapping_faults(env, what):
    zf, t0 = env.new_file(f"segv_{what}", {0: content(800)})
    p = env.spawn(CLOSED_ACCESS, f"{t0:016x}", zf._p_oid.hex(), what)
    code, out, err = wait_exit(p)
    assert code == -signal.SIGSEGV, (out, err)
    assert out.splitlines() == [f"before {content(800)[0]}", "closed True"]


TWO_AT = """
    import sys, hashlib, wcfs_client
    mnt, zurl, at, foid, nblk = sys.argv[1:]
    wc = wcfs_client.WCFS(mnt, zurl, None)
    conn = wc.connect(int(at, 16))
    m = conn.open(int(foid, 16)).mmap(0, int(nblk))
    bs = len(m.mem) // int(nblk)
    for line in sys.stdin:
        print(" ".join(hashlib.sha1(m.mem[k*bs:(k+1)*bs]).hexdigest() for k in range(int(nblk))), flush=True)
    conn.close()
"""


def test_two_processes_at_different_at(env):
    def sha(b: bytes) -> str:
        return hashlib.sha1(b).hexdigest()

    zf, t0 = env.new_file("twoat", {k: content(900 + k) for k in range(3)})
    zf.storeblk(0, content(910))
    zf.storeblk(2, content(912))
    t1 = env.commit()
    old = [sha(content(900)), sha(content(901)), sha(content(902))]
    new = [sha(content(910)), sha(content(901)), sha(content(912))]

    p = env.spawn(TWO_AT, f"{t0:016x}", zf._p_oid.hex(), "3")
    p.stdin.write("go\n")
    p.stdin.flush()
    assert readline(p).split() == old     # the child's faults pin it to t0
    conn = env.connect(t1)
    m = conn.open(zf._p_oid).mmap(0, 3)
    assert [sha(blk(m, k)) for k in range(3)] == new
    p.stdin.write("again\n")
    p.stdin.flush()
    assert readline(p).split() == old
    assert [sha(blk(m, k)) for k in range(3)] == new
    code, _, err = wait_exit(p)           # closes its stdin: the child ends
    assert code == 0, err


HEAD_READER = """
    import os, sys
    path, nblk, bs = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    for line in sys.stdin:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for k in range(nblk):
            os.pread(fd, 1, k * bs)
        os.close(fd)
        print("done", flush=True)
"""


def test_concurrent_faults_pins_resyncs_and_opens(env):
    """Threads of this process fault on the mapping while another process's
    head reads pin blocks to us and the Conn resyncs forward commit after
    commit; concurrent opens of one file share one FileH.  Whenever the Conn
    is not moving, every block shows exactly the data of Conn.at()."""
    nblk = 8
    rng = np.random.default_rng(42)
    data = {k: content(2000 + k) for k in range(nblk)}
    zf, t = env.new_file("stress", dict(data))
    history = {t: dict(data)}
    conn = env.connect(t)

    opened: list = []
    ths = [threading.Thread(target=lambda: opened.append(conn.open(zf._p_oid))) for _ in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(30)
    assert len(opened) == 4 and len({fh.foid for fh in opened}) == 1
    for fh in opened[1:]:
        fh.close()
    fh = opened[0]
    m = fh.mmap(0, nblk)

    stop = threading.Event()
    errors: list = []

    def fault_loop(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                k = int(r.integers(nblk))
                m.mem[k * BS + int(r.integers(BS))]
        except Exception as e:                     # pragma: no cover - reported below
            errors.append(e)

    faulters = [threading.Thread(target=fault_loop, args=(i,)) for i in range(2)]
    for th in faulters:
        th.start()
    reader = env.spawn(HEAD_READER, env.head_path(zf), str(nblk), str(BS))
    try:
        for i in range(8):
            changed = sorted(set(int(x) for x in rng.integers(nblk, size=3)))
            for k in changed:
                data[k] = content(3000 + 10 * i + k)
                zf.storeblk(k, data[k])
            t = env.commit()
            history[t] = dict(data)
            reader.stdin.write("go\n")
            reader.stdin.flush()
            assert readline(reader) == "done"      # pins for the changed blocks reached us
            at = int.from_bytes(conn.at(), "big")
            assert [blk(m, k) for k in range(nblk)] == [history[at][k] for k in range(nblk)]
            conn.resync(t)
            assert [blk(m, k) for k in range(nblk)] == [history[t][k] for k in range(nblk)]
    finally:
        stop.set()
        for th in faulters:
            th.join(30)
    assert not errors
    assert fh.pinned == {}


# --- fork ---------------------------------------------------------------------------

def test_fork_child_detaches(env):
    zf, t0 = env.new_file("fork", {0: content(1000), 1: content(1001)})
    conn = env.connect(t0)
    fh = conn.open(zf._p_oid)
    m = fh.mmap(0, 2)
    assert blk(m, 1) == content(1001)
    zf.storeblk(0, content(1010))          # block 0: changed, not read by anyone yet
    t1 = env.commit()
    stats0 = env.srv.stats()

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                       # child
        try:
            faulthandler.disable()                      # die quietly by SIGSEGV
            os.close(r)
            out = [f"efaulted {m.efaulted}", f"pinned {fh.pinned}"]
            for op in (lambda: conn.open(zf._p_oid), lambda: conn.resync(t1), lambda: fh.mmap(0, 1)):
                try:
                    op()
                    out.append("no error")
                except RuntimeError as e:
                    out.append("error " + ("connection closed" if "connection closed" in str(e) else
                                           "file already closed" if "file already closed" in str(e) else str(e)))
            fh.close()                                  # silent: must not unwatch
            conn.close()                                # silent: must not say bye
            # The child may connect anew; its own pinner works (block 0 is
            # pinned to t0 when the child's fault loads it at head).
            c2 = env.wc.connect(t0)
            f2 = c2.open(zf._p_oid)
            out.append(f"child view {blk(f2.mmap(0, 2), 0) == content(1000)} {f2.pinned == {0: p64(t0)}}")
            c2.close()
            os.write(w, ("\n".join(out) + "\n").encode())
            os.close(w)
            m.mem[0]                                    # SIGSEGV
            os._exit(0)
        except BaseException as e:
            os.write(w, f"child failed: {e!r}\n".encode())
            os._exit(3)
    os.close(w)
    status = waitpid(pid)
    with os.fdopen(r) as f:
        out = f.read().splitlines()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV, (status, out)
    assert out == ["efaulted True", "pinned {}", "error connection closed", "error connection closed",
                   "error file already closed", "child view True True"]

    # The parent's link and watch are intact: isolation still works.
    st = env.srv.stats()
    assert (st["WatchLink"], st["Watch"]) == (stats0["WatchLink"], stats0["Watch"])
    assert blk(m, 0) == content(1000)                  # our fault loads block 0 at head: pinned
    assert fh.pinned == {0: p64(t0)}
    zf.storeblk(1, content(1011))
    t2 = env.commit()
    read_file(env.head_path(zf), BS, BS)
    assert fh.pinned == {0: p64(t0), 1: p64(t0)} and blk(m, 1) == content(1001)
    conn.resync(t2)
    assert blk(m, 0) == content(1010) and blk(m, 1) == content(1011) and fh.pinned == {}


# --- pinner failure -------------------------------------------------------------------

NAK = """
    import resource, sys, wcfs_client
    mnt, zurl, at, foid = sys.argv[1:]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    wc = wcfs_client.WCFS(mnt, zurl, None)
    conn = wc.connect(int(at, 16))
    m = conn.open(int(foid, 16)).mmap(0, 2)
    # From now on no file can be opened: the pinner's open of @<rev>/bigfile
    # fails with EMFILE.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))
    print("ready", flush=True)
    sys.stdin.readline()
"""


def test_pinner_failure_naks_and_gets_killed(env):
    """The @rev open of the pinner fails (the client process has no free file
    descriptor: RLIMIT_NOFILE lowered to 3): it replies `nak: ...`, logs
    CRITICAL and the server kills it with SIGBUS."""
    zf, t0 = env.new_file("nak", {0: content(1100), 1: content(1101)})
    p = env.spawn(NAK, f"{t0:016x}", zf._p_oid.hex())
    assert readline(p) == "ready"
    kills0 = env.srv.stats()["pinkill"]
    zf.storeblk(1, content(1111))
    env.commit()
    assert read_file(env.head_path(zf), BS, BS) == content(1111)   # completes once the client is dealt with
    code, out, err = wait_exit(p)
    assert code in (-signal.SIGBUS, -signal.SIGKILL), (code, err)
    assert env.srv.stats()["pinkill"] == kills0 + 1
    crit = [line for line in err.splitlines() if line.startswith("C")]
    assert any(f"pin f<{zf._p_oid.hex()}> #1 @{t0:016x}" in line and "Too many open files" in line
               for line in crit), err
    assert any("wcfs server will likely kill us soon." in line for line in crit), err
    assert "nak: " in env.srv.log()


# --- raw watch link -------------------------------------------------------------------

def test_raw_watchlink(env):
    zf, t0 = env.new_file("raw", {0: content(1200), 1: content(1201)})
    read_file(env.head_path(zf), 0, 2 * BS)           # tracked
    zf.storeblk(1, content(1211))
    env.commit()
    foid = zf._p_oid.hex()
    wl = wcfs_client.WatchLink(env.wc)
    try:
        reply: list = []
        t = threading.Thread(target=lambda: reply.append(wl.send_req(f"watch {foid} @{t0:016x}")))
        t.start()
        req = wl.recv_req()
        assert isinstance(req, wcfs_client.PinReq)
        assert (req.foid, req.blk, req.at) == (zf._p_oid, 1, p64(t0))
        assert req.msg == f"pin {foid} #1 @{t0:016x}"
        wl.reply_req(req, "ack")
        t.join(30)
        assert reply == ["ok"]
        with pytest.raises(RuntimeError):
            wl.reply_req(req, "ack")                   # already answered
        assert wl.send_req("watch zzz @0").startswith("error bad watch")
        assert wl.send_req(f"watch {foid} -") == "ok"
        wl.close_write()
        assert wl.recv_req() is None                   # the server closed its side after bye
        assert wl._wait_server_closed(10)
        with pytest.raises(RuntimeError, match="link is down"):
            wl.send_req(f"watch {foid} -")
    finally:
        wl.close()

    # A protocol violation on our side: the server tears the link down and
    # says why on stream 0; the client sees EOF.
    wl = wcfs_client.WatchLink(env.wc)
    try:
        wl._write_raw(b"garbage\n")
        assert wl._wait_server_closed(10)
        assert wl.recv_req() is None
        assert any("invalid frame" in c for c in wl._control())
    finally:
        wl.close()


# --- join -----------------------------------------------------------------------------

@pytest.fixture
def joined(tmp_path):
    """A database whose server runs (if at all) on its default mountpoint."""
    db = WriterDB.filestorage(str(tmp_path / "Data.fs"))
    wcs: list = []
    try:
        yield db, wcs
    finally:
        for wc in wcs:
            for _ in range(wc._njoin):
                wc.close()
        stop_autostarted(mgmt.mountpoint_for(db.zurl, create=False))
        db.close()


def test_join_autostart_and_sharing(joined, monkeypatch):
    db, wcs = joined
    zf = db.new_file("j", BS)
    zf.storeblk(0, content(1300))
    t0 = db.commit()

    monkeypatch.setenv("WCFS_AUTOSTART", "no")
    with pytest.raises(RuntimeError, match="server not running"):
        wcfs_client.join(db.zurl)
    monkeypatch.setenv("WCFS_AUTOSTART", "bogus")
    with pytest.raises(ValueError):
        wcfs_client.join(db.zurl)
    monkeypatch.setenv("WCFS_AUTOSTART", "yes")

    wc = wcfs_client.join(db.zurl)
    wcs.append(wc)
    assert isinstance(wc, wcfs_client.WCFS)
    assert wc.mountpoint == mgmt.mountpoint_for(db.zurl)
    wc2 = wcfs_client.join(db.zurl, autostart=False)
    assert wc2 is wc
    conn = wc.connect(t0)
    try:
        assert blk(conn.open(zf._p_oid).mmap(0, 1), 0) == content(1300)
    finally:
        conn.close()
    wc.close()
    assert wcfs_client.join(db.zurl) is wc       # still joined once
    wc.close()
    wc.close()
    wc3 = wcfs_client.join(db.zurl)              # all joins closed: attaches anew (never unmounted)
    wcs.append(wc3)
    assert wc3 is not wc and wc3._server is None


def _fusermount_watchdogs(pid: int) -> list[int]:
    """The `fusermount3 ... auto_unmount` children of a server process."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv0 = f.read().split(b"\0")[0]
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid and os.path.basename(argv0) == b"fusermount3":
                out.append(int(d))
    return out


@pytest.mark.parametrize("how", ["auto_unmount", "stale_mount"])
def test_join_after_server_crash(joined, how):
    """SIGKILL of the server: its fusermount3 watchdog unmounts (auto_unmount),
    or -- watchdog killed too -- a stale mount answers ENOTCONN.  The next join
    recovers with a new server either way."""
    db, wcs = joined
    zf = db.new_file("crash", BS)
    zf.storeblk(0, content(1400))
    t0 = db.commit()
    wc = wcfs_client.join(db.zurl, autostart=True)
    wcs.append(wc)
    pid = wc._server.pid
    conn = wc.connect(t0)
    m = conn.open(zf._p_oid).mmap(0, 1)
    assert blk(m, 0) == content(1400)

    if how == "stale_mount":
        watchdogs = _fusermount_watchdogs(pid)
        assert watchdogs
        for child in watchdogs:
            os.kill(child, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: wc._server.popen.poll() is not None, 10, "the server to die")
    if how == "stale_mount":
        with pytest.raises(OSError) as exc:
            os.stat(os.path.join(wc.mountpoint, ".wcfs", "zurl"))
        assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        wc.close()                              # dropping the join does not matter

    wc2 = wcfs_client.join(db.zurl)               # recovers: cleans up, starts anew
    wcs.append(wc2)
    assert wc2 is not wc and wc2._server.pid != pid
    assert all(s.popen.poll() is None for s in wcfs_client._autostarted if s.mountpoint == wc2.mountpoint)
    conn2 = wc2.connect(t0)
    try:
        assert blk(conn2.open(zf._p_oid).mmap(0, 1), 0) == content(1400)
    finally:
        conn2.close()
    # The old Conn's pinner saw its server die and closed the Conn: its
    # memory faults rather than showing data nobody keeps isolated any more.
    wait_until(lambda: m.efaulted, 10, "the old Conn to close")
    with pytest.raises(RuntimeError, match="connection closed"):
        conn.open(zf._p_oid)
    conn.close()
