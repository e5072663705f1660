"""wcfs_client.zsync: a WCFS Conn kept in sync with a ZODB Connection (WCFS.md §5.3).

The test's own ``ZODB.DB`` over a FileStorage is what ``wconn_of`` follows; its
WCFS server is a real process autostarted by ``wcfs_client.join`` and stopped
at teardown.  zurl_of is checked against real ZEO servers, and zconn_at of
RelStorage against a real PostgreSQL cluster.
"""
from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import transaction
import ZODB
from ZODB.DemoStorage import DemoStorage
from ZODB.FileStorage import FileStorage
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import ConnectionStateError
from ZODB.utils import p64, u64

import wcfs_client
from wcfs import mgmt
from wcfs_client import zsync
from wcfs_client.zsync import wconn_of, zconn_at, zurl_of
from wcfs_env import stop_autostarted, wait_until
from zbigarray import ZBigFile

BS = 64 * 1024


def content(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, BS, dtype=np.uint8).tobytes()


def drain_releases(timeout: float = 10) -> None:
    """Wait until the release worker has run every job queued so far."""
    zsync._ensure_worker()
    done = threading.Event()
    zsync._jobs.put(done.set)
    assert done.wait(timeout), "zsync releases still pending"


def conn_closed(wconn, foid: bytes) -> bool:
    try:
        wconn.open(foid).close()
    except RuntimeError as e:
        assert "connection closed" in str(e)
        return True
    return False


class ZEnv:
    """The test's database, a writer connection, and a ZBigFile in it."""

    def __init__(self, path: str) -> None:
        self.db = ZODB.DB(FileStorage(path))
        self.zurl = zurl_of(self.db.storage)
        self.wtm = transaction.TransactionManager()
        self.wconn = self.db.open(self.wtm)
        self.zf = ZBigFile(BS)
        self.wconn.root()["zf"] = self.zf
        self.zf.storeblk(0, content(0))
        self.wtm.commit()
        self.foid = self.zf._p_oid

    def write(self, seed: int) -> bytes:
        """Commit new data for block 0 through the writer connection -> tid."""
        self.wtm.begin()
        self.zf.storeblk(0, content(seed))
        self.wtm.commit()
        return self.db.storage.lastTransaction()

    @property
    def head(self) -> bytes:
        return self.db.storage.lastTransaction()


@pytest.fixture
def zenv(tmp_path):
    env = ZEnv(str(tmp_path / "Data.fs"))
    mnt = mgmt.mountpoint_for(env.zurl)
    wc = None
    try:
        wc = wcfs_client.join(env.zurl, autostart=True)     # wconn_of's joins reuse it
        env.wc = wc
        yield env
    finally:
        try:
            env.wtm.abort()
            env.db.close()                 # releases what is left
            drain_releases()
        finally:
            if wc is not None:
                wc.close()
            stop_autostarted(mnt)


def blk0(wconn, foid: bytes) -> bytes:
    f = wconn.open(foid)
    try:
        m = f.mmap(0, 1)
        try:
            return bytes(m.mem[:BS])
        finally:
            m.unmap()
    finally:
        f.close()


def test_follows_the_connection_view(zenv):
    tm = transaction.TransactionManager()
    zc = zenv.db.open(tm)
    t0 = zenv.head
    w = wconn_of(zc)
    assert w.at() == zconn_at(zc) == t0
    assert wconn_of(zc) is w
    assert blk0(w, zenv.foid) == content(0)

    # A commit through another connection: our view stays until our next transaction.
    t1 = zenv.write(1)
    assert t1 > t0
    tm.abort()                             # afterCompletion -> newTransaction, no sync
    tm.begin()
    assert zconn_at(zc) == t1 and w.at() == t1
    assert blk0(w, zenv.foid) == content(1)
    assert wconn_of(zc) is w

    # A commit through this very connection.
    zc.root()["x"] = 1
    tm.commit()
    t2 = zenv.head
    assert t2 > t1 and w.at() == t2

    # A view that did not move: nothing changes.
    tm.begin()
    assert w.at() == t2
    tm.abort()
    zc.close()


def test_explicit_transactions(zenv):
    tm = transaction.TransactionManager(explicit=True)
    zc = zenv.db.open(tm)
    with pytest.raises(ConnectionStateError, match="no transaction started"):
        zconn_at(zc)
    tm.begin()
    w = wconn_of(zc)
    assert w.at() == zenv.head
    tm.abort()
    t1 = zenv.write(2)
    assert w.at() < t1                     # explicit: no new view until begin
    tm.begin()
    assert w.at() == t1
    tm.abort()
    zc.close()


def test_pool_return_and_reopen(zenv):
    tm = transaction.TransactionManager()
    zc = zenv.db.open(tm)
    w = wconn_of(zc)
    t0 = w.at()
    zc.close()                             # back to the pool: the Conn stays, at the old view
    with pytest.raises(ConnectionStateError):
        wconn_of(zc)
    t1 = zenv.write(3)
    assert w.at() == t0 and not conn_closed(w, zenv.foid)

    zc2 = zenv.db.open(tm)
    assert zc2 is zc                       # the pool gave back the same connection
    assert wconn_of(zc2) is w
    assert w.at() == t1
    assert blk0(w, zenv.foid) == content(3)
    zc2.close()


def test_db_close_closes_the_conn(zenv):
    tm = transaction.TransactionManager()
    zc = zenv.db.open(tm)
    w = wconn_of(zc)
    zc2 = zenv.db.open(transaction.TransactionManager())
    w2 = wconn_of(zc2)
    assert w2 is not w
    assert zenv.wc._njoin == 3             # ours + one per synchroniser
    assert blk0(w, zenv.foid) == content(0)
    zc2.close()                            # in the pool: released by DB.close too

    zenv.wtm.abort()
    zenv.db.close()
    wait_until(lambda: conn_closed(w, zenv.foid) and conn_closed(w2, zenv.foid), 10,
               "the Conns to be closed")
    drain_releases()
    assert zenv.wc._njoin == 1
    assert not [s for s in zsync._registry if s.wconn in (w, w2)]
    assert "newTransaction" not in zc.__dict__ and "newTransaction" not in zc2.__dict__


def test_gc_of_the_connection_closes_the_conn(zenv):
    tm = transaction.TransactionManager()
    zc = zenv.db.open(tm)
    w = wconn_of(zc)
    ref = __import__("weakref").ref(zc)
    del zc                                 # still open: only weakly known to DB and tm
    gc.collect()
    assert ref() is None
    wait_until(lambda: conn_closed(w, zenv.foid), 10, "the Conn of a collected connection to close")
    drain_releases()
    assert zenv.wc._njoin == 1
    assert not [s for s in zsync._registry if s.wconn is w]


def test_historical_connection(zenv):
    t0 = zenv.head
    zenv.write(4)
    zc = zenv.db.open(transaction.TransactionManager(), before=p64(u64(t0) + 1))
    assert zconn_at(zc) == t0
    w = wconn_of(zc)
    assert w.at() == t0
    assert blk0(w, zenv.foid) == content(0)
    zc.close()


def test_concurrent_first_calls_share_one_conn(zenv):
    zc = zenv.db.open(transaction.TransactionManager())
    out: list = []
    barrier = threading.Barrier(4)

    def get() -> None:
        barrier.wait(10)
        out.append(wconn_of(zc))

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == 4 and all(w is out[0] for w in out)
    drain_releases()
    assert zenv.wc._njoin == 2             # the losers' joins were dropped
    zc.close()


def test_mapping_storage_is_refused():
    db = ZODB.DB(None)
    try:
        zc = db.open(transaction.TransactionManager())
        with pytest.raises(ValueError, match="MappingStorage"):
            wconn_of(zc)
        zc.close()
    finally:
        db.close()
    with pytest.raises(ValueError):
        zurl_of(MappingStorage())
    with pytest.raises(NotImplementedError):
        zurl_of(object())


def test_zurl_of_filestorage_and_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs = FileStorage("a.fs")
    fs2 = FileStorage(str(tmp_path / "b.fs"))
    try:
        assert zurl_of(fs) == f"file://{tmp_path}/a.fs"
        demo = DemoStorage(base=fs, changes=fs2)
        assert zurl_of(demo) == f"demo:(file://{tmp_path}/a.fs)/(file://{tmp_path}/b.fs)"
        with pytest.raises(ValueError):
            zurl_of(DemoStorage(base=fs))       # changes in a MappingStorage
    finally:
        fs.close()
        fs2.close()


def test_zurl_of_zeo(tmp_path, zeo_server):
    from ZEO.ClientStorage import ClientStorage

    tcp = zeo_server(str(tmp_path / "t.fs"))
    unix = zeo_server(str(tmp_path / "u.fs"), sock=str(tmp_path / "zeo.sock"))
    for addr, want in [(("127.0.0.1", tcp.port), f"zeo://127.0.0.1:{tcp.port}"),
                       (unix.sock, f"zeo://{tmp_path}/zeo.sock")]:
        cs = ClientStorage(addr, wait_timeout=20)
        try:
            assert zurl_of(cs) == want
        finally:
            cs.close()
    # Not connecting (wait=False): only the naming matters here.
    for kw, want in [(dict(addr=("::1", 8100), storage="main"), "zeo://[::1]:8100?storage=main"),
                     (dict(addr=("127.0.0.1", 8100), storage="a b"), "zeo://127.0.0.1:8100?storage=a%20b")]:
        cs = ClientStorage(wait=False, **kw)
        try:
            assert zurl_of(cs) == want
        finally:
            cs.close()
    cs = ClientStorage([("127.0.0.1", 8100), ("127.0.0.1", 8101)], wait=False)
    try:
        with pytest.raises(NotImplementedError, match="several servers"):
            zurl_of(cs)
    finally:
        cs.close()


def test_relstorage_view_and_zurl(pg_db):
    from zodburi import resolve_uri

    factory, dbkw = resolve_uri(pg_db)
    storage = factory()
    db = ZODB.DB(storage, **dbkw)
    try:
        with pytest.raises(ValueError, match="record_zurl"):
            zurl_of(db.storage)
        zsync.record_zurl(db.storage, pg_db)
        assert zurl_of(db.storage) == pg_db

        tm, wtm = transaction.TransactionManager(), transaction.TransactionManager()
        zc, wc = db.open(tm), db.open(wtm)
        t0 = zconn_at(zc)
        zc.root()._p_activate()
        assert t0 == zc.root()._p_serial   # the root's creation is the only transaction
        wc.root()["x"] = 1
        wtm.commit()
        t1 = wc.root()._p_serial           # the tid of that commit
        assert t1 > t0
        assert zconn_at(wc) == t1          # its own commit moved the writer's view
        assert zconn_at(zc) == t0          # ours stays until our next transaction
        tm.begin()
        assert zconn_at(zc) == t1
        assert zc.root()["x"] == 1
        tm.abort()
        zc.close()
        wtm.abort()
        wc.close()
        with pytest.raises(ConnectionStateError):
            zconn_at(zc)
    finally:
        db.close()


def test_relstorage_end_to_end(pg_db, monkeypatch):
    """wconn_of over RelStorage: a server autostarted for the recorded URI."""
    from zodburi import resolve_uri

    monkeypatch.setenv("WCFS_AUTOSTART", "yes")
    factory, dbkw = resolve_uri(pg_db)
    db = ZODB.DB(factory(), **dbkw)
    zsync.record_zurl(db.storage, pg_db)
    mnt = mgmt.mountpoint_for(pg_db)
    try:
        wtm = transaction.TransactionManager()
        wc = db.open(wtm)
        zf = ZBigFile(BS)
        wc.root()["zf"] = zf
        zf.storeblk(0, content(10))
        wtm.commit()

        tm = transaction.TransactionManager()
        zc = db.open(tm)
        w = wconn_of(zc)
        assert w.at() == zconn_at(zc) == zf._p_serial
        assert blk0(w, zf._p_oid) == content(10)
        zf.storeblk(0, content(11))
        wtm.commit()
        assert blk0(w, zf._p_oid) == content(10)
        tm.begin()
        assert w.at() == zconn_at(wc)      # the writer's view includes its commit
        assert blk0(w, zf._p_oid) == content(11)
        tm.abort()
        zc.close()
        wtm.abort()
        wc.close()
        db.close()
        wait_until(lambda: conn_closed(w, zf._p_oid), 10, "the Conn to close with the DB")
        drain_releases()
    finally:
        db.close()
        drain_releases()
        stop_autostarted(mnt)


def test_zeo_commit_in_another_process(tmp_path, zeo_server, spawn_writer, monkeypatch):
    """Our DB is a ZEO client; another process commits; our next transaction
    (begin syncs with the ZEO server) moves the Conn to that commit."""
    from ZEO.ClientStorage import ClientStorage

    monkeypatch.setenv("WCFS_AUTOSTART", "yes")
    zs = zeo_server(str(tmp_path / "z.fs"))
    db = ZODB.DB(ClientStorage(("127.0.0.1", zs.port), wait_timeout=20))
    zurl = zurl_of(db.storage)
    mnt = mgmt.mountpoint_for(zurl)
    writer = spawn_writer("zeo", zs.addr)
    try:
        tm = transaction.TransactionManager()
        zc = db.open(tm)
        w = wconn_of(zc)
        assert w.at() == zconn_at(zc) == db.storage.lastTransaction()
        t1 = bytes.fromhex(writer.cmd(op="new", key="k", size=8)["tid"])
        assert w.at() < t1
        tm.begin()
        assert w.at() == zconn_at(zc) == t1
        assert zc.root()["k"]["data"] == bytes([1]) * 8
        tm.abort()
        zc.close()
    finally:
        db.close()
        drain_releases()
        writer.close()
        stop_autostarted(mnt)
