"""wcfs.zstor against real storages: a FileStorage written by another
process, a real ZEO server (runzeo), and RelStorage on a private PostgreSQL.

The same scenarios run on every backend: head = last tid at open; commits
made after open arrive in order with exactly the oids written (new objects
and BTree buckets created by splits included), as reported by the writer
through the storage's own iterator; load_before at various tids returns the
right revision and next_serial; POSKeyError before creation, ObjectDeleted
after an undone creation; no gap when commits race with open; timeouts.
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from typing import Callable

import pytest
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64

from zfixtures import Writer  # noqa: E402  (fixtures come from conftest)

from wcfs import zstor  # noqa: E402
from wcfs.zstor import (Commit, FeedError, HistoryLost, ObjectDeleted,  # noqa: E402
                        ZStor, open_zstor)

pytestmark = pytest.mark.timeout(120)

TESTDATA = "/work/shared/testdata/wendelin-zblk"
T = 15.0          # generous bound for one delivery


def b(hexstr: str) -> bytes:
    return bytes.fromhex(hexstr)


def after(tid: bytes) -> bytes:
    """`before` value that loads the state as of `tid` (inclusive)."""
    return p64(u64(tid) + 1)


def expect(zs: ZStor, answer: dict, timeout: float = T) -> Commit:
    c = zs.next_commit(timeout)
    assert c is not None, f"transaction {answer['tid']} not delivered within {timeout}s"
    assert c.tid == b(answer["tid"])
    assert c.oids == frozenset(b(o) for o in answer["oids"])
    return c


class ThreadRunner:
    """A dedicated thread that runs callables on request (so that a test can
    load from a specific, long-lived thread)."""

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            fn, out = job
            try:
                out.put((True, fn()))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                out.put((False, e))

    def call(self, fn: Callable, timeout: float = 30.0):
        out: queue.Queue = queue.Queue()
        self._q.put((fn, out))
        ok, value = out.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._q.put(None)
        self._t.join(10)


# ---------------------------------------------------------------------------
# Scenarios shared by all backends.

def scenario_feed_and_loads(w: Writer, open_zs: Callable[[], ZStor]) -> dict:
    """Returns {"zs": the open ZStor (the caller closes it), "a": an oid,
    "commits": the writer's answers}, for backend-specific extra checks."""
    r0 = w.cmd(op="new", key="base", size=10)
    zs = open_zs()
    runners = [ThreadRunner(), ThreadRunner()]
    try:
        assert zs.head == b(r0["tid"])
        t0 = time.monotonic()
        assert zs.next_commit(0.2) is None              # idle: timeout gives None
        assert time.monotonic() - t0 >= 0.19
        assert zs.next_commit(0) is None

        # loader threads hold their storage state from before the commits
        for r in runners:
            r.call(lambda: zs.load_before(p64(0), after(zs.head)))

        r1 = w.cmd(op="new", key="a", size=100, fill=1)         # creates a
        a = b(w.cmd(op="oid", key="a")["oid"])
        c1 = expect(zs, r1)
        assert c1.oids == {p64(0), a}
        assert zs.load_before(a, after(c1.tid))[1:] == (c1.tid, None)   # (ZEO: now cached)
        r2 = w.cmd(op="set", key="a", size=100, fill=2)
        c2 = expect(zs, r2)
        assert c2.oids == {a}
        # a delivered commit is visible to loads at once (ZEO: cache already invalidated)
        assert zs.load_before(a, after(c2.tid))[1:] == (c2.tid, None)
        r3 = w.cmd(op="btree", key="t", n=10)                  # a small tree: one object
        c3 = expect(zs, r3)
        seen = {p64(0), a} | c3.oids
        r4 = w.cmd(op="btree", key="t", n=300, start=10)       # splits: new buckets
        c4 = expect(zs, r4)
        created = c4.oids - seen
        assert len(created) >= 2, f"a split should create buckets: {c4.oids}"
        r5 = w.cmd(op="set", key="a", size=200, fill=3)
        expect(zs, r5)
        assert zs.next_commit(0.1) is None

        t1, t2, t5 = b(r1["tid"]), b(r2["tid"]), b(r5["tid"])
        data, serial, nxt = zs.load_before(a, after(t1))
        assert (serial, nxt) == (t1, t2) and b"\x01" * 100 in data
        assert zs.load_before(a, t2) == (data, serial, nxt)
        data, serial, nxt = zs.load_before(a, after(t2))
        assert (serial, nxt) == (t2, t5) and b"\x02" * 100 in data
        data, serial, nxt = zs.load_before(a, after(t5))
        assert (serial, nxt) == (t5, None) and b"\x03" * 200 in data
        data, serial, nxt = zs.load_before(p64(0), after(zs.head))
        assert (serial, nxt) == (zs.head, t1)
        for oid in created:                                     # buckets load at their tid
            _, serial, _ = zs.load_before(oid, after(b(r4["tid"])))
            assert serial == b(r4["tid"])
            with pytest.raises(POSKeyError) as ei:
                zs.load_before(oid, b(r4["tid"]))
            assert not isinstance(ei.value, ObjectDeleted)
        with pytest.raises(POSKeyError) as ei:                 # not yet created
            zs.load_before(a, t1)
        assert type(ei.value) is POSKeyError
        with pytest.raises(POSKeyError):                       # never created
            zs.load_before(p64(0xdead0001), after(t5))

        # threads that loaded before the commits see every delivered one
        for r in runners + [ThreadRunner()]:
            assert r.call(lambda: zs.load_before(a, after(t5)))[1] == t5
            assert r.call(lambda: zs.load_before(a, after(t2)))[1:] == (t2, t5)
            if r not in runners:
                r.stop()
        return {"zs": zs, "a": a, "commits": [r1, r2, r3, r4, r5]}
    except BaseException:
        zs.close()
        raise
    finally:
        for r in runners:
            r.stop()


def scenario_undo_creation(w: Writer, zs: ZStor) -> None:
    rn = w.cmd(op="new", key="u", size=30, fill=7)
    u = b(w.cmd(op="oid", key="u")["oid"])
    expect(zs, rn)
    ru = w.cmd(op="undo", tid=rn["tid"])
    cu = expect(zs, ru)
    assert u in cu.oids and p64(0) in cu.oids
    tn, tu = b(rn["tid"]), b(ru["tid"])
    data, serial, nxt = zs.load_before(u, after(tn))
    assert (serial, nxt) == (tn, tu) and b"\x07" * 30 in data
    with pytest.raises(ObjectDeleted):
        zs.load_before(u, after(tu))
    with pytest.raises(POSKeyError) as ei:
        zs.load_before(u, tn)
    assert not isinstance(ei.value, ObjectDeleted)


def scenario_race_with_open(w: Writer, open_zs: Callable[[], ZStor], n: int = 100) -> None:
    w.cmd(op="new", key="x", size=1)
    w.send(op="loop", n=n, delay=0.002)
    assert w.read()["started"]
    time.sleep(0.1)
    zs = open_zs()
    try:
        commits = w.read(120)["commits"]
        tids = [b(c["tid"]) for c in commits]
        expected = [c for c in commits if b(c["tid"]) > zs.head]
        assert zs.head in tids or zs.head < tids[0]
        assert 0 < len(expected) < n, "open did not race with the commits; adjust timing"
        for c in expected:
            expect(zs, c)
        assert zs.next_commit(0.1) is None
    finally:
        zs.close()


def check_close_unblocks(zs: ZStor) -> None:
    got: queue.Queue = queue.Queue()

    def wait() -> None:
        try:
            got.put(zs.next_commit(None))
        except FeedError as e:
            got.put(e)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    time.sleep(0.2)
    zs.close()
    zs.close()                                          # idempotent
    assert isinstance(got.get(timeout=T), FeedError)
    t.join(T)
    with pytest.raises(FeedError):
        zs.next_commit(0)


# ---------------------------------------------------------------------------
# FileStorage

@pytest.fixture
def fs_path(tmp_path) -> str:
    return str(tmp_path / "Data.fs")


def compare_with_filestorage(zs: ZStor, path: str) -> None:
    """Our loads == ZODB's FileStorage.loadBefore for every oid and revision."""
    from ZODB.FileStorage import FileIterator, FileStorage
    tids, oids = [], set()
    for txn in FileIterator(path):
        tids.append(txn.tid)
        oids.update(rec.oid for rec in txn)
    fs = FileStorage(path, read_only=True)
    try:
        for oid in oids:
            for tid in tids:
                for before in (tid, after(tid)):
                    try:
                        want = fs.loadBefore(oid, before)
                    except POSKeyError:
                        want = "deleted"
                    try:
                        got = zs.load_before(oid, before)
                    except ObjectDeleted:
                        got = "deleted"
                    except POSKeyError:
                        got = None
                    assert got == want, (oid.hex(), before.hex())
    finally:
        fs.close()


def test_fs_feed_and_loads(fs_path, spawn_writer):
    w = spawn_writer("fs", fs_path)
    res = scenario_feed_and_loads(w, lambda: open_zstor("file://" + fs_path))
    zs = res["zs"]
    try:
        scenario_undo_creation(w, zs)
        re = w.cmd(op="empty")
        assert expect(zs, re).oids == frozenset()
        w.close()
        compare_with_filestorage(zs, fs_path)
        check_close_unblocks(zs)
    finally:
        zs.close()


def test_fs_race_with_open(fs_path, spawn_writer):
    w = spawn_writer("fs", fs_path)
    scenario_race_with_open(w, lambda: open_zstor(fs_path))      # bare path works too


def _make_fs(path: str, build: Callable) -> None:
    """Commit build(root) to the FileStorage at path (in this process)."""
    import ZODB
    from ZODB.FileStorage import FileStorage
    db = ZODB.DB(FileStorage(path))
    try:
        with db.transaction() as conn:
            build(conn.root())
    finally:
        db.close()


def _next_txn_bytes(path: str, tmp, change: Callable) -> tuple[bytes, set[bytes]]:
    """Bytes of the transaction that `change` would append to `path`, and its oids."""
    from ZODB.FileStorage import FileIterator
    other = str(tmp / "other.fs")
    shutil.copyfile(path, other)
    size = os.path.getsize(path)
    _make_fs(other, change)
    with open(other, "rb") as f:
        f.seek(size)
        tail = f.read()
    oids: set[bytes] = set()
    for txn in FileIterator(other):
        oids = {rec.oid for rec in txn}
    return tail, oids


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_fs_partial_and_checkpoint(fs_path, tmp_path, monkeypatch):
    from persistent.mapping import PersistentMapping
    _make_fs(fs_path, lambda root: root.update(a=PersistentMapping(data=b"A")))
    zs = open_zstor("file://" + fs_path)
    try:
        assert os.path.exists(fs_path + ".index")            # started from FileStorage's index

        def change_b(root):
            root["a"]["data"] = b"B"
            root["b"] = PersistentMapping(data=b"new")
        tail, oids = _next_txn_bytes(fs_path, tmp_path, change_b)
        assert len(oids) == 3
        half = len(tail) // 2
        _append(fs_path, tail[:half])                          # a partial transaction...
        assert zs.next_commit(0.2) is None
        _append(fs_path, tail[half:-4])                        # ...all but the redundant length
        assert zs.next_commit(0.2) is None
        _append(fs_path, tail[-4:])                            # now complete
        c = zs.next_commit(T)
        assert c is not None and c.oids == oids
        tid_b = c.tid
        assert b"B" in zs.load_before(p64(1), after(tid_b))[0]

        # a checkpoint ('c') transaction is still being committed: ignored;
        # an aborted one is truncated away and other bytes take its place
        start = os.path.getsize(fs_path)
        tail_x, _ = _next_txn_bytes(fs_path, tmp_path,
                                    lambda root: root.update(x=PersistentMapping(data=b"X")))
        _append(fs_path, tail_x[:16] + b"c" + tail_x[17:])
        assert zs.next_commit(0.3) is None
        os.truncate(fs_path, start)
        tail2, oids2 = _next_txn_bytes(fs_path, tmp_path,
                                       lambda root: root["a"].update(data=b"C"))
        assert tail2[16:17] == b" " and len(oids2) == 1
        _append(fs_path, tail2[:16] + b"c" + tail2[17:])
        assert zs.next_commit(0.3) is None
        with open(fs_path, "r+b") as f:
            f.seek(start + 16)
            f.write(b" ")
        c = zs.next_commit(T)
        assert c is not None and c.oids == oids2
        assert zs.load_before(p64(1), after(c.tid))[1:] == (c.tid, None)
        assert zs.load_before(p64(1), c.tid)[1:] == (tid_b, c.tid)

        # garbage where the next transaction should be: FeedError after the grace time
        monkeypatch.setattr(zstor, "TAIL_GRACE", 0.3)
        _append(fs_path, tail2[:16] + b"X" + tail2[17:])
        with pytest.raises(FeedError, match="invalid transaction status"):
            while zs.next_commit(5) is None:
                pass
        with pytest.raises(FeedError):                        # a failed feed stays failed
            zs.next_commit(0)
    finally:
        zs.close()


def test_fs_index_file_mismatch(fs_path, tmp_path):
    """A saved index that does not describe the file is ignored (full scan)."""
    from persistent.mapping import PersistentMapping
    _make_fs(fs_path, lambda root: root.update(a=PersistentMapping(data=b"A")))
    _make_fs(fs_path, lambda root: root.update(b=PersistentMapping(data=b"B")))
    other = str(tmp_path / "o.fs")
    _make_fs(other, lambda root: root.update(x=PersistentMapping(data=b"X" * 999)))
    shutil.copyfile(other + ".index", fs_path + ".index")
    zs = open_zstor(fs_path)
    try:
        compare_with_filestorage(zs, fs_path)
    finally:
        zs.close()


def test_fs21_python2_file(tmp_path):
    """A database written by Python 2 (magic FS21) opens read-only and loads
    exactly what ZODB reads from the same bytes under the FS30 magic."""
    from ZODB.FileStorage import FileIterator
    path = f"{TESTDATA}/py2_pickle1/zblk.fs"
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:4] == b"FS21"
    copy = str(tmp_path / "fs30.fs")                   # the oracle: same bytes as FS30
    with open(copy, "wb") as f:
        f.write(b"FS30" + raw[4:])
    tids = [txn.tid for txn in FileIterator(copy)]
    zs = open_zstor("file://" + path)                  # a read-only directory
    try:
        assert zs.head == tids[-1]
        data, serial, nxt = zs.load_before(p64(0), after(zs.head))
        assert serial == zs.head and nxt is None
        assert data.startswith(b"cpersistent.mapping\nPersistentMapping\n")   # protocol 1
        for key in (b"zbigf", b"zblk0", b"zblk1"):
            assert key in data
        assert zs.load_before(p64(0), zs.head)[1:] == (tids[0], zs.head)
        with pytest.raises(POSKeyError):
            zs.load_before(p64(1), zs.head)                   # created by the second commit
        assert zs.load_before(p64(1), after(zs.head))[1] == zs.head
        assert zs.next_commit(0.05) is None
        compare_with_filestorage(zs, copy)
    finally:
        zs.close()


def test_fs_pack_replaces_file(fs_path, spawn_writer):
    w = spawn_writer("fs", fs_path)
    w.cmd(op="new", key="a", size=50, fill=1)
    r2 = w.cmd(op="set", key="a", size=50, fill=2)
    r3 = w.cmd(op="set", key="a", size=50, fill=3)
    a = b(w.cmd(op="oid", key="a")["oid"])
    zs = open_zstor("file://" + fs_path)
    try:
        assert zs.head == b(r3["tid"])
        ino = os.stat(fs_path).st_ino
        r4 = w.cmd(op="set", key="a", size=50, fill=4)      # maybe seen before the pack
        w.cmd(op="pack")
        assert os.stat(fs_path).st_ino != ino
        r5 = w.cmd(op="set", key="a", size=50, fill=5)
        r6 = w.cmd(op="new", key="n", size=5)
        for r in (r4, r5, r6):
            expect(zs, r)
        assert zs.next_commit(0.1) is None
        t4, t5 = b(r4["tid"]), b(r5["tid"])
        data, serial, nxt = zs.load_before(a, after(t5))
        assert serial == t5 and b"\x05" * 50 in data
        data, serial, nxt = zs.load_before(a, t5)           # kept by the pack: current then
        assert (serial, nxt) == (t4, t5) and b"\x04" * 50 in data
        with pytest.raises(HistoryLost):                     # packed away: fails, never wrong
            zs.load_before(a, after(b(r2["tid"])))
        r7 = w.cmd(op="set", key="a", size=50, fill=7)
        expect(zs, r7)
    finally:
        zs.close()


def test_fs_pack_lost_continuity(fs_path, tmp_path, spawn_writer):
    """A replacement file without the last delivered transaction: FeedError."""
    from persistent.mapping import PersistentMapping
    _make_fs(fs_path, lambda root: root.update(a=PersistentMapping(data=b"A")))
    zs = open_zstor(fs_path)
    try:
        other = str(tmp_path / "unrelated.fs")
        _make_fs(other, lambda root: root.update(z=PersistentMapping(data=b"Z")))
        os.rename(other, fs_path)
        with pytest.raises(FeedError, match="no longer contains"):
            zs.next_commit(T)
    finally:
        zs.close()


def test_fs_loads_from_threads_while_following(fs_path, spawn_writer):
    """Threads load while the feed extends the index; every load of a
    delivered revision is right."""
    w = spawn_writer("fs", fs_path)
    r = w.cmd(op="new", key="a", size=1000, fill=0)
    a = b(w.cmd(op="oid", key="a")["oid"])
    zs = open_zstor(fs_path)
    stop = threading.Event()
    errors: list = []
    fills = {b(r["tid"]): 0}                 # delivered tid -> fill byte of a

    def loader() -> None:
        n = 0
        while not stop.is_set():
            tids = list(fills)
            tid = tids[n % len(tids)]
            n += 1
            try:
                data, serial, _ = zs.load_before(a, after(tid))
                if serial != tid or bytes([fills[tid]]) * 1000 not in data:
                    errors.append((tid.hex(), serial.hex()))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

    threads = [threading.Thread(target=loader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 30):
            c = expect(zs, w.cmd(op="set", key="a", size=1000, fill=i))
            fills[c.tid] = i
    finally:
        stop.set()
        for t in threads:
            t.join(T)
        zs.close()
    assert not errors, errors[:5]


def test_zurl_errors(tmp_path):
    for bad in ("memory://", "demo:(file:///a.fs)/(memory://)", "mysql://u@h/db",
                "neo://db@host", f"file://{tmp_path}/x.fs?blobstorage_dir=/tmp",
                "zeo://127.0.0.1:1?wait=1", "postgres://u@127.0.0.1:1/db?keep_history=false",
                "postgres://u@127.0.0.1:1/db?demostorage=true"):
        with pytest.raises(ValueError):
            open_zstor(bad)
    with pytest.raises(FileNotFoundError):
        open_zstor(f"file://{tmp_path}/missing.fs")
    notfs = tmp_path / "not.fs"
    notfs.write_bytes(b"XXXX" + b"\0" * 100)
    with pytest.raises(ValueError, match="magic"):
        open_zstor(str(notfs))


# ---------------------------------------------------------------------------
# ZEO

def test_zeo_feed_and_loads(fs_path, zeo_server, spawn_writer):
    srv = zeo_server(fs_path)
    w = spawn_writer("zeo", srv.addr)
    res = scenario_feed_and_loads(w, lambda: open_zstor(f"zeo://{srv.addr}"))
    zs = res["zs"]
    try:
        scenario_undo_creation(w, zs)
        re = w.cmd(op="empty")
        assert expect(zs, re).oids == frozenset()
        w.close()
        compare_with_filestorage(zs, fs_path)       # the server's file, read-only
        check_close_unblocks(zs)
    finally:
        zs.close()


def test_zeo_race_with_open(fs_path, zeo_server, spawn_writer):
    srv = zeo_server(fs_path)
    w = spawn_writer("zeo", srv.addr)
    scenario_race_with_open(w, lambda: open_zstor(f"zeo://{srv.addr}?storage=1"))


def test_zeo_restart_delivers_missed(fs_path, zeo_server, spawn_writer):
    """Transactions committed while we were disconnected (here: directly to
    the file while the server was down, plus whatever the restarted server
    commits before we reconnect) are all delivered, in order, with oids."""
    srv = zeo_server(fs_path)
    w = spawn_writer("zeo", srv.addr)
    w.cmd(op="new", key="a", size=10, fill=1)
    a = b(w.cmd(op="oid", key="a")["oid"])
    zs = open_zstor(f"zeo://{srv.addr}", reconnect_timeout=60)
    try:
        zs.load_before(a, after(zs.head))            # a non-empty client cache
        r2 = w.cmd(op="set", key="a", size=10, fill=2)
        expect(zs, r2)
        zs.load_before(a, after(b(r2["tid"])))
        srv.stop()
        w.close()               # (its prefetched new oids would clash with the direct writer's)
        direct = spawn_writer("fs", fs_path)         # the server is down: commit to the file
        r3 = direct.cmd(op="set", key="a", size=10, fill=3)
        r4 = direct.cmd(op="new", key="b", size=10, fill=4)
        bb = b(direct.cmd(op="oid", key="b")["oid"])
        direct.close()
        assert zs.next_commit(0.3) is None
        srv.start()
        w = spawn_writer("zeo", srv.addr)            # commits before we reconnect, likely
        r5 = w.cmd(op="set", key="a", size=10, fill=5)
        r6 = w.cmd(op="new", key="c", size=10, fill=6)
        for r in (r3, r4, r5, r6):
            expect(zs, r, timeout=30)
        assert zs.next_commit(0.2) is None
        t3, t4, t5 = b(r3["tid"]), b(r4["tid"]), b(r5["tid"])
        data, serial, nxt = zs.load_before(a, after(t4))
        assert (serial, nxt) == (t3, t5) and b"\x03" * 10 in data
        assert zs.load_before(bb, after(t4))[1] == t4
        with pytest.raises(POSKeyError):
            zs.load_before(bb, t4)
    finally:
        zs.close()


def test_zeo_server_gone(fs_path, zeo_server, spawn_writer):
    srv = zeo_server(fs_path)
    w = spawn_writer("zeo", srv.addr)
    w.cmd(op="new", key="a", size=10)
    zs = open_zstor(f"zeo://{srv.addr}", reconnect_timeout=2)
    try:
        w.close()
        srv.kill()
        t0 = time.monotonic()
        with pytest.raises(FeedError, match="disconnected"):
            while zs.next_commit(1) is None:
                assert time.monotonic() - t0 < 30
        assert time.monotonic() - t0 >= 1.9
    finally:
        zs.close()


def test_zeo_unix_socket(tmp_path, zeo_server, spawn_writer):
    srv = zeo_server(str(tmp_path / "Data.fs"), sock=str(tmp_path / "zeo.sock"))
    w = spawn_writer("zeo", srv.addr)
    r1 = w.cmd(op="new", key="a", size=10, fill=1)
    a = b(w.cmd(op="oid", key="a")["oid"])
    zs = open_zstor(f"zeo://{srv.addr}")
    try:
        assert zs.head == b(r1["tid"])
        r2 = w.cmd(op="set", key="a", size=10, fill=2)
        expect(zs, r2)
        assert zs.load_before(a, after(b(r2["tid"])))[1] == b(r2["tid"])
    finally:
        zs.close()


# ---------------------------------------------------------------------------
# RelStorage on PostgreSQL

def test_pg_feed_and_loads(pg_db, spawn_writer):
    w = spawn_writer("pg", pg_db)
    res = scenario_feed_and_loads(w, lambda: open_zstor(pg_db))
    zs = res["zs"]
    try:
        scenario_undo_creation(w, zs)
        check_close_unblocks(zs)
    finally:
        zs.close()


def test_pg_race_with_open(pg_db, spawn_writer):
    w = spawn_writer("pg", pg_db)
    scenario_race_with_open(w, lambda: open_zstor(pg_db))


def test_pg_history_free_rejected(pg_cluster, spawn_writer):
    name = pg_cluster.createdb()
    w = spawn_writer("pg", pg_cluster.uri(name, "keep_history=false"))
    w.cmd(op="new", key="a", size=10)
    w.close()
    with pytest.raises(ValueError, match="history-free"):
        open_zstor(pg_cluster.uri(name))
    with pytest.raises(ValueError, match="history-free"):
        open_zstor(pg_cluster.uri(name, "keep_history=false"))


def test_pg_empty_database_head(pg_db, spawn_writer):
    w = spawn_writer("pg", pg_db)                    # creates the schema, no commit yet
    zs = open_zstor(pg_db)
    try:
        head = zs.head
        r = w.cmd(op="new", key="a", size=3)
        c = expect(zs, r)
        assert c.tid > head
    finally:
        zs.close()


def test_pg_database_gone(spawn_writer):
    """The database server stops for good: FeedError after reconnect_timeout."""
    from zfixtures import PGBIN, PGCluster
    if not os.path.exists(f"{PGBIN}/initdb"):
        pytest.skip(f"PostgreSQL binaries not found in {PGBIN}")
    cluster = PGCluster()                            # a private one: it gets killed
    try:
        cluster.start()
        uri = cluster.uri(cluster.createdb())
        w = spawn_writer("pg", uri)
        w.cmd(op="new", key="a", size=3)
        w.close()
        zs = open_zstor(uri, reconnect_timeout=2)
        try:
            cluster.stop()
            t0 = time.monotonic()
            with pytest.raises(FeedError, match="cannot poll"):
                while zs.next_commit(1) is None:
                    assert time.monotonic() - t0 < 30
        finally:
            zs.close()
    finally:
        cluster.stop()
