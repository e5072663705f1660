"""Raw ZODB object access for the server: decoding, an MVCC node cache, BTree walks.

The server never uses ZODB Connections.  It reads raw records with
``load_before`` and decodes the few classes it understands (WCFS.md §7):
ZBigFile, ZBlk0/ZBlk1/ZData and LOBTree/IOBTree nodes, under both our class
paths and wendelin.core's.  This gives it two things a Connection cannot:

* any object at any revision from one place -- head and every ``@<rev>`` view
  share the same decoded BTree nodes, and the history component can look at
  "this bucket as of tid X" cheaply;
* zero-copy block data: a ZBlk0 record's payload is sliced out of the record
  bytes (``memoryview``) instead of being unpickled into a second 2 MiB copy.

``NodeCache`` caches decoded *small* objects (ZBigFile states and BTree nodes)
per revision: for an oid it keeps entries ``[serial, next_serial)`` -- the
range of database states in which that record is current.  An entry whose
``next_serial`` is unknown ("current") stays valid until a commit that writes
the oid is applied with ``invalidate``.  Block payloads are never cached here:
the kernel page cache holds them.

Concurrency: ``NodeCache`` methods are thread-safe (one mutex protects the
entry table; loads happen outside it).  Correctness of "current" entries
requires that a load-and-insert for a state ``at`` is not reordered with the
``invalidate`` of a commit newer than ``at``.  The server guarantees it: every
cache fill happens under the head lock held shared, and ``invalidate`` runs
under the head lock held exclusively.
"""
from __future__ import annotations

import io
import logging
import struct
import threading
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import zodbpickle.pickle
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64

from zbigarray.file import ZBlkError, as_bytes, assemble_chunks

log = logging.getLogger("wcfs")

_WENDELIN = "wendelin.bigfile.file_zodb."
ZBIGFILE = {"zbigarray.ZBigFile", _WENDELIN + "ZBigFile"}
ZBLK0 = {"zbigarray.ZBlk0", _WENDELIN + "ZBlk0", _WENDELIN + "ZBlk"}
ZBLK1 = {"zbigarray.ZBlk1", _WENDELIN + "ZBlk1"}
ZDATA = {"zbigarray.ZData", _WENDELIN + "ZData"}
LOBTREE, LOBUCKET = "BTrees.LOBTree.LOBTree", "BTrees.LOBTree.LOBucket"
IOBTREE, IOBUCKET = "BTrees.IOBTree.IOBTree", "BTrees.IOBTree.IOBucket"

_CLASS_PREFIX = 512       # bytes enough for any class pickle of a record

KEY_MIN = -(2**63)
KEY_MAX = 2**63          # exclusive upper bound of int64 keys


class DecodeError(ZBlkError):
    """A record does not have the layout its class requires."""


class Ref(NamedTuple):
    """A persistent reference inside a decoded state."""
    oid: bytes
    klass: str | None


class _GlobalName(str):
    """A class named inside a pickle; never imported by the server."""


class _RawUnpickler(zodbpickle.pickle.Unpickler):
    def __init__(self, data) -> None:
        # ASCII/bytes: py2 `str` payloads come out as str (ASCII) or bytes; as_bytes() undoes both.
        self.stream = io.BytesIO(data)
        super().__init__(self.stream, encoding="ASCII", errors="bytes")

    def find_class(self, module: str, name: str):
        return _GlobalName(f"{module}.{name}")

    def persistent_load(self, ref):
        if isinstance(ref, tuple) and len(ref) == 2:
            oid, klass = ref
            return Ref(as_bytes(oid), str(klass) if klass is not None else None)
        if isinstance(ref, (bytes, str)):
            return Ref(as_bytes(ref), None)
        raise DecodeError(f"unsupported persistent reference {ref!r}")


def decode_record(data) -> tuple[str, Any]:
    """Decode a raw record into (class path, state)."""
    u = _RawUnpickler(data)
    klass = u.load()
    if isinstance(klass, tuple):           # (class, newargs) form
        klass = klass[0]
    if not isinstance(klass, str):
        raise DecodeError(f"record does not start with a class: {klass!r}")
    return str(klass), u.load()


def record_class(data) -> str:
    """Only the class path of a raw record."""
    u = _RawUnpickler(data)
    klass = u.load()
    if isinstance(klass, tuple):
        klass = klass[0]
    return str(klass)


# --- zero-copy ZBlk0 payloads -------------------------------------------------
# pickle opcodes that carry one bytes/str payload of the state pickle
_SHORT_BINBYTES, _BINBYTES, _BINBYTES8 = 0x43, 0x42, 0x8e
_SHORT_BINSTRING, _BINSTRING = 0x55, 0x54
_PROTO = 0x80


def zblk0_payload(data, state_off: int) -> memoryview | None:
    """Slice the payload of a ZBlk0 state pickle starting at ``state_off``, without copying.

    Returns None if the state pickle is not the single-payload form that
    every known writer produces (the caller then unpickles it).
    """
    mv = memoryview(data)
    data = mv
    pos = state_off
    if pos + 2 <= len(data) and data[pos] == _PROTO:
        pos += 2
    if pos >= len(data):
        return None
    op = data[pos]
    if op in (_SHORT_BINBYTES, _SHORT_BINSTRING):
        n, start = data[pos + 1], pos + 2
    elif op in (_BINBYTES, _BINSTRING):
        (n,), start = struct.unpack_from("<I", data, pos + 1), pos + 5
    elif op == _BINBYTES8:
        (n,), start = struct.unpack_from("<Q", data, pos + 1), pos + 9
    else:
        return None
    end = start + n
    # The payload must be followed by an optional memo op and STOP, nothing else.
    rest = bytes(data[end:end + 7])
    if len(rest) > 6 or not rest.endswith(b"."):
        return None
    return mv[start:end]


# --- decoded objects ------------------------------------------------------------

@dataclass(frozen=True)
class BTreeNode:
    """A decoded LOBTree/IOBTree node as of one revision.

    For a bucket: ``keys`` and ``values`` (values are Refs).  For an interior
    node: ``keys`` are the separators k1..kn and ``children`` the n+1 child Refs;
    child i covers ``[keys[i-1], keys[i])`` within the node's own range.
    """
    is_bucket: bool
    keys: tuple
    values: tuple = ()
    children: tuple = ()

    def child_range(self, i: int, lo: int, hi: int) -> tuple[int, int]:
        return (self.keys[i - 1] if i > 0 else lo, self.keys[i] if i < len(self.keys) else hi)


EMPTY_BUCKET = BTreeNode(True, ())


def _bucket_from_items(items) -> BTreeNode:
    if not isinstance(items, tuple) or len(items) % 2:
        raise DecodeError(f"bucket items must be a tuple of key/value pairs, got {type(items).__name__}")
    return BTreeNode(True, tuple(items[0::2]), tuple(items[1::2]))


def decode_btree(klass: str, state) -> BTreeNode:
    """Decode the state of an LOBTree/IOBTree (tree or bucket) record."""
    if klass in (LOBUCKET, IOBUCKET):
        if not isinstance(state, tuple) or not state:
            raise DecodeError(f"{klass}: invalid state")
        return _bucket_from_items(state[0])
    if klass not in (LOBTREE, IOBTREE):
        raise DecodeError(f"{klass} is not a BTree node")
    if state is None:
        return EMPTY_BUCKET
    if not isinstance(state, tuple) or not state or not isinstance(state[0], tuple):
        raise DecodeError(f"{klass}: invalid state")
    data = state[0]
    if len(data) == 1 and isinstance(data[0], tuple):
        # One bucket stored inline in the tree's own record.
        return _bucket_from_items(data[0][0] if data[0] else ())
    if len(data) % 2 != 1:
        raise DecodeError(f"{klass}: interior node with {len(data)} slots")
    children = tuple(data[0::2])
    if not all(isinstance(c, Ref) for c in children):
        raise DecodeError(f"{klass}: interior node with non-persistent children")
    return BTreeNode(False, tuple(data[1::2]), children=children)


class Loaded(NamedTuple):
    """One record as of a state: ``serial`` <= at < ``next_serial`` (None = current)."""
    klass: str
    state: Any
    serial: int
    next_serial: int | None


class NodeCache:
    """MVCC cache of decoded small objects (ZBigFile states, BTree nodes). Thread-safe."""

    def __init__(self, load_before: Callable[[bytes, bytes], tuple], max_entries: int = 1_000_000) -> None:
        self._load_before = load_before
        self._mu = threading.Lock()         # protects _entries
        self._entries: dict[bytes, list[Loaded]] = {}   # oid -> entries sorted by serial
        self._max = max_entries

    def load(self, oid: bytes, at: int, decode: Callable[[str, Any], Any]) -> Loaded:
        """The object ``oid`` as of state ``at``, decoded with ``decode(klass, state)``.

        Raises POSKeyError if the object does not exist at ``at``.
        """
        with self._mu:
            entries = self._entries.get(oid)
            if entries:
                i = bisect_right([e.serial for e in entries], at) - 1
                if i >= 0:
                    e = entries[i]
                    if e.next_serial is None or at < e.next_serial:
                        return e
        data, serial, next_serial = self._load_before(oid, p64(at + 1))
        klass, state = decode_record(data)
        loaded = Loaded(klass, decode(klass, state), u64(serial),
                        u64(next_serial) if next_serial is not None else None)
        with self._mu:
            entries = self._entries.setdefault(oid, [])
            if not any(e.serial == loaded.serial for e in entries):
                entries.append(loaded)
                entries.sort(key=lambda e: e.serial)
        return loaded

    def invalidate(self, oids, tid: int) -> None:
        """Apply a commit: records current so far stop being current at ``tid``."""
        with self._mu:
            for oid in oids:
                entries = self._entries.get(oid)
                if entries and entries[-1].next_serial is None:
                    entries[-1] = entries[-1]._replace(next_serial=tid)

    def forget_before(self, tail: int) -> None:
        """Drop entries that stopped being current at or before ``tail``."""
        with self._mu:
            for oid in list(self._entries):
                kept = [e for e in self._entries[oid] if e.next_serial is None or e.next_serial > tail]
                if kept:
                    self._entries[oid] = kept
                else:
                    del self._entries[oid]

    def __len__(self) -> int:
        with self._mu:
            return sum(len(v) for v in self._entries.values())


def _decode_any_node(klass: str, state):
    return decode_btree(klass, state)


def _decode_zbigfile(klass: str, state):
    if klass not in ZBIGFILE:
        return klass            # the caller reports "<class> is not a ZBigFile"
    try:
        blksize, blktab = state
    except (TypeError, ValueError):
        raise DecodeError(f"ZBigFile: invalid state {type(state).__name__}") from None
    if not isinstance(blksize, int) or blksize <= 0:
        raise DecodeError(f"ZBigFile: invalid blksize {blksize!r}")
    if not isinstance(blktab, Ref):
        raise DecodeError("ZBigFile: blktab is not a persistent LOBTree")
    return (blksize, blktab.oid)


class PathNode(NamedTuple):
    """One node visited on the way to a key: oid, its serial and its key range."""
    oid: bytes
    serial: int
    lo: int
    hi: int


class BlkLookup(NamedTuple):
    zblk: Ref | None        # None: hole
    path: tuple             # PathNode from the root down to the bucket
    rev_max: int            # max serial of the path nodes (ZBlk serial not included)


class ZReader:
    """Reads ZBigFiles as of any state through a NodeCache and raw loads."""

    def __init__(self, load_before: Callable[[bytes, bytes], tuple]) -> None:
        self.load_before = load_before
        self.nodes = NodeCache(load_before)

    def zbigfile(self, oid: bytes, at: int) -> tuple[str | tuple[int, bytes], int]:
        """(blksize, blktab oid) of ZBigFile ``oid`` at ``at`` and its serial.

        Returns the class path string instead of the tuple when the object is
        not a ZBigFile.  Raises POSKeyError if it does not exist.
        """
        e = self.nodes.load(oid, at, _decode_zbigfile)
        return e.state, e.serial

    def lookup(self, root: bytes, key: int, at: int) -> BlkLookup:
        """Walk the LOBTree ``root`` at ``at`` down to ``key``."""
        path = []
        oid, lo, hi = root, KEY_MIN, KEY_MAX
        rev_max = 0
        while True:
            e = self.nodes.load(oid, at, _decode_any_node)
            node: BTreeNode = e.state
            path.append(PathNode(oid, e.serial, lo, hi))
            rev_max = max(rev_max, e.serial)
            if node.is_bucket:
                i = bisect_right(node.keys, key) - 1
                value = node.values[i] if i >= 0 and node.keys[i] == key else None
                if value is not None and not isinstance(value, Ref):
                    raise DecodeError(f"blktab value for #{key} is not a persistent object")
                return BlkLookup(value, tuple(path), rev_max)
            i = bisect_right(node.keys, key)
            lo, hi = node.child_range(i, lo, hi)
            oid = node.children[i].oid

    def maxkey(self, root: bytes, at: int) -> tuple[int | None, tuple]:
        """Largest key of the LOBTree ``root`` at ``at`` (None if empty) and the path to it.

        Walks the rightmost path; an empty rightmost bucket (possible after
        deletions) makes it fall back to a scan of the leaves from the right.
        """
        path: list[PathNode] = []

        def visit(oid: bytes, lo: int, hi: int) -> int | None:
            e = self.nodes.load(oid, at, _decode_any_node)
            node: BTreeNode = e.state
            path.append(PathNode(oid, e.serial, lo, hi))
            if node.is_bucket:
                return node.keys[-1] if node.keys else None
            for i in range(len(node.children) - 1, -1, -1):
                clo, chi = node.child_range(i, lo, hi)
                k = visit(node.children[i].oid, clo, chi)
                if k is not None:
                    return k
            return None

        k = visit(root, KEY_MIN, KEY_MAX)
        return k, tuple(path)

    def load_block(self, zblk: Ref, at: int, blksize: int,
                   map_chunks: Callable[[Callable, list], list] | None = None) -> tuple[memoryview | bytes, int]:
        """Data of block object ``zblk`` at ``at`` (trailing zeros may be missing) and its serial.

        ``map_chunks(fn, items)`` may run ZData loads of a ZBlk1 in parallel.
        Raises ZBlkError for data longer than ``blksize`` or malformed records.
        """
        data, serial, _ = self.load_before(zblk.oid, p64(at + 1))
        # Classify from a prefix: the class pickle is short, and the payload
        # (possibly a zero-copy view of the storage file) must not be copied.
        u = _RawUnpickler(bytes(data[:_CLASS_PREFIX]))
        klass = u.load()
        klass = str(klass[0] if isinstance(klass, tuple) else klass)
        if klass in ZBLK0:
            # The unpickler leaves the stream right after the class pickle's STOP.
            payload = zblk0_payload(data, u.stream.tell())
            if payload is None:
                payload = as_bytes(decode_record(data)[1])
        elif klass in ZBLK1:
            chunktab = decode_record(data)[1]
            if not isinstance(chunktab, Ref):
                raise DecodeError("ZBlk1: chunktab is not a persistent IOBTree")
            payload = self._load_zblk1(chunktab.oid, at, map_chunks)
        else:
            raise DecodeError(f"blktab value is a {klass}, not a ZBlk")
        if len(payload) > blksize:
            raise ZBlkError(f"block object {u64(zblk.oid):016x}: data is {len(payload)} bytes > blksize {blksize}")
        return payload, u64(serial)

    def _load_zblk1(self, root: bytes, at: int, map_chunks) -> bytes:
        refs: list[tuple[int, bytes]] = []

        def collect(oid: bytes) -> None:
            node: BTreeNode = self.nodes.load(oid, at, _decode_any_node).state
            if node.is_bucket:
                for k, v in zip(node.keys, node.values):
                    if not isinstance(v, Ref):
                        raise DecodeError("ZBlk1: chunk is not a persistent ZData")
                    refs.append((k, v.oid))
            else:
                for c in node.children:
                    collect(c.oid)

        collect(root)

        def load_chunk(item: tuple[int, bytes]) -> tuple[int, bytes]:
            off, oid = item
            data, _, _ = self.load_before(oid, p64(at + 1))
            klass, state = decode_record(data)
            if klass not in ZDATA:
                raise DecodeError(f"ZBlk1 chunk is a {klass}, not ZData")
            return off, as_bytes(state)

        chunks = map_chunks(load_chunk, refs) if map_chunks and len(refs) > 1 else [load_chunk(r) for r in refs]
        return bytes(assemble_chunks(chunks))


__all__ = ["ZReader", "NodeCache", "BTreeNode", "Ref", "DecodeError", "POSKeyError",
           "decode_record", "record_class", "ZBIGFILE", "KEY_MIN", "KEY_MAX"]
