"""ZBigArray views over WCFS (WCFS.md §5.2, §7.6): ``A[idx]`` as read-only ndarrays.

The test's own ``ZODB.DB`` over a FileStorage; the WCFS server is a real
process autostarted by ``wcfs_client.join`` and stopped at teardown.  Arrays
are written through one connection (``append`` / ``storeblk``) and viewed
through another, and every view is compared against a numpy reference.
"""
from __future__ import annotations

import gc
import threading

import numpy as np
import psutil
import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

import wcfs_client
from wcfs import mgmt
from wcfs_client import zsync
from wcfs_client.zsync import zurl_of
from wcfs_env import stop_autostarted
from zbigarray import ZBigArray
from zbigarray.view import NotAttachedError

BS = 16 * 1024          # small blocks: arrays span many of them


def drain_releases(timeout: float = 10) -> None:
    """Wait until zsync's release thread has run every job queued so far."""
    zsync._ensure_worker()
    done = threading.Event()
    zsync._jobs.put(done.set)
    assert done.wait(timeout), "zsync releases still pending"


class ZEnv:
    """A database, a writer connection and a reader connection (own transaction managers)."""

    def __init__(self, path: str) -> None:
        self.db = ZODB.DB(FileStorage(path))
        self.zurl = zurl_of(self.db.storage)
        self.wtm = transaction.TransactionManager()
        self.w = self.db.open(self.wtm)
        self.rtm = transaction.TransactionManager()
        self.r = None

    def reader(self):
        """(Re)open the reader connection at the current head."""
        if self.r is None:
            self.r = self.db.open(self.rtm)
        self.rtm.begin()
        return self.r.root()


@pytest.fixture
def zenv(tmp_path):
    env = ZEnv(str(tmp_path / "Data.fs"))
    mnt = mgmt.mountpoint_for(env.zurl)
    wc = None
    try:
        wc = wcfs_client.join(env.zurl, autostart=True)
        yield env
    finally:
        try:
            env.wtm.abort()
            env.rtm.abort()
            env.db.close()
            drain_releases()
        finally:
            if wc is not None:
                wc.close()
            stop_autostarted(mnt)


def reference(shape, dtype, order, seed):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    if dtype.kind == "f":
        flat = rng.standard_normal(n).astype(dtype)
    elif dtype.kind == "c":
        flat = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dtype)
    else:
        flat = rng.integers(1, 100, n).astype(dtype)
    return np.asarray(flat.reshape(shape), order=order)


SLICES_1D = [np.s_[:], np.s_[3:50], np.s_[::-1], np.s_[-5:], np.s_[::7], np.s_[40:3:-3],
             np.s_[5:5], np.s_[10:2], np.s_[::-13], np.s_[-1], np.s_[0], np.s_[17],
             np.s_[...], np.s_[None, 2:9], np.s_[1000:]]


def indices_for(ndim: int, rng) -> list:
    out = [np.s_[...], np.s_[()], np.s_[::-1], np.s_[0], np.s_[-1], np.s_[1:1], np.s_[..., 2],
           np.s_[..., ::-2], np.s_[None], np.s_[2, ...]]
    if ndim >= 2:
        out += [np.s_[3, 4], np.s_[-2, ::-3], np.s_[1:9:2, ::-1], np.s_[:, 5], np.s_[::-1, ::-1],
                np.s_[4:2, :], np.s_[:, None, 3:7], np.s_[-1, -1]]
    if ndim >= 3:
        out += [np.s_[1, 2, 3], np.s_[::-2, 1, ::3], np.s_[:, :, -1], np.s_[1:4, ::-1, 2:9:2],
                np.s_[..., 0, :]]
    # random slices with random (incl. negative) steps on every axis
    for _ in range(40):
        idx = []
        for _ax in range(ndim):
            a, b = sorted(int(x) for x in rng.integers(-12, 40, 2))
            step = int(rng.choice([1, 2, 3, -1, -2, -5]))
            idx.append(slice(b, a, step) if step < 0 else slice(a, b, step))
        out.append(tuple(idx))
    return out


def check_view(A, ref, idx) -> None:
    got = A[idx]
    want = ref[idx]
    if isinstance(want, np.ndarray):
        assert type(got) is np.ndarray, idx
        assert got.shape == want.shape and got.dtype == want.dtype, idx
        assert not got.flags.writeable, idx
        np.testing.assert_array_equal(got, want, err_msg=str(idx))
    else:
        assert got == want and type(got) is type(want), idx


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["uint8", "int32", "float64", "complex128", ">u2"])
def test_views_match_numpy(zenv, order, dtype):
    rng = np.random.default_rng(0)
    shapes = {"a1": (3001,), "a2": (37, 53), "a3": (9, 17, 23)}
    refs = {}
    root = zenv.w.root()
    for name, shape in shapes.items():
        ref = reference(shape, dtype, order, seed=len(shape))
        A = ZBigArray(shape[:-1] + (0,) if order == "F" else (0,) + shape[1:], dtype, order, blksize=BS)
        # Several appends along the major axis, straddling block boundaries.
        ax = A.major_axis
        cuts = sorted(set([0, shape[ax]] + [int(x) for x in rng.integers(0, shape[ax], 3)]))
        for lo, hi in zip(cuts, cuts[1:]):
            A.append(np.take(ref, np.arange(lo, hi), axis=ax))
        assert A.shape == shape
        root[name] = A
        refs[name] = ref
    zenv.wtm.commit()

    rroot = zenv.reader()
    for name, ref in refs.items():
        A = rroot[name]
        for idx in indices_for(ref.ndim, rng) + (SLICES_1D if ref.ndim == 1 else []):
            check_view(A, ref, idx)
        # views of views are numpy's business, but must see the same memory
        v = A[::-1]
        np.testing.assert_array_equal(v[1::3], ref[::-1][1::3])
        # advanced indexing goes through the full view (numpy copies the selection)
        sel = rng.integers(0, ref.shape[0], 20)
        np.testing.assert_array_equal(A[sel], ref[sel])
        mask = ref > ref.flat[len(ref.flat) // 2] if ref.dtype.kind != "c" else ref.real > 0
        np.testing.assert_array_equal(A[mask], ref[mask])
        np.testing.assert_array_equal(A[[0, -1]], ref[[0, -1]])


def test_storeblk_written_data(zenv):
    # Bytes written block by block through the ZBigFile show up in the array view.
    root = zenv.w.root()
    A = ZBigArray((0, 64), "<i4", "C", blksize=BS)
    A.resize((200, 64))         # 200*64*4 = 51200 bytes: blocks 0..3 (the last one partial)
    ref = np.arange(200 * 64, dtype="<i4").reshape(200, 64)
    raw = ref.tobytes()
    for blk in range(0, (len(raw) + BS - 1) // BS):
        if blk == 1:
            continue            # a hole: zeros
        A.zfile.storeblk(blk, raw[blk * BS:(blk + 1) * BS])
    ref.reshape(-1)[BS // 4:2 * BS // 4] = 0
    root["A"] = A
    zenv.wtm.commit()

    B = zenv.reader()["A"]
    np.testing.assert_array_equal(B[...], ref)
    np.testing.assert_array_equal(B[60:70:3, ::-5], ref[60:70:3, ::-5])


def test_view_memory_is_shared(zenv):
    root = zenv.w.root()
    ref = reference((100, 100), "float64", "C", 1)      # 80000 bytes: 5 blocks
    A = ZBigArray((0, 100), "float64", blksize=BS)
    A.append(ref)
    root["A"] = A
    zenv.wtm.commit()

    B = zenv.reader()["A"]
    whole = B[:]
    part = B[30:40, ::-2]
    assert np.shares_memory(whole, part)
    assert part.ctypes.data == whole[30, 99:].ctypes.data     # the same address, not a copy
    np.testing.assert_array_equal(part, ref[30:40, ::-2])
    # Views of the same block (no covering mapping alive) see the same data.
    del whole, part
    gc.collect()
    x, y = B[3, :10], B[3, ::-1][-10:][::-1]
    np.testing.assert_array_equal(x, y)
    assert np.shares_memory(x, y)
    # With no covering mapping alive, exactly the blocks of the addressed bytes are mapped:
    # rows 30..39 are bytes [24000, 32000) -> block 1 only; a reversed column spans them all.
    del x, y
    gc.collect()
    r = B[30:40].base.region
    assert (r.blk_start, r.blk_stop) == (1, 2)
    r = B[::-1, 7].base.region
    assert (r.blk_start, r.blk_stop) == (0, 5)
    del r
    # A view keeps its mapping alive by itself (the array object is gone here).
    v = B[50:60]
    del B
    gc.collect()
    np.testing.assert_array_equal(v, ref[50:60])


def test_beyond_file_size_reads_zeros(zenv):
    root = zenv.w.root()
    A = ZBigArray((0,), "uint16", blksize=BS)
    A.append(np.arange(1, 5001, dtype="uint16"))
    root["A"] = A
    zenv.wtm.commit()
    A.resize((100000,))                 # O(1): no block written
    zenv.wtm.commit()

    B = zenv.reader()["A"]
    assert B.shape == (100000,)
    v = B[4990:5020]
    np.testing.assert_array_equal(v[:10], np.arange(4991, 5001, dtype="uint16"))
    assert not v[10:].any()
    assert not B[-3000:].any() and B[-1] == 0

    # Bigger than RAM: only address space is taken, nothing is copied.
    big = 2 * psutil.virtual_memory().total
    A.resize((big // 2,))
    zenv.wtm.commit()
    B = zenv.reader()["A"]
    v = B[:]
    assert v.nbytes >= big
    np.testing.assert_array_equal(v[:5000], np.arange(1, 5001, dtype="uint16"))
    assert v[-1] == 0 and not v[-100000::997].any()
    assert not B[len(B) // 2:len(B) // 2 + 10000].any()


def test_isolation_follows_the_connection(zenv):
    root = zenv.w.root()
    A = ZBigArray((0,), "int64", blksize=BS)
    A.append(np.arange(10000))
    root["A"] = A
    zenv.wtm.commit()

    B = zenv.reader()["A"]
    old = B[:]
    np.testing.assert_array_equal(old, np.arange(10000))

    # Another connection commits: our views (old and new) keep the old data ...
    A.zfile.storeblk(0, np.full(BS // 8, -1, "int64").tobytes())
    A.append(np.arange(100))
    zenv.wtm.commit()
    np.testing.assert_array_equal(old, np.arange(10000))
    np.testing.assert_array_equal(B[:], np.arange(10000))
    assert B.shape == (10000,)

    # ... until we start a new transaction: then the Conn moves, and with it every mapping.
    zenv.rtm.begin()
    new_ref = np.concatenate([np.full(BS // 8, -1), np.arange(BS // 8, 10000), np.arange(100)])
    assert B.shape == (10100,)
    np.testing.assert_array_equal(B[:], new_ref)
    np.testing.assert_array_equal(old, new_ref[:10000])


def test_views_are_read_only(zenv):
    root = zenv.w.root()
    A = ZBigArray((0, 8), "int32", blksize=BS)
    A.append(np.ones((1000, 8), "int32"))
    root["A"] = A
    zenv.wtm.commit()

    B = zenv.reader()["A"]
    v = B[10:20]
    assert not v.flags.writeable
    with pytest.raises(ValueError, match="assignment destination is read-only"):
        v[0, 0] = 5
    with pytest.raises(ValueError, match="assignment destination is read-only"):
        v[::-1][1] = 5
    with pytest.raises(ValueError, match="assignment destination is read-only"):
        B[3] = 7
    with pytest.raises(ValueError, match="assignment destination is read-only"):
        B[[1, 2]] = 7
    with pytest.raises(ValueError):
        v.flags.writeable = True
    assert (B[:] == 1).all()
    assert B[5:5].size == 0 and not B[5:5].flags.writeable


def test_unattached_array_raises(zenv):
    A = ZBigArray((10,), "int32", blksize=BS)
    with pytest.raises(NotAttachedError, match="not attached to a ZODB connection"):
        A[0:3]
    with pytest.raises(NotAttachedError):
        A[[1, 2]]
    # Added to a connection but not committed yet: the server has nothing to show.
    zenv.w.root()["A"] = A
    zenv.w.add(A)
    zenv.w.add(A.zfile)
    with pytest.raises(NotAttachedError, match="not committed yet"):
        A[:]
    zenv.wtm.commit()
    assert not A[:].any()


def test_file_handle_lifetime(zenv):
    root = zenv.w.root()
    A = ZBigArray((0,), "uint8", blksize=BS)
    A.append(np.arange(3 * BS, dtype=np.uint64).astype("uint8"))
    root["A"] = A
    zenv.wtm.commit()

    B = zenv.reader()["A"]
    v = B[BS:]
    h = B.zfile._v_wcfs_view
    assert B[:1].base is not None and B.zfile._v_wcfs_view is h      # once per instance
    fh = h.fh
    # The ZBigFile drops its handle (as on invalidation): arrays keep it open.
    del B.zfile._v_wcfs_view, h
    gc.collect()
    drain_releases()
    np.testing.assert_array_equal(v[:5], np.arange(BS, BS + 5, dtype=np.uint64).astype("uint8"))
    # The next view opens a new handle; the old FileH closes once its arrays are gone.
    assert B[0] == 0 and B.zfile._v_wcfs_view.fh is not fh
    del v
    gc.collect()
    drain_releases()
    m = fh.mmap(0, 1)        # the C++ FileH is shared per foid: still open through the new handle
    m.unmap()
    del B.zfile._v_wcfs_view
    gc.collect()
    drain_releases()
    with pytest.raises(RuntimeError, match="file already closed"):
        fh.mmap(0, 1)


def test_zero_dim_array(zenv):
    root = zenv.w.root()
    A = ZBigArray((), "float32", blksize=BS)
    root["A"] = A
    zenv.wtm.commit()
    A.zfile.storeblk(0, np.float32(2.5).tobytes())
    zenv.wtm.commit()

    B = zenv.reader()["A"]
    assert B[()] == np.float32(2.5) and type(B[()]) is np.float32
    v = B[...]
    assert type(v) is np.ndarray and v.shape == () and v == 2.5
    assert B[None].shape == (1,)
    with pytest.raises(IndexError):
        B[0]
