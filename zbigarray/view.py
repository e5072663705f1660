"""Read-only numpy views of ZBigArrays, served by WCFS (WCFS.md §5.2).

``A[idx]`` returns a real ``numpy.ndarray`` whose memory is a WCFS mapping of
the ZBigFile's blocks: nothing is copied and nothing is read until the memory
is touched, so a view may be much larger than RAM (it only takes address
space).  The data is that of the database as of the WCFS ``Conn`` of the
array's ZODB connection (``wcfs_client.zsync.wconn_of``): isolated from
commits of other connections until this connection starts a new transaction,
when the Conn -- and with it every mapping already handed out -- moves to the
new view.  Blocks beyond the file's size read as zeros.

Views are read-only for now: their memory is mapped PROT_READ and the arrays
are flagged non-writeable, so an assignment fails with numpy's
"assignment destination is read-only" (never with a crash).

Handles.  Each ZBigFile instance attached to a ZODB connection gets, on first
use, one `_ViewHandle` in its volatile attribute ``_v_wcfs_view``: the Conn
and one ``FileH`` (one ``Conn.open`` of the file's oid).  The handle lives as
long as the ZBigFile instance keeps it *or* any array made through it is
alive: every array's ``base`` chain ends in a small `_Keeper` that holds the
mapping region, which holds the handle.  Only when all of them are gone is
the ``FileH`` closed -- closing it earlier would turn the memory of arrays
still in use into SIGSEGV (WCFS.md §4.4).  The close talks to the server, so
it is never done in the finalizer itself (finalizers run wherever garbage
collection happens, possibly under locks the close would need): the
finalizer only queues it on the release thread of ``wcfs_client.zsync``,
which also closes Conns, in order.  If the Conn was closed meanwhile (the
connection was garbage collected or its database closed), the close is a
no-op; arrays of such a Conn fault on access, as every mapping of a closed
Conn does.  A ZODB invalidation of the ZBigFile drops ``_v_wcfs_view``; the
next view opens a new handle, the old one lives on with its arrays.

Mappings.  A view maps exactly the blocks covering the bytes it addresses
(computed from the shape, strides and order of the array and the index),
unless a live mapping of the same handle already covers them: then it is
reused, so overlapping views share memory (``np.shares_memory`` holds) and
repeated indexing does not pile up mappings.  A mapping is unmapped when the
last array using it is released.

Indexing.  Basic indexing (integers, slices with any step, ``Ellipsis``,
``None``) is computed here and never touches data; an all-integer index
returns a numpy scalar like numpy does.  Any other index (integer or boolean
arrays, lists) is applied by numpy to the view of the whole array, which
copies just the selected elements (numpy semantics: advanced indexing
copies).

Concurrency: like the ZODB objects they serve, ZBigArrays and their handles
are used by one thread at a time (the connection's); no locks here.  Arrays
themselves may be read from any thread -- the WCFS client core keeps their
memory coherent without the GIL.
"""
from __future__ import annotations

import logging
import numbers
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from ZODB.utils import z64

if TYPE_CHECKING:
    from .array import ZBigArray
    from .file import ZBigFile

log = logging.getLogger("zbigarray")

_ATTR = "_v_wcfs_view"          # ZBigFile attribute holding its _ViewHandle


class NotAttachedError(ValueError):
    """A view was asked of an array not (yet) stored in the database."""


class _Region:
    """One WCFS mapping of blocks [blk_start, blk_stop), with its handle."""

    __slots__ = ("handle", "mapping", "mem", "blk_start", "blk_stop", "__weakref__")

    def __init__(self, handle: "_ViewHandle", mapping: Any) -> None:
        self.handle = handle            # keeps the FileH open while arrays use the memory
        self.mapping = mapping
        self.mem = mapping.mem          # read-only memoryview; its export keeps the mapping mapped
        self.blk_start = mapping.blk_start
        self.blk_stop = mapping.blk_stop


class _Keeper:
    """End of an array's ``base`` chain: exposes the memory, holds the region."""

    __slots__ = ("__array_interface__", "region")

    def __init__(self, raw: np.ndarray, region: _Region) -> None:
        self.__array_interface__ = raw.__array_interface__
        self.region = region


def _defer_close(fh: Any) -> None:
    """Finalizer of a handle: queue ``fh.close()`` on zsync's release thread."""
    try:
        from wcfs_client import zsync
        zsync.defer(lambda: _close_fileh(fh))
    except Exception:       # interpreter shutdown: the Conns are being closed anyway
        pass


def _close_fileh(fh: Any) -> None:
    try:
        fh.close()
    except Exception as e:          # e.g. "connection closed": nothing left to release
        log.debug("zbigarray: closing the WCFS file handle %r: %s", fh, e)


class _ViewHandle:
    """The WCFS Conn and FileH of one ZBigFile instance, and its live mappings."""

    __slots__ = ("wconn", "fh", "blksize", "_regions", "_finalizer", "__weakref__")

    def __init__(self, wconn: Any, fh: Any) -> None:
        self.wconn = wconn
        self.fh = fh
        self.blksize: int = fh.blksize
        self._regions: list[weakref.ref[_Region]] = []
        self._finalizer = weakref.finalize(self, _defer_close, fh)
        self._finalizer.atexit = False      # at exit wcfs_client closes the Conns

    def region(self, blk_start: int, blk_stop: int) -> _Region:
        """A live mapping covering blocks [blk_start, blk_stop), reused if possible."""
        live = []
        found = None
        for ref in self._regions:
            r = ref()
            if r is None:
                continue
            live.append(ref)
            if found is None and r.blk_start <= blk_start and blk_stop <= r.blk_stop:
                found = r
        self._regions = live
        if found is not None:
            return found
        r = _Region(self, self.fh.mmap(blk_start, blk_stop - blk_start))
        self._regions.append(weakref.ref(r))
        return r


def _handle_of(zfile: "ZBigFile", what: Any) -> _ViewHandle:
    """The view handle of `zfile`, opened on first use (once per instance and Conn)."""
    from wcfs_client.zsync import wconn_of

    jar = zfile._p_jar
    if jar is None or zfile._p_oid is None:
        raise NotAttachedError(f"{what!r}: not attached to a ZODB connection: views are served "
                               f"by WCFS from the database (store the array and commit first)")
    zfile._p_activate()          # a ghost does not know its serial yet
    if zfile._p_serial == z64:
        raise NotAttachedError(f"{what!r}: its ZBigFile (oid {zfile._p_oid.hex()}) is not "
                               f"committed yet: views show committed data only (commit first)")
    wconn = wconn_of(jar)        # ConnectionStateError if the connection is closed
    h = zfile.__dict__.get(_ATTR)
    if h is not None and h.wconn is wconn:
        return h
    # First use, or zsync replaced a failed Conn: open anew.  An older handle
    # stays alive as long as arrays made through it do.
    try:
        fh = wconn.open(zfile._p_oid)
    except Exception as e:
        raise RuntimeError(f"{what!r}: cannot open ZBigFile oid {zfile._p_oid.hex()} in WCFS "
                           f"@{wconn.at().hex()}: {e}") from e
    if fh.blksize != zfile.blksize:
        _close_fileh(fh)
        raise RuntimeError(f"{what!r}: WCFS serves ZBigFile oid {zfile._p_oid.hex()} with "
                           f"blksize {fh.blksize}, the object says {zfile.blksize}")
    h = _ViewHandle(wconn, fh)
    setattr(zfile, _ATTR, h)
    # The finalizer will need zsync's release thread; start it here, never there.
    from wcfs_client import zsync
    zsync.ensure_release_thread()
    return h


def _is_basic(idx: tuple) -> bool:
    for i in idx:
        if i is None or i is Ellipsis or isinstance(i, slice):
            continue
        if isinstance(i, (bool, np.bool_)):
            return False
        if isinstance(i, (numbers.Integral, np.integer)):
            continue
        if isinstance(i, np.ndarray) and i.ndim == 0 and np.issubdtype(i.dtype, np.integer):
            continue
        return False
    return True


def _basic_layout(shape: tuple[int, ...], strides: tuple[int, ...], idx: tuple,
                  what: Any) -> tuple[int, list[int], list[int], bool]:
    """Apply a basic index to (shape, strides) -> (byte offset, shape, strides, all-int).

    Same rules (and IndexError messages in spirit) as numpy's basic indexing.
    """
    nell = sum(1 for i in idx if i is Ellipsis)
    if nell > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    nreal = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if nreal > len(shape):
        raise IndexError(f"too many indices for {what!r}: array is {len(shape)}-dimensional, "
                         f"but {nreal} were indexed")
    if nell == 0:
        idx = idx + (Ellipsis,)
    offset = 0
    oshape: list[int] = []
    ostrides: list[int] = []
    ax = 0
    nint = 0
    for i in idx:
        if i is None:
            oshape.append(1)
            ostrides.append(0)
        elif i is Ellipsis:
            for _ in range(len(shape) - nreal):
                oshape.append(shape[ax])
                ostrides.append(strides[ax])
                ax += 1
        elif isinstance(i, slice):
            start, stop, step = i.indices(shape[ax])
            n = len(range(start, stop, step))
            if n:
                offset += start * strides[ax]
            oshape.append(n)
            ostrides.append(strides[ax] * step)
            ax += 1
        else:
            k = int(i)
            n = shape[ax]
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for axis {ax} with size {n}")
            offset += (k + n if k < 0 else k) * strides[ax]
            nint += 1
            ax += 1
    scalar = nint == len(idx) - (nell == 0) and nint == len(shape)
    return offset, oshape, ostrides, scalar


def _view(A: "ZBigArray", offset: int, shape: list[int], strides: list[int]) -> np.ndarray:
    """The read-only ndarray of `shape`/`strides` at byte `offset` of A's file."""
    dtype = A._dtype
    if 0 in shape or dtype.itemsize == 0:
        # Addresses no byte: nothing to map (but still not writeable, like every view).
        a = np.empty(shape, dtype)
        a.flags.writeable = False
        return a
    lo = hi = offset
    for n, s in zip(shape, strides):
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    hi += dtype.itemsize                                  # one past the last byte
    h = _handle_of(A.zfile, A)
    bs = h.blksize
    blk_start, blk_stop = lo // bs, (hi - 1) // bs + 1
    region = h.region(blk_start, blk_stop)
    raw = np.ndarray(shape, dtype, buffer=region.mem,
                     offset=offset - region.blk_start * bs, strides=strides)
    return np.asarray(_Keeper(raw, region))


def getitem(A: "ZBigArray", idx: Any) -> Any:
    """``A[idx]``: a read-only view (basic index) or numpy's result on the full view."""
    t = idx if isinstance(idx, tuple) else (idx,)
    if _is_basic(t):
        offset, shape, strides, scalar = _basic_layout(A._shape, A._stridev, t, A)
        v = _view(A, offset, shape, strides)
        return v[()] if scalar else v
    full = _view(A, 0, list(A._shape), list(A._stridev))
    return full[idx]


def setitem(A: "ZBigArray", idx: Any, value: Any) -> None:
    """``A[idx] = value``: goes through the view of the whole array (read-only for now)."""
    full = _view(A, 0, list(A._shape), list(A._stridev))
    full[idx] = value
