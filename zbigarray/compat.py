"""Compatibility with databases written by wendelin.core.

wendelin.core pickles its classes under ``wendelin.bigfile.file_zodb`` and
``wendelin.bigarray.array_zodb``.  Our classes have identical state formats
(WCFS.md §7), so making those class paths resolve to our classes is all that
is needed to load such databases.  ZODB resolves classes by importing the
module named in the pickle; we register small alias modules in
``sys.modules`` for exactly those paths.

The aliases never replace a real module: if a module of that name is already
imported (e.g. a genuine wendelin.core), the alias is not installed for it and
a warning is logged.  Installing is idempotent and thread-safe.

Python 2 pickles carry block payloads as ``str``.  ZODB's object reader
unpickles py2 ``str`` as ASCII text and fails on any byte >= 0x80, so block
data could not be loaded at all.  ``install_wendelin_aliases`` therefore also
makes the reader decode such strings the way ZODB's own ``loads`` helper does:
ASCII text stays ``str``, anything else becomes ``bytes``; the block classes
turn both back into the original bytes losslessly (``file.as_bytes``).  Py3
pickles are unaffected (their bytes are bytes).
"""
from __future__ import annotations

import logging
import sys
import threading
import types
from io import BytesIO

import zodbpickle.pickle
from ZODB.serialize import ObjectReader

log = logging.getLogger("zbigarray")

_lock = threading.Lock()          # protects the one-time installation below
_installed = False


def _alias_table() -> dict[str, dict[str, type]]:
    from .array import ZBigArray
    from .file import ZBigFile, ZBlk0, ZBlk1, ZData
    return {
        "wendelin.bigfile.file_zodb": {
            "ZBigFile": ZBigFile, "ZBlk0": ZBlk0, "ZBlk1": ZBlk1, "ZData": ZData,
            "ZBlk": ZBlk0,        # legacy name of ZBlk0
        },
        "wendelin.bigarray.array_zodb": {"ZBigArray": ZBigArray},
    }


class _Py2TolerantUnpickler(zodbpickle.pickle.Unpickler):
    """Unpickler of one ObjectReader that decodes py2 ``str`` without failing."""

    def __init__(self, reader: ObjectReader, pickle: bytes) -> None:
        super().__init__(BytesIO(pickle), encoding="ASCII", errors="bytes")
        self._reader = reader
        self.persistent_load = reader._persistent_load

    def find_class(self, modulename: str, name: str):
        return self._reader._factory(self._reader._conn, modulename, name)


def _py2_tolerant_unpickler(reader: ObjectReader, pickle: bytes) -> _Py2TolerantUnpickler:
    return _Py2TolerantUnpickler(reader, pickle)


def install_wendelin_aliases() -> None:
    """Make wendelin.core class paths load as zbigarray classes (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        for modname, names in _alias_table().items():
            existing = sys.modules.get(modname)
            if existing is not None and not getattr(existing, "__zbigarray_alias__", False):
                log.warning("not aliasing %s: a real module of that name is already imported", modname)
                continue
            parts = modname.split(".")
            for i in range(1, len(parts)):
                pkg = ".".join(parts[:i])
                if pkg not in sys.modules:
                    m = types.ModuleType(pkg, f"zbigarray alias package for {pkg}")
                    m.__path__ = []
                    m.__zbigarray_alias__ = True
                    sys.modules[pkg] = m
            mod = types.ModuleType(modname, f"zbigarray aliases for wendelin.core's {modname}")
            mod.__zbigarray_alias__ = True
            for name, cls in names.items():
                setattr(mod, name, cls)
            sys.modules[modname] = mod
            parent, _, leaf = modname.rpartition(".")
            setattr(sys.modules[parent], leaf, mod)
        ObjectReader._get_unpickler = _py2_tolerant_unpickler
        _installed = True
