"""Helpers for tests that inspect raw ZODB records."""
from __future__ import annotations

import io

import zodbpickle.pickle


class Ref(tuple):
    """A persistent reference found in a raw record: (oid, class path or None)."""


class _RawUnpickler(zodbpickle.pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="ASCII", errors="bytes")
        self.class_record = True       # the first pickle names the class; the state may need real globals

    def find_class(self, module, name):
        if self.class_record:
            return f"{module}.{name}"
        return super().find_class(module, name)

    def persistent_load(self, ref):
        if isinstance(ref, tuple):
            oid, klass = ref
            return Ref((oid, klass if isinstance(klass, str) else None))
        return Ref((ref, None))


def raw_record(storage, oid: bytes) -> tuple[str, object]:
    """Return (class path, state) of object ``oid`` as stored, without ZODB classes."""
    data, _serial = storage.load(oid)
    u = _RawUnpickler(data)
    klass = u.load()
    u.class_record = False
    state = u.load()
    if isinstance(klass, tuple):       # (class, None) form
        klass = klass[0]
    return klass, state
