"""ZBigArray persistence and shape arithmetic (views come with the WCFS backend)."""
from __future__ import annotations

import numpy as np
import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from zbigarray import ZBigArray, ZBigFile
from zutil import Ref, raw_record

BLKSIZE = 64 * 1024


@pytest.fixture
def db(tmp_path):
    db = ZODB.DB(FileStorage(str(tmp_path / "Data.fs")))
    yield db
    transaction.abort()
    db.close()


def file_bytes(zf: ZBigFile, nbytes: int) -> bytes:
    nblk = (nbytes + zf.blksize - 1) // zf.blksize
    return b"".join(zf.loadblk(b) for b in range(nblk))[:nbytes]


def test_persistence_across_connections(db):
    conn = db.open()
    A = ZBigArray((10, 3), np.float32, blksize=BLKSIZE)
    conn.root()["A"] = A
    transaction.commit()
    conn.close()

    conn2 = db.open()
    B = conn2.root()["A"]
    assert B.shape == (10, 3) and B.dtype == np.float32 and B.order == "C"
    assert B.strides == (12, 4)
    assert isinstance(B.zfile, ZBigFile) and B.zfile.blksize == BLKSIZE
    assert len(B) == 10 and B.ndim == 2 and B.size == 30 and B.nbytes == 120
    conn2.close()


def test_state_layout(db):
    conn = db.open()
    A = ZBigArray((4, 5), ">u2", order="F", blksize=BLKSIZE)
    conn.root()["A"] = A
    transaction.commit()
    klass, state = raw_record(db.storage, A._p_oid)
    assert klass == "zbigarray.ZBigArray"
    d, slots = state
    assert set(slots) == {"zfile"} and isinstance(slots["zfile"], Ref)
    assert d["_shape"] == (4, 5) and d["_order"] == "F" and d["_stridev"] == (2, 8)
    assert "_dtype" in d
    conn.close()


def test_f_order_strides():
    A = ZBigArray((4, 5, 6), np.int64, order="F")
    assert A.strides == (8, 32, 160)
    assert A.major_axis == 2
    C = ZBigArray((4, 5, 6), np.int64)
    assert C.strides == (240, 48, 8)
    assert C.major_axis == 0


def test_object_dtype_rejected():
    with pytest.raises(TypeError, match="object"):
        ZBigArray((3,), object)
    with pytest.raises(TypeError, match="object"):
        ZBigArray((3,), [("a", "i4"), ("b", "O")])
    with pytest.raises(ValueError):
        ZBigArray((3,), "i4", order="X")


def test_resize_is_shape_only(db):
    conn = db.open()
    A = ZBigArray((100, 4), np.uint8, blksize=BLKSIZE)
    conn.root()["A"] = A
    transaction.commit()
    A.resize((10**9, 4))                  # huge: O(1), nothing is written
    assert A.shape == (10**9, 4) and A.nbytes == 4 * 10**9
    assert len(A.zfile.blktab) == 0
    transaction.commit()
    with pytest.raises(ValueError, match="ndim"):
        A.resize((5,))
    conn.close()


def test_append_c_order(db):
    conn = db.open()
    A = ZBigArray((0, 3), np.int32, blksize=BLKSIZE)
    conn.root()["A"] = A
    rows = np.arange(3 * 30000, dtype=np.int32).reshape(-1, 3)   # spans several blocks
    A.append(rows[:10])
    A.append(rows[10])                     # a single row (ndim-1) is accepted
    A.append(rows[11:])
    transaction.commit()
    conn.close()

    conn2 = db.open()
    B = conn2.root()["A"]
    assert B.shape == rows.shape
    assert file_bytes(B.zfile, B.nbytes) == rows.tobytes()
    with pytest.raises(ValueError, match="do not fit"):
        B.append(np.zeros((2, 4), np.int32))
    assert B.shape == rows.shape
    conn2.close()


def test_append_f_order(db):
    conn = db.open()
    A = ZBigArray((2, 0), np.int16, order="F", blksize=BLKSIZE)
    conn.root()["A"] = A
    cols = np.arange(2 * 50000, dtype=np.int16).reshape(2, -1, order="F")
    A.append(cols[:, :7])
    A.append(cols[:, 7:])
    transaction.commit()
    assert A.shape == (2, 50000)
    assert file_bytes(A.zfile, A.nbytes) == cols.tobytes(order="F")
    conn.close()


def test_append_rolls_back_shape_on_failure(db, monkeypatch):
    conn = db.open()
    A = ZBigArray((5,), np.uint8, blksize=BLKSIZE)
    conn.root()["A"] = A
    monkeypatch.setenv("ZBIGARRAY_ZBLK_FMT", "bogus")
    with pytest.raises(RuntimeError):
        A.append(np.ones(10, np.uint8))
    assert A.shape == (5,)
    transaction.abort()
    conn.close()


def test_missing_order_defaults_to_c(db):
    """Objects written before `_order` existed load with order 'C'."""
    conn = db.open()
    A = ZBigArray((6,), np.uint8, blksize=BLKSIZE)
    del A.__dict__["_order"]
    del A.__dict__["_stridev"]
    conn.root()["A"] = A
    transaction.commit()
    conn.close()
    conn2 = db.open()
    B = conn2.root()["A"]
    B._p_invalidate()                      # drop the in-memory state, as another transaction would
    assert B.order == "C" and B.strides == (1,)
    conn2.close()
