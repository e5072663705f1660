"""ZBigArray: an n-dimensional array whose bytes live in a ZBigFile.

The persistent state is wendelin.core-compatible (WCFS.md §7.6): the instance
dict holds ``_dtype`` (numpy dtype), ``_shape`` (tuple), ``_order`` ('C' or
'F') and ``_stridev`` (byte strides), and the slot ``zfile`` holds the
ZBigFile, so the pickled state is ``(dict, {'zfile': zfile})``.

The array's bytes are laid out contiguously in the file in ``order``, so its
"major axis" -- the one ``append`` grows -- is axis 0 for C order and the last
axis for F order.  ``resize`` only changes the shape (O(1)): growing exposes
zeros, shrinking keeps the data beyond the new end in the file, where a later
growth shows it again, exactly like the reference.

Views: ``A[idx]`` is a real numpy.ndarray over WCFS-mapped memory of the
file as of the array's ZODB connection (``zbigarray.view``; read-only for now,
so ``A[idx] = v`` raises numpy's "assignment destination is read-only").  The
per-ZBigFile view handle lives in ``zfile._v_wcfs_view``; volatile state of the
array itself is dropped on every (re)load.

Guarantees: object dtypes are rejected (their bytes are pointers); ``append``
either fully succeeds or leaves the shape unchanged.

Concurrency: a persistent object; used from one thread at a time within its
ZODB connection.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from . import view
from .file import LivePersistent, ZBigFile

log = logging.getLogger("zbigarray")

DEFAULT_BLKSIZE = 2 * 1024 * 1024


def _strides(shape: Sequence[int], itemsize: int, order: str) -> tuple[int, ...]:
    """Byte strides of a contiguous array of ``shape`` in ``order``."""
    strides = [0] * len(shape)
    step = itemsize
    axes = range(len(shape) - 1, -1, -1) if order == "C" else range(len(shape))
    for ax in axes:
        strides[ax] = step
        step *= max(shape[ax], 1)
    return tuple(strides)


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"ZBigArray: negative dimension in shape {shape}")
    return shape


class ZBigArray(LivePersistent):
    """A persistent numpy-like array stored in a ZBigFile."""

    __slots__ = ("zfile", "__dict__", "__weakref__")

    def __init__(self, shape, dtype, order: str = "C", blksize: int = DEFAULT_BLKSIZE) -> None:
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise TypeError(f"ZBigArray: object dtype {dtype} is not supported "
                            "(the bytes of objects are pointers)")
        if order not in ("C", "F"):
            raise ValueError(f"ZBigArray: order must be 'C' or 'F', got {order!r}")
        self._dtype = dtype
        self._order = order
        self._set_shape(_check_shape(shape))
        self.zfile = ZBigFile(blksize)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        # Objects written before a field existed get the constructor default.
        d = self.__dict__
        d.setdefault("_order", "C")
        if "_stridev" not in d:
            d["_stridev"] = _strides(d["_shape"], d["_dtype"].itemsize, d["_order"])
        # Volatile state (e.g. an open WCFS view) must be re-created for the new state.
        for k in [k for k in d if k.startswith("_v_")]:
            del d[k]

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        self._shape = shape
        self._stridev = _strides(shape, self._dtype.itemsize, self._order)

    # --- shape arithmetic ---------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def order(self) -> str:
        return self._order

    @property
    def strides(self) -> tuple[int, ...]:
        return self._stridev

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def itemsize(self) -> int:
        return self._dtype.itemsize

    @property
    def size(self) -> int:
        return int(np.prod(self._shape, dtype=np.int64)) if self._shape else 1

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    @property
    def major_axis(self) -> int:
        return 0 if self._order == "C" else self.ndim - 1

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError("len() of a 0-d ZBigArray")
        return self._shape[0]

    def __repr__(self) -> str:
        return f"<ZBigArray shape={self._shape} dtype={self._dtype} order={self._order}>"

    # --- views (WCFS) ---------------------------------------------------------
    def __getitem__(self, idx):
        """A read-only ndarray view of ``idx`` (basic index) or numpy's copy (advanced index)."""
        return view.getitem(self, idx)

    def __setitem__(self, idx, value) -> None:
        view.setitem(self, idx, value)

    # --- growth --------------------------------------------------------------
    def resize(self, new_shape) -> None:
        """Change the shape in O(1); the number of dimensions must stay the same."""
        new_shape = _check_shape(new_shape)
        if len(new_shape) != self.ndim:
            raise ValueError(f"ZBigArray.resize: cannot change ndim {self.ndim} -> {len(new_shape)}")
        self._set_shape(new_shape)

    def append(self, values) -> None:
        """Append ``values`` along the major axis (O(len(values)))."""
        values = np.asarray(values, dtype=self._dtype)
        ax = self.major_axis
        minor = self._shape[:ax] + self._shape[ax + 1:]
        if values.ndim == self.ndim - 1:
            values = np.expand_dims(values, ax)
        if values.ndim != self.ndim or values.shape[:ax] + values.shape[ax + 1:] != minor:
            raise ValueError(f"ZBigArray.append: values of shape {values.shape} do not fit "
                             f"array of shape {self._shape} along axis {ax}")
        old_shape = self._shape
        offset = self.nbytes
        new_shape = list(old_shape)
        new_shape[ax] += values.shape[ax]
        self.resize(new_shape)
        try:
            self._write_bytes(offset, np.ascontiguousarray(values) if self._order == "C"
                              else np.asfortranarray(values))
        except BaseException:
            self._set_shape(old_shape)
            raise

    def _write_bytes(self, offset: int, values: np.ndarray) -> None:
        """Write the raw bytes of ``values`` at byte ``offset`` of the file, block by block."""
        buf = memoryview(values.reshape(-1, order="A").view(np.uint8))
        zfile = self.zfile
        blksize = zfile.blksize
        pos = 0
        while pos < len(buf):
            blk, inblk = divmod(offset + pos, blksize)
            n = min(blksize - inblk, len(buf) - pos)
            if n == blksize:
                zfile.storeblk(blk, buf[pos:pos + n])
            else:
                block = bytearray(zfile.loadblk(blk))
                block[inblk:inblk + n] = buf[pos:pos + n]
                zfile.storeblk(blk, block)
            pos += n
