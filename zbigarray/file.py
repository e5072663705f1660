"""ZBigFile and its block objects: the on-disk data model of big arrays.

A ``ZBigFile`` is a sparse file of fixed-size blocks kept in ZODB.  Its state is
``(blksize, blktab)`` where ``blktab`` is an ``LOBTree`` mapping a block number
to a block object; a missing key is a hole that reads as zeros.  Two block
formats exist, byte-compatible with wendelin.core (WCFS.md §7):

* ``ZBlk0`` -- the whole block as one bytes pickle, trailing NULs stripped.
  Fast to read, but any change re-stores the whole block.
* ``ZBlk1`` -- an ``IOBTree`` of 4 KiB chunks (``ZData`` objects), all-zero
  chunks absent.  A small change re-stores only the touched chunks.

Guarantees:

* ``loadblk`` returns exactly ``blksize`` bytes; stored data longer than
  ``blksize`` or overlapping ``ZBlk1`` chunks are data errors (``ZBlkError``),
  never silently truncated.
* Whenever any chunk of a ``ZBlk1`` changes, the ``ZBlk1`` object itself is
  marked changed.  The WCFS server relies on this: it detects a changed block
  by the block object's oid and never needs to watch ``ZData`` objects.
* The format written is chosen per stored block from ``$ZBIGARRAY_ZBLK_FMT``
  (read at every store, so tests and tools may switch it), see ``choose_format``.
* Block payloads pickled by Python 2 arrive as ``str`` (ZODB decodes py2
  strings as ASCII where it can); they are converted back to bytes losslessly.

The pure decoding helpers (``zblk0_bytes``, ``assemble_chunks``) are shared
with the WCFS server, which decodes raw pickles itself instead of going
through ZODB connections.

Concurrency: these are ordinary persistent objects; like every ZODB object they
belong to one connection and are used from one thread at a time.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

import numpy as np
from BTrees.IOBTree import IOBTree
from BTrees.LOBTree import LOBTree
from persistent import Persistent

log = logging.getLogger("zbigarray")

CHUNKSIZE = 4096                 # ZBlk1 chunk size (bytes)
FORMATS = ("ZBlk0", "ZBlk1", "auto")
ENV_FORMAT = "ZBIGARRAY_ZBLK_FMT"


class ZBlkError(ValueError):
    """Stored block data is inconsistent (too long, overlapping chunks, ...)."""


def as_bytes(payload: bytes | str | bytearray | memoryview) -> bytes:
    """Return a block payload as bytes, undoing Python 2 ``str`` decoding.

    ZODB unpickles a py2 ``str`` as a Python 3 ``str`` when it is ASCII (and as
    bytes otherwise); every code point is then < 256, so latin-1 is lossless.
    """
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("latin-1")
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    raise ZBlkError(f"block payload of unexpected type {type(payload).__name__}")


def zblk0_bytes(state) -> bytes:
    """Decode the state of a ZBlk0 (block bytes, trailing NULs stripped)."""
    return as_bytes(state)


def assemble_chunks(chunks: Iterable[tuple[int, bytes]]) -> bytearray:
    """Assemble ZBlk1 chunks ``(offset, data)`` (ascending offsets) into block bytes.

    The chunk size is not assumed: the block length is the end of the last
    chunk, gaps are zeros.  Overlapping or unordered chunks are a data error.
    """
    chunks = list(chunks)
    if not chunks:
        return bytearray()
    last_off, last_data = chunks[-1]
    out = bytearray(last_off + len(last_data))
    end = 0
    for off, data in chunks:
        if off < end or off < 0:
            raise ZBlkError(f"ZBlk1: chunk at offset {off} overlaps previous data (up to {end})")
        out[off:off + len(data)] = data
        end = off + len(data)
    return out


class LivePersistent(Persistent):
    """A persistent object that the cache never turns into a ghost.

    Only invalidation (another transaction changed it) drops its state.  Used
    for objects that carry runtime attachments (open WCFS handles) which must
    survive cache garbage collection.
    """
    __slots__ = ()

    def _p_deactivate(self) -> None:
        pass


class ZBlk0(Persistent):
    """A block stored as one bytes object (trailing NULs stripped)."""

    def __init__(self) -> None:
        self._data = b""

    def __getstate__(self) -> bytes:
        return self._data

    def __setstate__(self, state) -> None:
        self._data = zblk0_bytes(state)

    def loaddata(self) -> bytes:
        """Return the stored bytes (without trailing zeros) and drop them from RAM."""
        data = self._data
        self._p_deactivate()
        return data

    def setblkdata(self, data) -> None:
        new = bytes(data).rstrip(b"\0")
        if self._p_jar is None or self._data != new:
            self._data = new
            self._p_changed = True


class ZData(Persistent):
    """One chunk of a ZBlk1 (bytes, trailing NULs stripped)."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def __getstate__(self) -> bytes:
        return self.data

    def __setstate__(self, state) -> None:
        self.data = as_bytes(state)


class ZBlk1(Persistent):
    """A block stored as an IOBTree of CHUNKSIZE chunks; zero chunks are absent."""

    def __init__(self) -> None:
        self.chunktab = IOBTree()

    def __getstate__(self):
        return self.chunktab

    def __setstate__(self, state) -> None:
        self.chunktab = state

    def loaddata(self) -> bytes:
        """Return the stored bytes (length = end of last chunk) and drop them from RAM."""
        pieces = []
        for off, zdata in self.chunktab.items():
            pieces.append((off, zdata.data))
            zdata._p_deactivate()
        data = bytes(assemble_chunks(pieces))
        self._p_deactivate()
        return data

    def setblkdata(self, data) -> None:
        data = memoryview(bytes(data))
        chunktab = self.chunktab
        # A chunktab written with another chunk size cannot be updated chunk-wise.
        if any(off % CHUNKSIZE or len(zd.data) > CHUNKSIZE for off, zd in chunktab.items()):
            chunktab.clear()
        changed = False
        nchunks = (len(data) + CHUNKSIZE - 1) // CHUNKSIZE
        for i in range(nchunks):
            off = i * CHUNKSIZE
            chunk = bytes(data[off:off + CHUNKSIZE]).rstrip(b"\0")
            zdata = chunktab.get(off)
            if not chunk:
                if zdata is not None:
                    del chunktab[off]
                    changed = True
            elif zdata is None:
                chunktab[off] = ZData(chunk)
                changed = True
            elif zdata.data != chunk:
                zdata.data = chunk
                changed = True
        # Chunks past the new data are zeros now.
        stale = list(chunktab.keys(min=nchunks * CHUNKSIZE)) if len(chunktab) else []
        for off in stale:
            del chunktab[off]
            changed = True
        if changed or self._p_jar is None:
            self._p_changed = True


def format_from_env() -> str:
    """Return the block format configured by $ZBIGARRAY_ZBLK_FMT (default ``auto``)."""
    fmt = os.environ.get(ENV_FORMAT, "auto")
    if fmt not in FORMATS:
        raise RuntimeError(f"${ENV_FORMAT}={fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def _count_diff(a: bytes, b: bytes) -> int:
    """Number of differing bytes over the common length plus the length difference."""
    n = min(len(a), len(b))
    differing = 0
    if n:
        differing = int(np.count_nonzero(np.frombuffer(a, np.uint8, n) != np.frombuffer(b, np.uint8, n)))
    return differing + abs(len(a) - len(b))


class ZBigFile(LivePersistent):
    """A sparse file of ``blksize`` blocks stored in ZODB (state ``(blksize, blktab)``)."""

    def __init__(self, blksize: int) -> None:
        blksize = int(blksize)
        if blksize <= 0:
            raise ValueError(f"ZBigFile: blksize must be > 0, got {blksize}")
        self.blksize = blksize
        self.blktab = LOBTree()

    def __getstate__(self):
        return (self.blksize, self.blktab)

    def __setstate__(self, state) -> None:
        try:
            blksize, blktab = state
        except (TypeError, ValueError):
            raise ZBlkError(f"ZBigFile: invalid state {type(state).__name__}") from None
        if not isinstance(blksize, int) or blksize <= 0:
            raise ZBlkError(f"ZBigFile: invalid blksize {blksize!r}")
        self.blksize = blksize
        self.blktab = blktab

    @property
    def size(self) -> int:
        """File size in bytes: (max key + 1) * blksize, 0 for an empty file."""
        if not len(self.blktab):
            return 0
        return (self.blktab.maxKey() + 1) * self.blksize

    def loadblk(self, blk: int) -> bytes:
        """Return block ``blk``: exactly ``blksize`` bytes, zeros for holes and beyond stored data."""
        zblk = self.blktab.get(blk)
        if zblk is None:
            return bytes(self.blksize)
        data = zblk.loaddata()
        if len(data) > self.blksize:
            raise ZBlkError(f"ZBigFile {self._p_oid!r}: block #{blk}: stored data is "
                            f"{len(data)} bytes > blksize {self.blksize}")
        return data.ljust(self.blksize, b"\0")

    def storeblk(self, blk: int, data) -> None:
        """Store ``data`` (at most blksize bytes, zero-padded) as block ``blk``."""
        if blk < 0:
            raise ValueError(f"ZBigFile.storeblk: negative block {blk}")
        data = bytes(data)
        if len(data) > self.blksize:
            raise ValueError(f"ZBigFile.storeblk: {len(data)} bytes > blksize {self.blksize}")
        fmt = format_from_env()
        zblk = self.blktab.get(blk)
        if fmt == "auto":
            fmt = self.choose_format(blk, data, zblk)
        cls = ZBlk0 if fmt == "ZBlk0" else ZBlk1
        if type(zblk) is not cls:
            zblk = cls()
            self.blktab[blk] = zblk
        zblk.setblkdata(data)

    def choose_format(self, blk: int, data: bytes, zblk) -> str:
        """The ``auto`` heuristic (WCFS.md §7.4): ZBlk1 for small changes, ZBlk0 otherwise.

        Blocks are expected to be stored in ascending order within a
        transaction: when a new block is appended after a block that was also
        changed in this transaction as ZBlk1, that previous block is converted
        to ZBlk0 (it is not going to receive small appends any more).
        """
        new = data.rstrip(b"\0")
        old = zblk.loaddata().rstrip(b"\0") if zblk is not None else b""
        delta = _count_diff(new, old)
        maxkey = self.blktab.maxKey() if len(self.blktab) else -1
        append_last = blk == maxkey and new.startswith(old)
        append_new = blk == maxkey + 1 and not old
        small = delta < self.blksize / 2
        filled = len(new) == self.blksize
        if append_last or append_new:
            if append_new:
                prev = self.blktab.get(blk - 1)
                if isinstance(prev, ZBlk1) and (prev._p_oid is None or prev._p_changed):
                    prevdata = prev.loaddata()
                    zblk0 = ZBlk0()
                    zblk0.setblkdata(prevdata)
                    self.blktab[blk - 1] = zblk0
            return "ZBlk1" if small and not filled else "ZBlk0"
        return "ZBlk1" if small else "ZBlk0"
