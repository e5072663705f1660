"""WCFS server end to end over ZEO and RelStorage/PostgreSQL, and its handling of feed trouble.

The scenarios of test_wcfs_fs.py that depend on the storage (reads, holes,
@rev views, the page cache kept for unchanged blocks and dropped for changed
ones with the old data moved into the @rev cache, BTree growth, sizes) run
here against a real ``runzeo`` and a private PostgreSQL cluster; the test
process is the writer (a ZEO client, or RelStorage opened through zodburi)
and ``wcfs serve`` is a separate process following the commits.

Feed robustness:

* ZEO restart: transactions committed while the ZEO server is down (written
  straight into its Data.fs) and after it is back must all reach the server,
  one by one and in order -- observed through ``.wcfs/debug/zhead`` -- and
  every changed block must read correctly through head/ and every @rev.
* ZEO killed for good, or back serving an older copy of the database that
  lacks the last transaction the server applied: the server must switch to
  EIO mode within its reconnect timeout and from then on answer EIO, never
  the data it had.  ``wcfs serve`` has no option for that timeout (30 s), so
  these tests start the server through the ``$WCFS_SERVE_IMPL`` hook with
  `serve_short_reconnect` below, which opens the storage with a short
  ``reconnect_timeout``.
* RelStorage: the server's PostgreSQL connections stay bounded under
  concurrent reads.
* FileStorage: a transaction that is only partly in Data.fs (a copier that
  appended half of it; a real FileStorage stopped between vote and finish,
  status 'c') must not move head/at until it is complete.

Regressions guarded here: RelStorage load instances must come from a bounded
pool (one connection per libfuse worker thread exhausted PostgreSQL), and an
empty ZEO replay after a reconnect (the server went back to an older
database) must be a feed error, not "in sync".

Every wait is bounded; servers, ZEO and PostgreSQL are stopped by pid and
mounts removed in fixture teardown, also on failure.
"""
from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import pytest
from ZODB.utils import u64

from wcfs_env import WcfsProc, WriterDB, block_resident, block_uncached, read_file, wait_until

BS = 64 * 1024
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SHORT_RECONNECT = 3.0      # s: reconnect timeout of the server in the ZEO-killed test


def content(seed: int, n: int = BS) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()


def serve_short_reconnect(zurl: str, mountpoint: str, **kw) -> int:
    """``$WCFS_SERVE_IMPL`` hook: `wcfs.server.serve` with the storage opened
    with ``reconnect_timeout=$WCFS_TEST_RECONNECT_TIMEOUT``.  Runs in the
    server process, never in the test process."""
    from wcfs import server, zstor
    timeout = float(os.environ["WCFS_TEST_RECONNECT_TIMEOUT"])
    server.open_zstor = partial(zstor.open_zstor, reconnect_timeout=timeout)
    return server.serve(zurl, mountpoint, **kw)


def short_reconnect_env() -> dict[str, str]:
    """Environment for WcfsProc that starts the server through `serve_short_reconnect`."""
    return {"WCFS_SERVE_IMPL": f"{__name__}:serve_short_reconnect",
            "WCFS_TEST_RECONNECT_TIMEOUT": str(SHORT_RECONNECT),
            "PYTHONPATH": os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))}


# --- writers ------------------------------------------------------------------------

def zeo_writer(addr: str) -> WriterDB:
    from ZEO.ClientStorage import ClientStorage
    host, port = addr.rsplit(":", 1)
    return WriterDB(ClientStorage((host, int(port)), wait_timeout=30), "zeo://" + addr)


class RelWriterDB(WriterDB):
    """RelStorage writer: commits go through the connection's own storage
    instance, so the root storage's last tid is stale -- ask the connection's."""

    @classmethod
    def open(cls, url: str) -> "RelWriterDB":
        from zodburi import resolve_uri
        factory, _ = resolve_uri(url)
        return cls(factory(), url)

    def commit(self) -> int:
        self.tm.commit()
        return self.head

    @property
    def head(self) -> int:
        return u64(self.conn._storage.lastTransaction())


@pytest.fixture(params=["zeo", "pg"])
def backend(request, tmp_path):
    """A writer over a ZEO server or a RelStorage/PostgreSQL database."""
    if request.param == "zeo":
        zs = request.getfixturevalue("zeo_server")(str(tmp_path / "Data.fs"))
        w = zeo_writer(zs.addr)
    else:
        w = RelWriterDB.open(request.getfixturevalue("pg_db"))
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def wcfs(tmp_path):
    """``start(zurl, *options, env=None)`` -> WcfsProc; all stopped at teardown."""
    procs: list[WcfsProc] = []

    def start(zurl: str, *options: str, env: dict | None = None) -> WcfsProc:
        p = WcfsProc(zurl, str(tmp_path / f"mnt{len(procs)}"), *options, env=env)
        procs.append(p)
        return p
    try:
        yield start
    finally:
        for p in procs:
            p.stop()


def commit_and_wait(db: WriterDB, srv: WcfsProc, timeout: float = 20) -> int:
    tid = db.commit()
    srv.wait_head(tid, timeout)
    return tid


def fpath(srv: WcfsProc, zf, rev: int | None = None) -> str:
    view = "head" if rev is None else f"@{rev:016x}"
    return srv.path(view, "bigfile", zf._p_oid.hex())


def assert_eio(fn) -> None:
    with pytest.raises(OSError) as e:
        fn()
    assert e.value.errno == errno.EIO, e.value


# --- scenarios on every backend -------------------------------------------------------

def test_reads_holes_short_blocks(backend, wcfs):
    zf = backend.new_file("zf", BS)
    zf.storeblk(0, content(0))
    zf.storeblk(2, content(2, 1000))            # short block
    zf.storeblk(4, b"")                        # stored empty
    backend.commit()
    srv = wcfs(backend.zurl)
    assert srv.head_at() == backend.head
    p = fpath(srv, zf)
    st = os.stat(p)
    assert st.st_size == 5 * BS and st.st_blksize == BS
    data = read_file(p)
    assert data[:BS] == content(0)
    assert data[BS:2 * BS] == bytes(BS)                                  # hole
    assert data[2 * BS:3 * BS] == content(2, 1000) + bytes(BS - 1000)
    assert data[3 * BS:] == bytes(2 * BS)
    assert read_file(p, BS - 10, 20) == content(0)[-10:] + bytes(10)
    assert read_file(p, 2 * BS + 990, 20) == content(2, 1000)[-10:] + bytes(10)
    assert read_file(p, 5 * BS, 100) == b""


def test_rev_views(backend, wcfs):
    zf = backend.new_file("zf", BS)
    t0 = backend.head                                           # zf created
    zf.storeblk(0, content(1))
    t1 = backend.commit()
    srv = wcfs(backend.zurl)
    zf.storeblk(0, content(2))
    zf.storeblk(1, content(3))
    t2 = commit_and_wait(backend, srv)
    assert read_file(fpath(srv, zf, t1)) == content(1)
    assert os.stat(fpath(srv, zf, t1)).st_size == BS
    assert read_file(fpath(srv, zf, t2 - 1)) == content(1)      # any rev, not only real tids
    assert read_file(fpath(srv, zf, t2)) == content(2) + content(3)
    assert read_file(fpath(srv, zf)) == content(2) + content(3)
    with pytest.raises(OSError) as e:                           # before the file existed
        os.stat(srv.path(f"@{t0 - 1:016x}", "bigfile", zf._p_oid.hex()))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:                           # in the future
        os.stat(srv.path(f"@{t2 + 10**9:016x}"))
    assert e.value.errno == errno.EINVAL


def test_page_cache_follows_commits(backend, wcfs):
    """A commit drops exactly the changed block from head's page cache; its
    old content lands in the @rev cache without any read."""
    zf = backend.new_file("zf", BS)
    for k in range(8):
        zf.storeblk(k, content(k))
    t1 = backend.commit()
    srv = wcfs(backend.zurl)
    p = fpath(srv, zf)
    assert read_file(p) == b"".join(content(k) for k in range(8))
    wait_until(lambda: all(block_resident(p, k, BS) for k in range(8)), 5, "blocks uploaded to page cache")

    zf.storeblk(3, content(33))
    commit_and_wait(backend, srv)
    # Right after the commit is visible (idle page cache is reclaimed within seconds here).
    resident = [block_resident(p, k, BS) for k in range(8)]
    assert block_uncached(p, 3, BS)
    assert resident == [True, True, True, False, True, True, True, True]
    rp = fpath(srv, zf, t1)
    assert block_resident(rp, 3, BS)
    assert read_file(rp, 3 * BS, BS) == content(3)
    assert read_file(p, 3 * BS, BS) == content(33)
    assert read_file(p) == b"".join(content(33 if k == 3 else k) for k in range(8))


def test_growth_and_attributes(backend, wcfs):
    zf = backend.new_file("zf", BS)
    zf.storeblk(0, content(0))
    backend.commit()
    srv = wcfs(backend.zurl)
    p = fpath(srv, zf)
    assert os.stat(p).st_size == BS
    mtime1 = os.stat(p).st_mtime
    read_file(p)
    zf.storeblk(5, content(5))
    commit_and_wait(backend, srv)
    st = os.stat(p)
    assert st.st_size == 6 * BS
    assert st.st_mtime >= mtime1
    assert read_file(p) == content(0) + bytes(4 * BS) + content(5)
    del zf.blktab[5]
    commit_and_wait(backend, srv)
    assert os.stat(p).st_size == BS
    assert read_file(p) == content(0)


@pytest.mark.parametrize("backend", ["zeo", "pg"], indirect=True)
def test_btree_growth_many_blocks(backend, wcfs):
    """Many blocks: bucket splits when filling holes, merges when deleting;
    every block and the size checked after each commit."""
    bs = 4096
    zf = backend.new_file("zf", bs)
    expect: dict[int, bytes] = {}
    for k in range(0, 300, 3):
        expect[k] = content(k, 100)
        zf.storeblk(k, expect[k])
    backend.commit()
    srv = wcfs(backend.zurl)
    p = fpath(srv, zf)
    rng = np.random.default_rng(11)

    def check() -> None:
        size = (max(expect) + 1) * bs if expect else 0
        assert os.stat(p).st_size == size
        data = read_file(p)
        assert len(data) == size
        for k in range(size // bs):
            assert data[k * bs:(k + 1) * bs] == expect.get(k, b"").ljust(bs, b"\0"), f"block {k}"

    check()
    for round_ in range(4):
        if round_ % 2 == 0:
            for k in rng.choice(500, 150, replace=False):
                expect[int(k)] = content(1000 * round_ + int(k), 100)
                zf.storeblk(int(k), expect[int(k)])
        else:
            for k in rng.choice(sorted(expect), 100, replace=False):
                del zf.blktab[int(k)]
                del expect[int(k)]
        commit_and_wait(backend, srv)
        check()


def test_pg_connections_bounded(pg_cluster, pg_db, wcfs):
    """The server's PostgreSQL connections do not grow with its FUSE worker
    threads (up to 64, created and retired by libfuse as load varies):
    concurrent readers between commits, connections counted after each round.
    The limit is well below both that thread count and PostgreSQL's default
    max_connections (100), which the whole cluster shares."""
    import psutil
    limit = 24
    bs = 4096
    w = RelWriterDB.open(pg_db)
    try:
        zf = w.new_file("zf", bs)
        blocks = {k: content(k, 100) for k in range(400)}
        for k, b in blocks.items():
            zf.storeblk(k, b)
        w.commit()
        srv = wcfs(pg_db)
        p = fpath(srv, zf)
        want = b"".join(blocks[k].ljust(bs, b"\0") for k in range(400))

        def server_conns() -> int:
            return sum(1 for c in psutil.Process(srv.proc.pid).net_connections("tcp")
                       if c.raddr and c.raddr.port == pg_cluster.port)

        counts = []
        for round_ in range(4):
            errors: list[BaseException] = []

            def reader() -> None:
                try:
                    assert read_file(p) == want
                except BaseException as e:          # reported below, in the test thread
                    errors.append(e)
            readers = [threading.Thread(target=reader) for _ in range(4)]
            for t in readers:
                t.start()
            for t in readers:
                t.join(60)
            assert not any(t.is_alive() for t in readers)
            counts.append(server_conns())
            assert not errors, (errors[0], f"server connections per round: {counts}")
            for k in range(round_, 400, 8):
                blocks[k] = content(1000 * round_ + k, 100)
                zf.storeblk(k, blocks[k])
            want = b"".join(blocks[k].ljust(bs, b"\0") for k in range(400))
            commit_and_wait(w, srv)
        assert max(counts) <= limit, counts
    finally:
        w.close()


# --- ZEO server going away -------------------------------------------------------------

class ZheadTail:
    """``.wcfs/debug/zhead`` read by a child process, lines collected with a timeout.

    A child, not a thread: the server waits for every zhead reader to take
    each tid, so the stream must be read all along, and a read parked in the
    server can only be ended by killing the reader (FUSE interrupt)."""

    def __init__(self, path: str) -> None:
        code = ("import os, sys\n"
                "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                "print('ready', flush=True)\n"
                "while True:\n"
                "    sys.stdout.write(os.read(fd, 4096).decode()); sys.stdout.flush()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE)
        self._buf = b""
        assert self._line(10) == "ready"

    def _line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no zhead line in {timeout}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"zhead reader exited ({self.proc.wait(5)})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def tids_until(self, last: int, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        tids: list[int] = []
        while not tids or tids[-1] < last:
            tids.append(int(self._line(max(0.0, deadline - time.monotonic())), 16))
        return tids

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture
def zhead_tail():
    tails: list[ZheadTail] = []

    def start(path: str) -> ZheadTail:
        t = ZheadTail(path)
        tails.append(t)
        return t
    try:
        yield start
    finally:
        for t in tails:
            t.close()


def test_zeo_restart_catch_up(tmp_path, zeo_server, wcfs, zhead_tail):
    """Commits before a ZEO stop, while it is down (straight into Data.fs),
    and after a restart on the same address: the server applies every one of
    them, in order, and serves the right data through head/ and each @rev."""
    path = str(tmp_path / "Data.fs")
    zs = zeo_server(path)
    expect: dict[int, list[bytes]] = {}      # tid -> content of blocks 0..5 (b"" = hole)
    blocks = [content(k) for k in range(4)] + [b"", b""]

    def record(tid: int) -> None:
        expect[tid] = list(blocks)

    def change(zf, changes: dict[int, bytes]) -> None:
        for k, data in changes.items():
            zf.storeblk(k, data)
            blocks[k] = data

    w = zeo_writer(zs.addr)
    try:
        zf = w.new_file("zf", BS)
        change(zf, {k: blocks[k] for k in range(4)})
        record(w.commit())
        srv = wcfs(w.zurl)
        tail = zhead_tail(srv.path(".wcfs/debug/zhead"))
        p = fpath(srv, zf)
        assert read_file(p) == b"".join(blocks[:4])
        change(zf, {1: content(11)})
        record(commit_and_wait(w, srv))
        assert read_file(p) == b"".join(blocks[:4])           # all cached again
    finally:
        w.close()
    oid = zf._p_oid

    zs.stop()
    # The database moves on while the ZEO server is down.
    fs = WriterDB.filestorage(path)
    try:
        zf = fs.conn.get(oid)
        change(zf, {2: content(22)})
        record(fs.commit())
        change(zf, {0: content(100), 5: content(5)})
        record(fs.commit())
    finally:
        fs.close()
    assert srv.head_at() == list(expect)[1]                 # still the state before the stop
    zs.start()
    w = zeo_writer(zs.addr)
    try:
        zf = w.conn.get(oid)
        change(zf, {3: content(33)})
        record(w.commit())
        change(zf, {1: content(111), 4: content(4, 500)})
        last = w.commit()
        record(last)
    finally:
        w.close()

    tids = list(expect)
    assert tail.tids_until(last, 30) == tids[1:]            # every transaction, one by one
    srv.wait_head(last, 10)
    assert srv.head_at() == last

    def image(bl: list[bytes]) -> bytes:
        n = max(k for k, b in enumerate(bl) if b) + 1
        return b"".join(b.ljust(BS, b"\0") for b in bl[:n])

    assert os.stat(p).st_size == 6 * BS
    assert read_file(p) == image(blocks)
    for tid, bl in expect.items():
        assert read_file(fpath(srv, zf, tid)) == image(bl), f"@{tid:016x}"

    # Back to following invalidations: a cached block changed by a new commit is dropped.
    wait_until(lambda: block_resident(p, 2, BS), 5, "block 2 cached")
    w = zeo_writer(zs.addr)
    try:
        zf = w.conn.get(oid)
        change(zf, {2: content(222)})
        t = commit_and_wait(w, srv)
    finally:
        w.close()
    assert tail.tids_until(t, 10) == [t]
    assert block_uncached(p, 2, BS)
    assert read_file(p) == image(blocks)


def test_zeo_killed_switches_to_eio(tmp_path, zeo_server, wcfs):
    """ZEO killed and never back, while the database moves on without it:
    EIO mode within the reconnect timeout; no read returns the old data after."""
    path = str(tmp_path / "Data.fs")
    zs = zeo_server(path)
    w = zeo_writer(zs.addr)
    try:
        zf = w.new_file("zf", BS)
        for k in range(4):
            zf.storeblk(k, content(k))
        t1 = w.commit()
    finally:
        w.close()
    srv = wcfs("zeo://" + zs.addr, env=short_reconnect_env())
    p = fpath(srv, zf)
    old = b"".join(content(k) for k in range(4))
    fd = os.open(p, os.O_RDONLY)           # held open: its cached pages must go too
    try:
        assert read_file(p) == old
        wait_until(lambda: all(block_resident(p, k, BS) for k in range(4)), 5, "blocks cached")

        zs.kill()
        t_kill = time.monotonic()
        fs = WriterDB.filestorage(path)                          # a writer without ZEO
        try:
            fs.conn.get(zf._p_oid).storeblk(0, content(100))
            t2 = fs.commit()
        finally:
            fs.close()
        wait_until(lambda: "EIO mode" in srv.log(), SHORT_RECONNECT + 20, "EIO mode")
        elapsed = time.monotonic() - t_kill
        print(f"\nZEO killed -> EIO mode in {elapsed:.2f}s (reconnect timeout {SHORT_RECONNECT:g}s)")
        assert srv.proc.poll() is None                           # alive, not hung
        assert srv.head_at() == t1 != t2
        assert_eio(lambda: os.pread(fd, BS, 0))
        assert_eio(lambda: read_file(p))
        assert_eio(lambda: read_file(p, 0, BS, readahead=False))
        assert_eio(lambda: read_file(fpath(srv, zf, t1)))
        assert "zwatcher failed" in srv.log()
    finally:
        os.close(fd)
    srv.stop()
    assert srv.proc.returncode == 1                          # EIO mode is reported by the exit code


@pytest.mark.parametrize("read_before, commit_after", [
    pytest.param(True, False, id="same-data"),
    pytest.param(True, True, id="diverged"),
    pytest.param(False, False, id="unread")])
def test_zeo_restarted_on_older_database_eio(tmp_path, zeo_server, wcfs, read_before, commit_after):
    """The ZEO server comes back serving an older copy of the database (a
    restored backup) that lacks the last transaction the server applied --
    as is, or with new commits of its own: continuity is gone, so EIO mode.
    "unread": nothing was read through the server, so its ZEO client cache is
    empty and ZEO's own cache verification does not notice the older server."""
    path = str(tmp_path / "Data.fs")
    zs = zeo_server(path)
    w = zeo_writer(zs.addr)
    try:
        zf = w.new_file("zf", BS)
        zf.storeblk(0, content(0))
        zf.storeblk(1, content(1))
        w.commit()
        shutil.copyfile(path, path + ".backup")                  # lacks what follows
        srv = wcfs("zeo://" + zs.addr, env=short_reconnect_env())
        p = fpath(srv, zf)
        zf.storeblk(0, content(10))
        t2 = commit_and_wait(w, srv)
        if read_before:
            assert read_file(p) == content(10) + content(1)
    finally:
        w.close()
    zs.stop()
    os.replace(path + ".backup", path)
    for ext in (".index", ".tmp"):
        if os.path.exists(path + ext):
            os.remove(path + ext)
    zs.start()
    if commit_after:
        w = zeo_writer(zs.addr)
        try:
            zf = w.conn.get(zf._p_oid)
            assert zf.loadblk(0) == content(0)                   # the restored state
            zf.storeblk(1, content(11))
            t3 = w.commit()
        finally:
            w.close()
        assert t3 > t2
    wait_until(lambda: "EIO mode" in srv.log(), SHORT_RECONNECT + 10, "EIO mode")
    assert srv.head_at() == t2
    assert_eio(lambda: read_file(p))


# --- FileStorage: a transaction only partly in Data.fs ----------------------------------

@pytest.fixture
def fs_pair(tmp_path):
    """(writer on src.fs, path of dst.fs): the server follows dst.fs, which the
    test extends with bytes of transactions committed to src.fs."""
    src = str(tmp_path / "src.fs")
    dst = str(tmp_path / "dst.fs")
    w = WriterDB.filestorage(src)
    try:
        yield w, dst
    finally:
        w.close()


def test_fs_partial_transaction_appended(fs_pair, wcfs):
    """Half of a committed transaction at the end of Data.fs (as a copier
    leaves it) is not delivered; the completed one is."""
    w, dst = fs_pair
    src = w.zurl[len("file://"):]
    zf = w.new_file("zf", BS)
    blocks = [content(k) for k in range(4)]
    for k, b in enumerate(blocks):
        zf.storeblk(k, b)
    w.commit()
    shutil.copyfile(src, dst)
    srv = wcfs("file://" + dst)
    p = fpath(srv, zf)
    assert read_file(p) == b"".join(blocks)

    # Cut points: inside the header, inside the data records, just before the
    # trailing redundant length, one byte short.
    for i, cut in enumerate([lambda n: 10, lambda n: n // 2, lambda n: n - 8, lambda n: n - 1]):
        head0 = srv.head_at()
        blocks[i] = content(50 + i)
        zf.storeblk(i, blocks[i])
        tid = w.commit()
        with open(src, "rb") as f:
            f.seek(os.path.getsize(dst))
            txn = f.read()
        assert txn[:8] == tid.to_bytes(8, "big")                # exactly one transaction
        k = cut(len(txn))
        with open(dst, "ab") as f:
            f.write(txn[:k])
        time.sleep(0.5)                                        # ≫ the 10 ms poll interval
        assert srv.head_at() == head0, f"cut {k}/{len(txn)}"
        assert "EIO mode" not in srv.log()
        with open(dst, "ab") as f:
            f.write(txn[k:])
        srv.wait_head(tid)
        assert read_file(p) == b"".join(blocks)
        assert read_file(fpath(srv, zf, head0), i * BS, BS) == content(i)     # its old data
    assert "EIO mode" not in srv.log()


class VoteGate:
    """A transaction participant that votes after the storage and waits there:
    the storage has written its transaction with status 'c' and not finished it."""

    def __init__(self) -> None:
        self.voting = threading.Event()
        self.release = threading.Event()

    def sortKey(self) -> str:          # noqa: N802 - transaction's name; after any path
        return "~~~ vote gate"

    def tpc_vote(self, txn) -> None:
        self.voting.set()
        if not self.release.wait(60):
            raise RuntimeError("vote gate never released")

    # The gate holds no data: nothing to do in the other phases.
    def abort(self, txn) -> None: ...
    def tpc_begin(self, txn) -> None: ...
    def commit(self, txn) -> None: ...
    def tpc_finish(self, txn) -> None: ...
    def tpc_abort(self, txn) -> None: ...


def test_fs_transaction_being_committed(tmp_path, wcfs):
    """A real FileStorage stopped between vote and finish: its 'c' transaction
    is in Data.fs for longer than the feed's grace for malformed tails; head/at
    does not move, nothing fails, and the finished transaction is delivered."""
    from wcfs.zstor import TAIL_GRACE
    w = WriterDB.filestorage(str(tmp_path / "Data.fs"))
    try:
        zf = w.new_file("zf", BS)
        zf.storeblk(0, content(0))
        zf.storeblk(1, content(1))
        t1 = w.commit()
        srv = wcfs(w.zurl)
        p = fpath(srv, zf)
        assert read_file(p) == content(0) + content(1)
        size0 = os.path.getsize(w.zurl[len("file://"):])

        zf.storeblk(1, content(11))
        gate = VoteGate()
        w.tm.get().join(gate)
        result: list = []
        committer = threading.Thread(target=lambda: result.append(w.commit()), daemon=True)
        committer.start()
        try:
            assert gate.voting.wait(20)
            assert os.path.getsize(w.zurl[len("file://"):]) > size0
            time.sleep(TAIL_GRACE + 1)
            assert srv.head_at() == t1
            assert read_file(p) == content(0) + content(1)
            assert "EIO mode" not in srv.log()
        finally:
            gate.release.set()
            committer.join(30)
        assert not committer.is_alive() and result
        t2 = result[0]
        srv.wait_head(t2)
        assert read_file(p) == content(0) + content(11)
        assert read_file(fpath(srv, zf, t1)) == content(0) + content(1)
    finally:
        w.close()
