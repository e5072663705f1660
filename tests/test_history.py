"""Head-file history: tracked blocks, per-commit deltas incl. BTree splits, BlkRevAt."""
from __future__ import annotations

import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.utils import u64

from wcfs.history import History
from wcfs.zobj import ZReader
from zbigarray import ZBigFile

BLKSIZE = 4096


class Env:
    """A writer connection plus a raw reader/history over the same storage."""

    def __init__(self, path: str) -> None:
        self.stor = FileStorage(path)
        self.db = ZODB.DB(self.stor)
        self.conn = self.db.open()
        self.zf = ZBigFile(BLKSIZE)
        self.conn.root()["zf"] = self.zf
        self.commit()
        self.reader = ZReader(self.stor.loadBefore)
        self.head = self.last
        self.hist = History(self.reader, self.head)
        self.foid = self.zf._p_oid
        (blksize, root), _ = self.reader.zbigfile(self.foid, self.head)
        self.root = root
        self.hist.add_file(self.foid, blksize, root)

    @property
    def last(self) -> int:
        return u64(self.stor.lastTransaction())

    def commit(self) -> int:
        transaction.commit()
        return u64(self.stor.lastTransaction())

    def read(self, blk: int) -> None:
        """What the server's read path does for a head block."""
        lk = self.reader.lookup(self.root, blk, self.head)
        zser = None
        if lk.zblk is not None:
            _, zser = self.reader.load_block(lk.zblk, self.head, BLKSIZE)
        self.hist.track(self.foid, blk, lk, zser)

    def advance(self) -> dict:
        """Apply every commit after head, as the commit processor does."""
        deltas = {}
        for txn in self.stor.iterator(start=ZODB.utils.p64(self.head + 1)):
            tid = u64(txn.tid)
            oids = [r.oid for r in txn]
            self.reader.nodes.invalidate(oids, tid)
            for foid, d in self.hist.update(tid, oids).items():
                acc = deltas.setdefault(foid, set())
                acc |= d.blocks
            self.head = tid
        return deltas.get(self.foid, set())

    def close(self):
        transaction.abort()
        self.db.close()


@pytest.fixture
def env(tmp_path):
    e = Env(str(tmp_path / "Data.fs"))
    yield e
    e.close()


def data(i: int) -> bytes:
    return bytes([i % 251 + 1]) * 100


def test_zblk_change_and_untracked_blocks(env):
    for k in range(5):
        env.zf.storeblk(k, data(k))
    t1 = env.commit()
    assert env.advance() == set()
    env.read(1)
    env.read(3)
    env.zf.storeblk(1, data(50))
    env.zf.storeblk(2, data(51))            # not tracked: not reported
    t2 = env.commit()
    assert env.advance() == {1}
    assert env.hist.blk_rev_at(env.foid, 1, t2) == (t2, True)
    assert env.hist.blk_rev_at(env.foid, 1, t1) == (t1, True)
    assert env.hist.blk_rev_at(env.foid, 3, t2) == (t1, True)   # neighbour change at t2 skipped
    assert env.hist.changed_since(env.foid, t1) == [1]
    assert env.hist.changed_since(env.foid, t2) == []


def test_hole_becomes_data_and_splits(env):
    env.zf.storeblk(0, data(0))
    env.zf.storeblk(200, data(1))
    t1 = env.commit()
    env.advance()
    for k in (0, 5, 100, 200):
        env.read(k)                          # 5 and 100 are holes
    # Many new keys: buckets split, the tree grows a level; block 100 becomes data.
    for k in range(1, 200):
        env.zf.storeblk(k, data(k))
    t2 = env.commit()
    assert env.advance() == {5, 100}
    assert env.hist.blk_rev_at(env.foid, 100, t1)[0] <= t1
    assert env.hist.blk_rev_at(env.foid, 100, t2) == (t2, True)
    # After the split the tracked keys live in new buckets: later changes still found.
    env.zf.storeblk(150, data(7))            # untracked
    env.zf.storeblk(200, data(8))
    t3 = env.commit()
    assert env.advance() == {200}
    env.zf.storeblk(5, data(9))
    env.commit()
    assert env.advance() == {5}
    # Deleting keys (bucket merges / removals).
    for k in range(1, 150):
        del env.zf.blktab[k]
    env.commit()
    assert env.advance() == {5, 100}
    assert sorted(env.hist.changed_since(env.foid, t3)) == [5, 100]
    assert sorted(env.hist.changed_since(env.foid, t1)) == [5, 100, 200]


def test_track_after_change_is_found_by_changed_since(env):
    """A block changed before it was first read still counts as changed since an older at."""
    env.zf.storeblk(0, data(0))
    t1 = env.commit()
    env.advance()
    env.zf.storeblk(0, data(1))
    t2 = env.commit()
    env.advance()                            # untracked: nothing reported
    env.read(0)                              # tracked now, at head t2
    assert env.hist.changed_since(env.foid, t1) == [0]
    assert env.hist.blk_rev_at(env.foid, 0, t1) == (t1, True)
    assert env.hist.changed_since(env.foid, t2) == []


def test_forget_past(env):
    env.zf.storeblk(0, data(0))
    env.commit()
    env.advance()
    env.read(0)
    env.zf.storeblk(0, data(1))
    t2 = env.commit()
    env.advance()
    env.hist.forget_past(t2)
    assert env.hist.tail == t2
    assert env.hist.changed_since(env.foid, t2) == []
    assert env.hist.blk_rev_at(env.foid, 0, t2) == (t2, False)   # at the tail: upper bound


def test_node_cache_forgets_superseded_revisions(env):
    """Entries no longer current at the tail are dropped; loads stay correct at any state."""
    for k in range(3):
        env.zf.storeblk(k, data(k))
    t1 = env.commit()
    env.advance()
    env.read(0)
    nodes = env.reader.nodes
    root_t1 = env.reader.lookup(env.root, 0, t1).path[0]
    env.zf.storeblk(5, data(5))                  # changes the (inline) root bucket
    t2 = env.commit()
    env.advance()
    env.read(5)
    n_before = len(nodes)
    nodes.forget_before(t2)
    assert len(nodes) < n_before                 # the t1 revision of the root is gone
    assert env.reader.lookup(env.root, 0, t1).path[0] == root_t1      # reloaded on demand
    assert env.reader.lookup(env.root, 5, t2).zblk is not None
