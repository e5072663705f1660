"""Opening FileStorage files, including Python 2 ones, read-only.

FileStorage files written by Python 2 ZODB start with the magic ``FS21``;
the record format is the same as Python 3's ``FS30``, only the pickles inside
differ (they are protocol 1/2 and carry py2 ``str``), which ZODB's unpickler
and our ``as_bytes`` handle.  ZODB 5+ on Python 3 refuses ``FS21`` because it
compares the magic with a module constant.  ``open_filestorage`` accepts it
for read-only opens by swapping that constant while the file is opened.

Concurrency: the swap is process-global, so it is done under a lock, and only
around the open of an FS21 file; a concurrent open of an FS30 file by code
that does not go through this module could fail during that short window.
"""
from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Iterator

from ZODB.FileStorage import FileStorage

# The module, not the class of the same name that ZODB.FileStorage re-exports.
fsmod = importlib.import_module("ZODB.FileStorage.FileStorage")

MAGIC_PY3 = b"FS30"
MAGIC_PY2 = b"FS21"

_magic_lock = threading.Lock()    # serialises swaps of fsmod.packed_version


def file_magic(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


@contextlib.contextmanager
def accept_magic(magic: bytes) -> Iterator[None]:
    """Let ZODB's FileStorage code accept ``magic`` inside this block."""
    if magic == fsmod.packed_version:
        yield
        return
    with _magic_lock:
        saved = fsmod.packed_version
        fsmod.packed_version = magic
        try:
            yield
        finally:
            fsmod.packed_version = saved


def open_filestorage(path: str, read_only: bool = True, **kw) -> FileStorage:
    """Open a FileStorage; Python 2 (``FS21``) files are accepted read-only.

    >>> stor = open_filestorage("/path/to/py2/Data.fs")   # doctest: +SKIP
    """
    magic = file_magic(path)
    if magic == MAGIC_PY2:
        if not read_only:
            raise ValueError(f"{path}: Python 2 FileStorage (magic FS21) can only be opened read-only")
        with accept_magic(MAGIC_PY2):
            return FileStorage(path, read_only=True, **kw)
    return FileStorage(path, read_only=read_only, **kw)
