"""ZBigFile block formats: round trips, holes, format choice, pickle layout."""
from __future__ import annotations


import numpy as np
import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from zbigarray import ZBigFile, ZBlk0, ZBlk1, ZBlkError, ZData
from zbigarray.file import CHUNKSIZE, as_bytes
from zutil import Ref, raw_record

BLKSIZE = 64 * 1024          # small blocks keep tests fast; formats do not depend on it


@pytest.fixture
def fmt(monkeypatch):
    def set_fmt(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("ZBIGARRAY_ZBLK_FMT", raising=False)
        else:
            monkeypatch.setenv("ZBIGARRAY_ZBLK_FMT", value)
    return set_fmt


@pytest.fixture
def db(tmp_path):
    stor = FileStorage(str(tmp_path / "Data.fs"))
    db = ZODB.DB(stor)
    yield db
    transaction.abort()
    db.close()


def new_file(db, blksize=BLKSIZE):
    conn = db.open()
    zf = ZBigFile(blksize)
    conn.root()["zf"] = zf
    transaction.commit()
    return conn, zf


def reload_file(db):
    """Open a fresh connection (new cache) and return its ZBigFile."""
    conn = db.open()
    return conn, conn.root()["zf"]


def done(conn):
    transaction.abort()
    conn.close()


def rnd(n, seed=0):
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("format", ["ZBlk0", "ZBlk1", "auto"])
def test_roundtrip(db, fmt, format):
    fmt(format)
    conn, zf = new_file(db)
    contents = {
        0: rnd(BLKSIZE, 1),                              # full block
        2: rnd(1000, 2),                                 # short block
        3: rnd(CHUNKSIZE * 3, 3) + bytes(CHUNKSIZE * 2), # trailing zeros
        5: bytes(5000) + rnd(7000, 4),                   # leading zeros, unaligned
        6: b"",                                          # all zeros, stored
    }
    for blk, data in contents.items():
        zf.storeblk(blk, data)
    transaction.commit()
    done(conn)

    conn2, zf2 = reload_file(db)
    assert zf2.blksize == BLKSIZE
    assert zf2.size == 7 * BLKSIZE
    for blk in range(8):
        got = zf2.loadblk(blk)
        assert len(got) == BLKSIZE
        assert got == contents.get(blk, b"").ljust(BLKSIZE, b"\0"), blk
    done(conn2)


def test_format_is_env_driven_and_switches(db, fmt):
    conn, zf = new_file(db)
    fmt("ZBlk0")
    zf.storeblk(0, rnd(100))
    assert type(zf.blktab[0]) is ZBlk0
    fmt("ZBlk1")
    zf.storeblk(0, rnd(200, 7))
    assert type(zf.blktab[0]) is ZBlk1                # replaced by a new object of the chosen type
    transaction.commit()
    fmt("ZBlk0")
    zf.storeblk(0, rnd(300, 8))
    transaction.commit()
    done(conn)
    conn2, zf2 = reload_file(db)
    assert type(zf2.blktab[0]) is ZBlk0
    assert zf2.loadblk(0) == rnd(300, 8).ljust(BLKSIZE, b"\0")
    done(conn2)


def test_unknown_format_is_an_error(db, fmt):
    conn, zf = new_file(db)
    fmt("ZBlk7")
    with pytest.raises(RuntimeError, match="ZBIGARRAY_ZBLK_FMT"):
        zf.storeblk(0, b"x")
    done(conn)


def test_default_format_is_auto(db, fmt):
    fmt(None)
    conn, zf = new_file(db)
    zf.storeblk(0, rnd(100))            # append-new-block, small, not filled -> ZBlk1
    assert type(zf.blktab[0]) is ZBlk1
    zf.storeblk(1, rnd(BLKSIZE))        # append-new-block, filled -> ZBlk0
    assert type(zf.blktab[1]) is ZBlk0
    done(conn)


def test_storeblk_rejects_oversized_and_negative(db):
    conn, zf = new_file(db)
    with pytest.raises(ValueError):
        zf.storeblk(0, bytes(BLKSIZE + 1))
    with pytest.raises(ValueError):
        zf.storeblk(-1, b"x")
    done(conn)


def test_loadblk_rejects_oversized_stored_data(db, fmt):
    fmt("ZBlk0")
    conn, zf = new_file(db)
    zf.storeblk(0, b"x")
    zf.blktab[0]._data = b"y" * (BLKSIZE + 1)         # corrupt as a foreign writer could
    with pytest.raises(ZBlkError, match="blksize"):
        zf.loadblk(0)
    done(conn)


def test_zblk1_chunk_layout(db, fmt):
    fmt("ZBlk1")
    conn, zf = new_file(db)
    data = bytearray(BLKSIZE)
    data[0:10] = b"a" * 10                        # chunk 0: 10 bytes after stripping
    data[CHUNKSIZE * 3 + 5] = 7                   # chunk 3: 6 bytes
    zf.storeblk(0, data)
    transaction.commit()
    zblk = zf.blktab[0]
    assert sorted(zblk.chunktab.keys()) == [0, CHUNKSIZE * 3]
    assert zblk.chunktab[0].data == b"a" * 10
    assert zblk.chunktab[CHUNKSIZE * 3].data == bytes(5) + b"\x07"

    # Changing one chunk re-stores that ZData *and* the ZBlk1 itself.
    serial_blk = zblk._p_serial
    serial_c0 = zblk.chunktab[0]._p_serial
    serial_c3 = zblk.chunktab[CHUNKSIZE * 3]._p_serial
    data[CHUNKSIZE * 3 + 5] = 8
    zf.storeblk(0, data)
    transaction.commit()
    assert zblk._p_serial != serial_blk
    assert zblk.chunktab[CHUNKSIZE * 3]._p_serial != serial_c3
    assert zblk.chunktab[0]._p_serial == serial_c0

    # Zeroing a chunk deletes it; shortening drops chunks past the end.
    data[0:10] = bytes(10)
    zf.storeblk(0, data)
    assert sorted(zblk.chunktab.keys()) == [CHUNKSIZE * 3]
    zf.storeblk(0, b"z")
    assert sorted(zblk.chunktab.keys()) == [0]
    transaction.commit()
    done(conn)
    conn2, zf2 = reload_file(db)
    assert zf2.loadblk(0) == b"z".ljust(BLKSIZE, b"\0")
    done(conn2)


def test_zblk1_unchanged_store_does_not_dirty(db, fmt):
    fmt("ZBlk1")
    conn, zf = new_file(db)
    zf.storeblk(0, rnd(10000))
    transaction.commit()
    zblk = zf.blktab[0]
    zf.storeblk(0, rnd(10000))
    assert not zblk._p_changed
    done(conn)


def test_zblk1_foreign_chunk_size(db, fmt):
    """A reader must not assume the chunk size; a writer rewrites a foreign chunktab."""
    fmt("ZBlk1")
    conn, zf = new_file(db)
    zblk = ZBlk1()
    zblk.chunktab[0] = ZData(b"a" * 6000)        # 6000-byte chunks, as another writer might do
    zblk.chunktab[6000] = ZData(b"b" * 10)
    zblk.chunktab[9000] = ZData(b"c" * 3)
    zf.blktab[0] = zblk
    transaction.commit()
    expect = (b"a" * 6000 + b"b" * 10).ljust(9000, b"\0") + b"ccc"
    assert zf.loadblk(0) == expect.ljust(BLKSIZE, b"\0")
    zf.storeblk(0, expect)
    assert all(off % CHUNKSIZE == 0 and len(zd.data) <= CHUNKSIZE for off, zd in zblk.chunktab.items())
    assert zf.loadblk(0) == expect.ljust(BLKSIZE, b"\0")
    # Overlapping chunks are a data error.
    zblk.chunktab.clear()
    zblk.chunktab[0] = ZData(b"a" * 100)
    zblk.chunktab[50] = ZData(b"b")
    with pytest.raises(ZBlkError, match="overlap"):
        zf.loadblk(0)
    done(conn)


def test_auto_heuristic(db, fmt):
    fmt("auto")
    conn, zf = new_file(db)
    # Appending a small new block: ZBlk1 (small, not filled).
    zf.storeblk(0, rnd(100))
    assert type(zf.blktab[0]) is ZBlk1
    transaction.commit()
    # Appending to the last block (new starts with old), small delta: stays ZBlk1.
    zf.storeblk(0, rnd(100) + rnd(100, 5))
    assert type(zf.blktab[0]) is ZBlk1
    # ... until it gets filled: ZBlk0.
    zf.storeblk(0, rnd(100) + rnd(BLKSIZE - 100, 5))
    assert type(zf.blktab[0]) is ZBlk0
    transaction.commit()
    # Non-append, small change of a full block: ZBlk1.
    data = bytearray(rnd(100) + rnd(BLKSIZE - 100, 5))
    data[10] ^= 0xFF
    zf.storeblk(0, data)
    assert type(zf.blktab[0]) is ZBlk1
    # Non-append, large change: ZBlk0.
    zf.storeblk(0, rnd(BLKSIZE, 9))
    assert type(zf.blktab[0]) is ZBlk0
    transaction.commit()

    # Appending a new block after a ZBlk1 block changed in this same transaction
    # converts that previous block to ZBlk0 (it will not receive small appends any more).
    zf.storeblk(1, rnd(100, 11))
    assert type(zf.blktab[1]) is ZBlk1
    zf.storeblk(2, rnd(100, 12))
    assert type(zf.blktab[1]) is ZBlk0
    assert type(zf.blktab[2]) is ZBlk1
    transaction.commit()
    # ... but not if the previous block was not changed in this transaction.
    zf.storeblk(3, rnd(100, 13))
    assert type(zf.blktab[2]) is ZBlk1
    # Non-append with more than half the block changed: ZBlk0.
    zf.storeblk(1, rnd(BLKSIZE // 2 + 1, 14))
    assert type(zf.blktab[1]) is ZBlk0
    transaction.commit()
    for blk, seed, n in [(2, 12, 100), (3, 13, 100), (1, 14, BLKSIZE // 2 + 1)]:
        assert zf.loadblk(blk) == rnd(n, seed).ljust(BLKSIZE, b"\0")
    done(conn)


def test_pickle_formats(db, fmt):
    """Records have exactly the state layouts of WCFS.md §7."""
    conn, zf = new_file(db)
    fmt("ZBlk0")
    zf.storeblk(0, b"hello" + bytes(100))
    fmt("ZBlk1")
    zf.storeblk(1, b"x" * (CHUNKSIZE + 1))
    transaction.commit()
    stor = db.storage

    klass, state = raw_record(stor, zf._p_oid)
    assert klass == "zbigarray.ZBigFile"
    assert isinstance(state, tuple) and len(state) == 2
    assert state[0] == BLKSIZE
    assert isinstance(state[1], Ref) and state[1][0] == zf.blktab._p_oid

    klass, state = raw_record(stor, zf.blktab._p_oid)
    assert klass == "BTrees.LOBTree.LOBTree"

    zblk0, zblk1 = zf.blktab[0], zf.blktab[1]
    klass, state = raw_record(stor, zblk0._p_oid)
    assert (klass, state) == ("zbigarray.ZBlk0", b"hello")

    klass, state = raw_record(stor, zblk1._p_oid)
    assert klass == "zbigarray.ZBlk1"
    assert isinstance(state, Ref) and state[0] == zblk1.chunktab._p_oid
    klass, _ = raw_record(stor, zblk1.chunktab._p_oid)
    assert klass == "BTrees.IOBTree.IOBTree"
    klass, state = raw_record(stor, zblk1.chunktab[CHUNKSIZE]._p_oid)
    assert (klass, state) == ("zbigarray.ZData", b"x")
    done(conn)


def test_as_bytes_py2_str():
    raw = bytes(range(256))
    assert as_bytes(raw.decode("latin-1")) == raw
    assert as_bytes(b"abc") == b"abc"
    with pytest.raises(ZBlkError):
        as_bytes(12)


def test_zbigfile_invalid_blksize():
    with pytest.raises(ValueError):
        ZBigFile(0)
    zf = ZBigFile(10)
    with pytest.raises(ZBlkError):
        zf.__setstate__((0, None))
