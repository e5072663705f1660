"""Read-only storage access and commit change feeds for the WCFS server.

The server needs two things from a ZODB storage named by a zurl (WCFS.md
§3.10): raw loads of object records as of any revision, callable from many
threads at once, and a feed that delivers every committed transaction, in
commit order, with the complete set of oids it wrote (created objects
included), starting exactly after the head the server starts from.  The
server decodes pickles itself, so no ZODB ``DB``/``Connection`` is involved.

``open_zstor(zurl)`` returns a `ZStor` for one of three backends:

* ``file://…/Data.fs`` (or a bare path) -- `_FileZStor`.  A read-only
  FileStorage object is a frozen snapshot, so we do not use one: we read the
  file format ourselves (``ZODB.FileStorage.format`` constants, ``fsIndex``)
  through ``os.pread`` on a single descriptor (no file position, so threads
  share it).  A load holds a lock only for the index lookup: the index maps
  an oid to its newest data record, records are immutable once their
  transaction is committed, and walking the ``prev`` chain from a newer
  record still finds the right revision, so a load racing with an index
  update is correct either way.  The feed polls the file (`POLL_INTERVAL_FS`)
  and accepts a transaction only once it is complete: status ``' '``/``'p'``
  (a ``'c'`` checkpoint is still being committed), lengths consistent, the
  trailing redundant length present, every data record pointing back at it.
  Its records are indexed *before* it is delivered.  Python 2 files (magic
  ``FS21``, same record format) are read the same way.  A replaced file (a
  pack renames a new file over the old one, or the file shrank below data we
  already accepted) is re-opened: we first drain the old inode -- it stops
  growing once replaced -- then require the new file to contain the last
  delivered transaction and deliver what follows it.  If it does not (or what
  follows was itself packed), continuity cannot be proven and the feed raises
  `FeedError`.  History removed by a pack makes loads at revisions before the
  packed prefix raise `HistoryLost` (a `POSKeyError`), never return wrong
  data.

* ``zeo://host:port[?storage=NAME]`` and ``zeo:///path/to/socket`` --
  `_ZEOZStor`, a read-only ``ClientStorage``.  Invalidations are subscribed
  to before the head is read (registerDB, a server round trip, then the
  client's last tid), so no commit falls between the head and the first event.
  ZEO invalidates its client cache *before* calling us, so a delivered commit
  is visible to loads.  After a disconnect, invalidations are not trusted (the
  reconnect may merge several transactions into one notice, or send none):
  when the connection is back we replay ``iterator(start=last)``, which must
  begin with the last delivered transaction, and deliver every later one with
  its oids.  Disconnected for longer than ``reconnect_timeout`` → `FeedError`.

* ``postgres://user@host:port/db?…`` (RelStorage's zodburi syntax) --
  `_RelZStor`, history-preserving schemas only.  The feed polls, in one
  snapshot, the ``transaction`` table joined with ``object_state`` for tids
  above the last delivered one.  This cannot skip a transaction that becomes
  visible after a later tid: RelStorage allocates a tid while holding the
  commit lock (``pg_advisory_xact_lock(-1)``, released when the database
  transaction ends, i.e. after its commit is visible) and picks it above
  ``max(tid)``, so a transaction can only obtain a higher tid after every
  lower one has committed -- a snapshot that sees a tid sees all below it.
  RelStorage instances are not thread-safe: each loading thread gets its own
  ``new_instance()``, re-synced (``poll_invalidations``) whenever the feed
  has delivered something newer than it last saw.

Concurrency model common to all: ``next_commit`` is called from one thread
(the server's invalidation watcher); ``load_before`` from any number of
threads; ``close`` from any thread, once or more, and it wakes a blocked
``next_commit`` with ``FeedError("closed")``.
"""
from __future__ import annotations

import abc
import collections
import logging
import mmap
import os
import re
import struct
import threading
import time
from typing import Callable, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from ZODB.FileStorage.format import (DATA_HDR, DATA_HDR_LEN, TRANS_HDR,
                                     TRANS_HDR_LEN, CorruptedDataError,
                                     CorruptedError)
from ZODB.fsIndex import fsIndex
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64, z64

log = logging.getLogger("wcfs")

__all__ = ["open_zstor", "ZStor", "Commit", "ZStorError", "FeedError",
           "ObjectDeleted", "HistoryLost",
           "POLL_INTERVAL_FS", "POLL_INTERVAL_SQL", "RECONNECT_TIMEOUT"]

POLL_INTERVAL_FS = 0.010     # s between looks at a followed Data.fs
POLL_INTERVAL_SQL = 0.020    # s between feed queries on RelStorage
RECONNECT_TIMEOUT = 30.0     # s a ZEO/SQL feed may stay disconnected before FeedError
TAIL_GRACE = 5.0             # s a malformed or replaced-and-missing file end may persist


class Commit(NamedTuple):
    """One committed transaction: its tid and every oid it wrote (created ones too)."""
    tid: bytes
    oids: frozenset[bytes]


class ZStorError(Exception):
    """Base of this module's errors (besides the POSKeyError family)."""


class FeedError(ZStorError):
    """The change feed cannot go on without possibly missing a transaction."""


class ObjectDeleted(POSKeyError):
    """The object existed, but its revision current at that point is a deletion
    (undone creation, ``deleteObject``).  ``args[0]`` is the oid as for
    POSKeyError; ``serial`` is the tid of the deletion record when known."""

    def __init__(self, oid: bytes, serial: bytes | None = None):
        super().__init__(oid)
        self.oid = oid
        self.serial = serial

    def __str__(self) -> str:
        at = f" @{self.serial.hex()}" if self.serial else ""
        return f"{self.oid.hex()}: deleted{at}"


class HistoryLost(POSKeyError):
    """No record of the object before the asked revision, and that revision
    lies in a packed part of the history: it may have existed then."""

    def __init__(self, oid: bytes, before: bytes, packed_tid: bytes):
        super().__init__(oid)
        self.oid = oid
        self.before = before
        self.packed_tid = packed_tid

    def __str__(self) -> str:
        return (f"{self.oid.hex()}: history before {self.before.hex()} lost "
                f"(packed up to {self.packed_tid.hex()})")


class ZStor(abc.ABC):
    """Read-only access to one storage plus its commit feed (see module doc)."""

    zurl: str
    head: bytes      # at0: fixed at open; the feed delivers what comes after it

    @abc.abstractmethod
    def load_before(self, oid: bytes, before: bytes) -> tuple[bytes, bytes, bytes | None]:
        """``(data, serial, next_serial)`` of the revision current just before
        ``before``.  ``data`` is bytes-like: large FileStorage records come as
        a read-only zero-copy ``memoryview``.  Raises POSKeyError if the object did not exist then
        (ObjectDeleted / HistoryLost when the storage can tell more).  Sees
        every transaction already delivered by next_commit.  ``next_serial``
        may name a transaction not delivered yet; ``None`` means no newer
        revision was known to the storage when loading."""

    _failure: FeedError | None = None   # set once the feed failed: it stays failed

    def next_commit(self, timeout: float | None) -> Commit | None:
        """Next transaction after the last delivered one (after ``head`` at
        first); ``None`` on timeout; FeedError on failure or after close.
        A failed feed keeps raising the same error: continuity is gone."""
        if self._failure is not None:
            raise self._failure
        try:
            return self._next_commit(timeout)
        except FeedError as e:
            self._failure = e
            raise

    @abc.abstractmethod
    def _next_commit(self, timeout: float | None) -> Commit | None:
        """Backend part of next_commit (same contract; raising FeedError
        makes the failure sticky)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; idempotent; wakes a blocked next_commit."""

    _poll_interval: float
    _closed: threading.Event

    def _pause(self, deadline: float | None) -> bool:
        """Sleep one poll interval (less if ``deadline`` is nearer, woken by close);
        False if the deadline has passed."""
        wait = self._poll_interval
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            wait = min(wait, left)
        self._closed.wait(wait)
        return True

    def __enter__(self) -> "ZStor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.zurl} head={self.head.hex()}>"


_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_ZODBURI_DB_PARAMS = {"database_name"} | {
    "connection_" + p for p in ("pool_size", "pool_timeout", "cache_size", "cache_size_bytes",
                                "historical_pool_size", "historical_cache_size",
                                "historical_cache_size_bytes", "historical_timeout",
                                "large_record_size")}


def open_zstor(zurl: str, *, poll_interval: float | None = None,
               reconnect_timeout: float = RECONNECT_TIMEOUT) -> ZStor:
    """Open the storage named by ``zurl`` read-only and start following it.

    ``poll_interval`` overrides the backend's polling period (FileStorage,
    RelStorage); ``reconnect_timeout`` bounds how long a ZEO or SQL feed may
    stay disconnected before next_commit raises FeedError (ZEO loads also
    wait at most that long for a connection).  Unsupported schemes, in-memory
    storages and history-free RelStorage raise ValueError.
    """
    m = _SCHEME_RE.match(zurl)
    scheme = m.group(1).lower() if m else ""
    if not m or len(scheme) == 1:           # bare path (or a drive-letter-looking one)
        return _FileZStor(zurl, zurl, poll_interval or POLL_INTERVAL_FS)
    if scheme == "file":
        return _FileZStor(zurl, _parse_file_zurl(zurl), poll_interval or POLL_INTERVAL_FS)
    if scheme == "zeo":
        addr, storage = _parse_zeo_zurl(zurl)
        return _ZEOZStor(zurl, addr, storage, reconnect_timeout)
    if scheme in ("postgres", "postgresql"):
        return _RelZStor(zurl, poll_interval or POLL_INTERVAL_SQL, reconnect_timeout)
    if scheme in ("memory", "demo"):
        raise ValueError(f"{zurl}: in-memory storages cannot be served: the WCFS server "
                         f"is a separate process and must open the same database")
    raise ValueError(f"{zurl}: unsupported storage scheme {scheme!r} (supported: file://, "
                     f"zeo://, postgres:// with a history-preserving RelStorage)")


def _parse_file_zurl(zurl: str) -> str:
    rest = zurl.split("://", 1)[1] if "://" in zurl else zurl.split(":", 1)[1]
    path, _, query = rest.partition("?")
    for key, _ in parse_qsl(query, keep_blank_values=True):
        # read_only is harmless (we always are); anything else would change
        # what the URL means in a way we do not implement.
        if key != "read_only":
            raise ValueError(f"{zurl}: unsupported FileStorage URL parameter {key!r}")
    if not path:
        raise ValueError(f"{zurl}: no FileStorage path")
    return path


def _parse_zeo_zurl(zurl: str) -> tuple[tuple[str, int] | str, str]:
    u = urlsplit("http://" + zurl.split("://", 1)[1])
    storage = "1"
    for key, value in parse_qsl(u.query, keep_blank_values=True):
        if key == "storage":
            storage = value
        elif key not in _ZODBURI_DB_PARAMS:
            raise ValueError(f"{zurl}: unsupported ZEO URL parameter {key!r}")
    if u.netloc:
        try:
            port = u.port
        except ValueError as e:
            raise ValueError(f"{zurl}: bad port") from e
        return (u.hostname or "127.0.0.1", port or 9991), storage
    if not u.path:
        raise ValueError(f"{zurl}: neither host:port nor a unix socket path")
    return os.path.normpath(u.path), storage


# ---------------------------------------------------------------------------
# FileStorage, followed by reading the file.

_MAGICS = (b"FS30", b"FS21")          # FS21: written by Python 2, same record format
_TXN_HDR = struct.Struct(TRANS_HDR)   # tid, tlen, status, ulen, dlen, elen
_DATA_HDR = struct.Struct(DATA_HDR)   # oid, tid, prev, tloc, vlen, plen
_TXN_READAHEAD = 64 << 10             # whole transactions up to this size are read at once
_LOAD_READAHEAD = 4 << 10             # first read of a data record: header + small pickles


def _check_fs_magic(magic: bytes, path: str) -> None:
    """Accept Python 3 (FS30) and Python 2 (FS21) FileStorage files.

    Ours to do because we parse the file ourselves; ZODB's FileStorage would
    reject FS21 on Python 3 although the record layout is identical."""
    if magic not in _MAGICS:
        raise ValueError(f"{path}: not a FileStorage file (magic {magic!r}, "
                         f"expected one of {_MAGICS})")


_MMAP_MIN = 256 * 1024     # records at least this big are served from a map of Data.fs


def _pread_exact(fd: int, n: int, pos: int) -> bytes:
    data = os.pread(fd, n, pos)
    if len(data) == n:
        return data
    chunks = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, pos + got)
        if not more:
            raise CorruptedDataError(None, b"".join(chunks), pos)
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


class _Txn(NamedTuple):
    tid: bytes
    status: bytes                      # b" ", b"p" or b"u" (legacy undone: not indexed)
    pos: int                           # offset of the transaction header
    end: int                           # offset just past its redundant length
    records: list[tuple[bytes, int]]   # (oid, data record offset), file order

    def oids(self) -> frozenset[bytes]:
        return frozenset(oid for oid, _ in self.records)


class _FSGeneration:
    """One opened incarnation (inode) of a Data.fs and the index over it.

    ``index``, ``pos``, ``last_tid`` only ever move forward and are written
    by the feed thread alone (or during construction).  ``_index_lock``
    protects ``index`` (an fsIndex is not thread-safe by itself); loaders
    read nothing else that changes.  The descriptor is closed when the last
    reference goes, so a load still using a replaced generation never reads
    from a recycled descriptor number.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(self.fd)
            self.ident = (st.st_dev, st.st_ino)
            _check_fs_magic(os.pread(self.fd, 4, 0), path)
            self.index = fsIndex()
            self._index_lock = threading.Lock()
            self.pos = 4                 # end of the last accepted transaction
            self.last_tid = z64
            # Highest tid of the packed ('p') prefix; None = not computed yet.
            self._packed_tid: bytes | None = z64
            self._packed_lock = threading.Lock()   # protects computing _packed_tid
            self._map: mmap.mmap | None = None     # read-only map of [0, _map_len)
            self._map_len = 0
            self._map_lock = threading.Lock()      # protects _map/_map_len (replacing a map)
            self._load_index_file()
            self._initial_scan()
        except BaseException:
            fd, self.fd = self.fd, -1
            os.close(fd)
            raise

    def __del__(self, _close=os.close) -> None:    # (os may be gone at interpreter exit)
        fd = getattr(self, "fd", -1)
        if fd >= 0:
            self.fd = -1
            _close(fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def _payload(self, pos: int, n: int) -> bytes | memoryview:
        """``n`` bytes at ``pos``: a zero-copy view of a map of the file for large records.

        Block records (up to a few MiB) are served to the kernel straight
        from the page cache of Data.fs this way, with no copy in between.  A
        map only ever covers committed, complete transactions (nothing past
        the indexed end), which FileStorage never truncates; a replaced file
        (pack) is a new generation with its own map.  A map that grew stays
        alive while views of it are used (the views reference it).
        """
        if n < _MMAP_MIN:
            return _pread_exact(self.fd, n, pos)
        end = pos + n
        with self._map_lock:
            m = self._map
            if m is None or end > self._map_len:
                length = max(end, self.pos)
                m = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ)
                self._map, self._map_len = m, length
        return memoryview(m)[pos:end]

    # -- reading transactions --------------------------------------------------

    def read_txn(self, pos: int, size: int) -> _Txn | None:
        """Parse and validate the transaction at ``pos``.

        None: nothing there yet, or it is still being committed (partial
        header, status 'c').  CorruptedError: malformed -- which, at the very
        end of a file being written, can be transient (see TAIL_GRACE)."""
        fd = self.fd
        if pos + TRANS_HDR_LEN > size:
            return None
        head = os.pread(fd, min(_TXN_READAHEAD, size - pos), pos)
        if len(head) < TRANS_HDR_LEN:
            return None                  # the file shrank under us; look again later
        tid, tlen, status, ulen, dlen, elen = _TXN_HDR.unpack_from(head)
        if status == b"c":
            return None
        name = self.path
        if status not in b" pu":
            raise CorruptedError(f"{name}:{pos}: invalid transaction status {status!r}")
        hdrlen = TRANS_HDR_LEN + ulen + dlen + elen
        if tlen < hdrlen:
            raise CorruptedError(f"{name}:{pos}: transaction length {tlen} < header length {hdrlen}")
        tend = pos + tlen                # offset of the redundant length
        if tend + 8 > size:
            raise CorruptedError(f"{name}:{pos}: committed transaction {tid.hex()} "
                                 f"extends past the end of the file")

        def rd(off: int, n: int) -> bytes:
            i = off - pos
            if i + n <= len(head):
                return head[i:i + n]
            return _pread_exact(fd, n, off)

        if u64(rd(tend, 8)) != tlen:
            raise CorruptedError(f"{name}:{pos}: redundant transaction length mismatch")
        records: list[tuple[bytes, int]] = []
        p = pos + hdrlen
        while p < tend:
            if p + DATA_HDR_LEN > tend:
                raise CorruptedError(f"{name}:{p}: data record header crosses transaction end")
            raw = rd(p, DATA_HDR_LEN + 8)
            oid, dtid, prev, tloc, vlen, plen = _DATA_HDR.unpack_from(raw)
            rlen = DATA_HDR_LEN + (plen or 8)
            if dtid != tid or tloc != pos or vlen or prev >= p or p + rlen > tend:
                raise CorruptedError(f"{name}:{p}: data record of oid {oid.hex()} inconsistent "
                                     f"with transaction {tid.hex()} at {pos}")
            if not plen and u64(raw[DATA_HDR_LEN:DATA_HDR_LEN + 8]) >= p:
                raise CorruptedError(f"{name}:{p}: invalid back pointer")
            records.append((oid, p))
            p += rlen
        if p != tend:
            raise CorruptedError(f"{name}:{pos}: data records overrun the transaction")
        return _Txn(tid, status, pos, tend + 8, records)

    def accept(self, txn: _Txn) -> None:
        """Index a validated transaction that starts at ``self.pos``."""
        if txn.status != b"u":
            index = self.index
            with self._index_lock:
                for oid, p in txn.records:   # later records of one oid win, as in FileStorage
                    index[oid] = p
        if txn.status == b"p" and self._packed_tid is not None:
            self._packed_tid = txn.tid
        self.last_tid = txn.tid
        self.pos = txn.end

    def _initial_scan(self) -> None:
        # A transaction being written right now may look malformed for an
        # instant (a concurrent reader can see a write half done); only a
        # persistent problem is corruption.
        deadline = time.monotonic() + 1.0
        while True:
            size = self.size()
            try:
                while (txn := self.read_txn(self.pos, size)) is not None:
                    if txn.tid <= self.last_tid:
                        log.warning("%s: time-stamp reduction at %d: %s <= %s", self.path,
                                    txn.pos, txn.tid.hex(), self.last_tid.hex())
                    self.accept(txn)
                return
            except CorruptedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def locate_end(self, tid: bytes) -> int | None:
        """Offset just past the transaction ``tid`` (searching back from the
        end of what is indexed), or None if the file has no such transaction."""
        pos = self.pos
        while pos > 4:
            tlen = u64(_pread_exact(self.fd, 8, pos - 8))
            tpos = pos - 8 - tlen
            if tpos < 4:
                break
            htid, htlen = _TXN_HDR.unpack(_pread_exact(self.fd, TRANS_HDR_LEN, tpos))[:2]
            if htlen != tlen:
                raise CorruptedError(f"{self.path}:{tpos}: redundant transaction length mismatch")
            if htid == tid:
                return pos
            if htid < tid:
                break
            pos = tpos
        return None

    # -- the .index file written by FileStorage -------------------------------

    def _load_index_file(self) -> None:
        """Start from FileStorage's saved index when it matches the file.

        Checked like FileStorage does: the transaction ending at the saved
        position must be valid and its records must be what the index points
        to.  Anything doubtful means a full scan instead."""
        name = self.path + ".index"
        try:
            info = fsIndex.load(name)
        except FileNotFoundError:
            return
        except Exception as e:  # noqa: BLE001 - any unreadable index just means "scan"
            log.warning("%s: ignoring unreadable index file: %s", name, e)
            return
        if not isinstance(info, dict):
            return
        index, pos = info.get("index"), info.get("pos")
        if not isinstance(index, fsIndex) or not isinstance(pos, int):
            return
        last = self._index_sane(index, pos)
        if last is None:
            log.info("%s: index file does not match the data file; scanning", name)
            return
        self.index, self.pos, self.last_tid = index, pos, last
        self._packed_tid = None          # unknown without a scan; computed on demand

    def _index_sane(self, index: fsIndex, pos: int) -> bytes | None:
        """Last tid covered by a saved (index, pos), or None if they do not
        describe this file: the transaction ending at ``pos`` must be valid,
        and the records of the newest non-empty transaction (at most 5 back)
        must be exactly where the index points."""
        size = self.size()
        if pos == 4:
            return z64 if not len(index) else None
        if not 4 < pos <= size:
            return None
        last = None
        end = pos
        try:
            for _ in range(5):
                tlen = u64(_pread_exact(self.fd, 8, end - 8))
                tpos = end - 8 - tlen
                if tpos < 4:
                    return None
                txn = self.read_txn(tpos, size)
                if txn is None or txn.end != end:
                    return None
                last = last or txn.tid
                if txn.status != b"u" and txn.records:
                    latest = dict(txn.records)        # the last record of an oid wins
                    if any(index.get(oid) != p for oid, p in latest.items()):
                        return None
                    return last
                if tpos == 4:
                    return last
                end = tpos
            return last
        except (CorruptedError, OSError):
            return None

    # -- loading -------------------------------------------------------------------

    def packed_tid(self) -> bytes:
        pt = self._packed_tid
        if pt is None:
            with self._packed_lock:
                if self._packed_tid is None:
                    self._packed_tid = self._scan_packed_prefix()
                pt = self._packed_tid
        return pt

    def _scan_packed_prefix(self) -> bytes:
        # A pack rewrites the file as a prefix of 'p' transactions followed by
        # verbatim ones, so the packed region ends at the first non-'p'.
        pos, last, end = 4, z64, self.pos
        while pos < end:
            tid, tlen, status = _TXN_HDR.unpack(_pread_exact(self.fd, TRANS_HDR_LEN, pos))[:3]
            if status != b"p":
                break
            last = tid
            pos += tlen + 8
        return last

    def not_found(self, oid: bytes, before: bytes) -> POSKeyError:
        packed = self.packed_tid()
        if packed != z64 and before <= packed:
            return HistoryLost(oid, before, packed)
        return POSKeyError(oid)

    def load_before(self, oid: bytes, before: bytes) -> tuple[bytes, bytes, bytes | None]:
        with self._index_lock:
            pos = self.index.get(oid)
        if pos is None:
            raise self.not_found(oid, before)
        fd = self.fd
        next_serial = None
        while True:
            buf = os.pread(fd, _LOAD_READAHEAD, pos)
            if len(buf) < DATA_HDR_LEN:
                raise CorruptedDataError(oid, buf, pos)
            doid, serial, prev, _tloc, _vlen, plen = _DATA_HDR.unpack_from(buf)
            if doid != oid:
                raise CorruptedDataError(oid, buf[:DATA_HDR_LEN], pos)
            if serial < before:
                break
            next_serial = serial
            pos = prev
            if not pos:                  # created at or after `before`
                raise self.not_found(oid, before)
        if plen:
            if DATA_HDR_LEN + plen <= len(buf):
                return buf[DATA_HDR_LEN:DATA_HDR_LEN + plen], serial, next_serial
            return self._payload(pos + DATA_HDR_LEN, plen), serial, next_serial
        # No data here: a back pointer (undo) to an older record holding it,
        # or 0 = the object does not exist in this revision.
        back = u64(buf[DATA_HDR_LEN:DATA_HDR_LEN + 8]) if len(buf) >= DATA_HDR_LEN + 8 else 0
        while back:
            bbuf = _pread_exact(fd, DATA_HDR_LEN + 8, back)
            boid, _, _, _, _, bplen = _DATA_HDR.unpack_from(bbuf)
            if boid != oid:
                raise CorruptedDataError(oid, bbuf[:DATA_HDR_LEN], back)
            if bplen:
                return self._payload(back + DATA_HDR_LEN, bplen), serial, next_serial
            back = u64(bbuf[DATA_HDR_LEN:])
        raise ObjectDeleted(oid, serial)


class _FileZStor(ZStor):
    """FileStorage followed through the file; see the module docstring.

    Feed-thread-only state: ``_last``, ``_pending``, ``_bad_since``,
    ``_missing_since``.  ``_gen`` is replaced (one reference assignment) by
    the feed thread on re-open and read once per load by loaders.
    """

    def __init__(self, zurl: str, path: str, poll_interval: float):
        self.zurl = zurl
        self._path = os.path.abspath(path)
        self._poll_interval = poll_interval
        self._closed = threading.Event()
        self._gen: _FSGeneration | None = _FSGeneration(self._path)
        self.head = self._gen.last_tid
        self._last = self.head
        self._pending: collections.deque[Commit] = collections.deque()
        self._bad_since: float | None = None
        self._missing_since: float | None = None
        log.debug("%s: opened at head %s (%d oids)", self._path, self.head.hex(),
                  len(self._gen.index))

    def load_before(self, oid: bytes, before: bytes) -> tuple[bytes, bytes, bytes | None]:
        gen = self._gen
        if gen is None:
            raise ZStorError(f"{self.zurl}: closed")
        return gen.load_before(oid, before)

    def close(self) -> None:
        self._closed.set()
        # Loads in flight keep their generation (and its descriptor) alive.
        self._gen = None

    def _next_commit(self, timeout: float | None) -> Commit | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed.is_set():
                raise FeedError(f"{self.zurl}: closed")
            if self._pending:
                return self._pending.popleft()
            gen = self._gen
            if gen is None:
                raise FeedError(f"{self.zurl}: closed")
            try:
                self._poll(gen)
            except FeedError:
                raise
            except Exception as e:
                raise FeedError(f"{self.zurl}: following {self._path} after "
                                f"{self._last.hex()} failed: {e}") from e
            if self._pending:
                continue
            if not self._pause(deadline):
                return None

    def _poll(self, gen: _FSGeneration) -> None:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == gen.ident:
            self._missing_since = None
            size = st.st_size
            if size < gen.pos:           # committed data vanished in place
                self._reopen("shrunk")
            else:
                self._advance(gen, size)
            return
        # Replaced (pack renames a new file over it) or momentarily missing
        # (between the two renames of a pack).  The old inode no longer grows:
        # deliver everything it still has first.
        self._advance(gen, gen.size())
        if st is None:
            now = time.monotonic()
            self._missing_since = self._missing_since or now
            if now - self._missing_since > TAIL_GRACE:
                raise FeedError(f"{self.zurl}: {self._path} disappeared")
            return
        self._missing_since = None
        self._reopen("replaced")

    def _advance(self, gen: _FSGeneration, size: int) -> None:
        while True:
            try:
                txn = gen.read_txn(gen.pos, size)
            except CorruptedError as e:
                now = time.monotonic()
                self._bad_since = self._bad_since or now
                if now - self._bad_since > TAIL_GRACE:
                    raise FeedError(f"{self.zurl}: {e}") from e
                return
            self._bad_since = None
            if txn is None:
                return
            if txn.tid <= gen.last_tid or txn.tid <= self._last:
                raise FeedError(f"{self.zurl}: {self._path}:{txn.pos}: transaction "
                                f"{txn.tid.hex()} is not after {self._last.hex()}")
            gen.accept(txn)                          # visible to loads first,
            if txn.status != b"u":
                self._pending.append(Commit(txn.tid, txn.oids()))   # then delivered
                self._last = txn.tid

    def _reopen(self, why: str) -> None:
        """Switch to a fresh open of the path, delivering what follows the
        last delivered transaction in it -- which it must contain."""
        new = _FSGeneration(self._path)
        last = self._last
        start = 4 if last == z64 else new.locate_end(last)
        if start is None:
            raise FeedError(
                f"{self.zurl}: {self._path} was replaced (pack?) and no longer contains "
                f"the last delivered transaction {last.hex()}; cannot continue without a gap")
        commits = []
        pos = start
        while pos < new.pos:
            txn = new.read_txn(pos, new.pos)
            if txn is None:
                raise FeedError(f"{self.zurl}: {self._path}:{pos}: unreadable after re-open")
            if txn.status == b"p" and txn.tid > last:
                raise FeedError(f"{self.zurl}: {self._path}: transaction {txn.tid.hex()} was "
                                f"packed before it could be delivered; its oid set is incomplete")
            if txn.status != b"u":
                commits.append(Commit(txn.tid, txn.oids()))
            pos = txn.end
        self._gen = new
        self._pending.extend(commits)
        if commits:
            self._last = commits[-1].tid
        log.info("%s: re-opened (%s); continuing after %s with %d transaction(s) to deliver",
                 self._path, why, last.hex(), len(commits))


# ---------------------------------------------------------------------------
# ZEO.

class _EventQueue:
    """Events from ZEO's IO thread to the feed thread; ``_cond`` protects ``_q``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._q: collections.deque[tuple] = collections.deque()
        self.closed = False

    def push(self, ev: tuple) -> None:
        with self._cond:
            self._q.append(ev)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def pop(self, until: float | None) -> tuple | None:
        """Next event; None when ``until`` (monotonic) passes; ("closed",) once closed."""
        with self._cond:
            while True:
                if self.closed:
                    return ("closed",)
                if self._q:
                    return self._q.popleft()
                if until is None:
                    self._cond.wait()
                else:
                    left = until - time.monotonic()
                    if left <= 0:
                        return None
                    self._cond.wait(left)


class _ZEOListener:
    """The "database" registered with ClientStorage: receives its callbacks
    in ZEO's IO thread and queues them for the feed."""

    def __init__(self, events: _EventQueue):
        self._events = events

    def invalidate(self, tid: bytes, oids) -> None:
        self._events.push(("inv", tid, frozenset(oids)))

    def invalidateCache(self) -> None:     # noqa: N802 - ZODB's name
        self._events.push(("reset",))

    @staticmethod
    def transform_record_data(data: bytes) -> bytes:
        return data

    @staticmethod
    def untransform_record_data(data: bytes) -> bytes:
        return data


def _zeo_client_class():
    from ZEO.ClientStorage import ClientStorage

    class FollowingClientStorage(ClientStorage):
        """ClientStorage that also tells the feed about disconnections, so
        that notices arriving before the reconnect completes are distrusted."""

        def __init__(self, *args, on_disconnect: Callable[[], None], **kw):
            self._zstor_on_disconnect = on_disconnect
            super().__init__(*args, **kw)

        def notify_disconnected(self) -> None:
            super().notify_disconnected()
            self._zstor_on_disconnect()

    return FollowingClientStorage


class _ZEOZStor(ZStor):
    """ZEO: feed from invalidations, iterator replay after reconnects.

    Feed-thread-only state: ``_last``, ``_ready``, ``_synced``,
    ``_down_since``.  ``_events`` is shared with ZEO's IO thread.
    """

    def __init__(self, zurl: str, addr, storage: str, reconnect_timeout: float):
        self.zurl = zurl
        self._reconnect_timeout = reconnect_timeout
        self._events = _EventQueue()
        cls = _zeo_client_class()
        try:
            self._cs = cls(addr, storage=storage, read_only=True, wait=True,
                           wait_timeout=reconnect_timeout,
                           on_disconnect=lambda: self._events.push(("disconnected",)))
        except Exception as e:
            raise ZStorError(f"{zurl}: cannot connect to ZEO server {addr!r}: {e}") from e
        try:
            # Subscribe, then make sure every notice the IO thread handled before
            # the subscription has also updated the client's last tid (a server
            # round trip is processed after them), then read the head.
            self._cs.registerDB(_ZEOListener(self._events))
            self._cs.ping()
            self.head = self._cs.lastTransaction()
        except Exception:
            self._cs.close()
            raise
        self._last = self.head
        self._ready: collections.deque[Commit] = collections.deque()
        self._synced = True
        self._down_since: float | None = None
        self._close_lock = threading.Lock()   # makes close() run once
        self._closed = False

    def load_before(self, oid: bytes, before: bytes) -> tuple[bytes, bytes, bytes | None]:
        try:
            r = self._cs.loadBefore(oid, before)
        except POSKeyError:
            # FileStorage behind ZEO raises for a deletion record and for an
            # oid it never had; only a deleted object has a history.
            try:
                self._cs.history(oid, 1)
            except POSKeyError:
                raise POSKeyError(oid) from None
            raise ObjectDeleted(oid) from None
        if r is None:                    # created later
            raise POSKeyError(oid)
        return r

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._events.close()
        self._cs.close()

    def _next_commit(self, timeout: float | None) -> Commit | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ready:
                return self._ready.popleft()
            until = deadline
            if not self._synced:
                limit = self._down_since + self._reconnect_timeout
                if time.monotonic() > limit:
                    raise FeedError(f"{self.zurl}: disconnected from the ZEO server for more "
                                    f"than {self._reconnect_timeout:g}s (last delivered "
                                    f"{self._last.hex()})")
                until = limit if until is None else min(until, limit)
            ev = self._events.pop(until)
            if ev is None:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue                 # the reconnect deadline: checked at the top
            kind = ev[0]
            if kind == "closed":
                raise FeedError(f"{self.zurl}: closed")
            if kind == "inv":
                _, tid, oids = ev
                if self._synced and tid > self._last:
                    self._ready.append(Commit(tid, oids))
                    self._last = tid
                # else: a duplicate, or a notice from a reconnect (possibly
                # merging several transactions) -- the replay covers it.
            elif kind == "disconnected":
                self._mark_down()
            elif kind == "reset":        # (re)connected, cache verified or dropped
                self._mark_down()
                self._catch_up()

    def _mark_down(self) -> None:
        if self._synced:
            log.warning("%s: ZEO connection lost after %s; will replay missed transactions",
                        self.zurl, self._last.hex())
        self._synced = False
        self._down_since = self._down_since or time.monotonic()

    def _catch_up(self) -> None:
        from ZEO.Exceptions import ClientDisconnected
        last = self._last
        missed: list[Commit] = []
        try:
            it = self._cs.iterator(start=last if last != z64 else None)
            first = True
            for txn in it:
                tid = txn.tid
                if first and last != z64:
                    first = False
                    if tid != last:
                        raise FeedError(f"{self.zurl}: after reconnecting, the server no longer "
                                        f"has the last delivered transaction {last.hex()} "
                                        f"(first is {tid.hex()}); cannot continue without a gap")
                    continue
                first = False
                if tid <= last:
                    continue
                missed.append(Commit(tid, frozenset(rec.oid for rec in txn)))
            if first and last != z64:
                # Nothing at or after the last delivered transaction: the server
                # went back to an older database (e.g. a restored backup).
                raise FeedError(f"{self.zurl}: after reconnecting, the server has nothing at or "
                                f"after the last delivered transaction {last.hex()}; "
                                "cannot continue without a gap")
        except ClientDisconnected as e:
            # Down again; the next reconnect retries (bounded by reconnect_timeout).
            log.info("%s: disconnected again while catching up: %s", self.zurl, e)
            return
        except FeedError:
            raise
        except Exception as e:
            raise FeedError(f"{self.zurl}: cannot replay transactions after "
                            f"{last.hex()} from the ZEO server: {e}") from e
        # The replay's round trips came after the server queued the
        # invalidations of everything it returned (ZEO sends them from inside
        # tpc_finish, before the data is visible), so the cache is current.
        self._ready.extend(missed)
        if missed:
            self._last = missed[-1].tid
        self._synced = True
        self._down_since = None
        log.info("%s: ZEO connection back; replayed %d missed transaction(s)",
                 self.zurl, len(missed))


# ---------------------------------------------------------------------------
# RelStorage on PostgreSQL.

def _open_relstorage(zurl: str):
    """RelStorage from a zodburi ``postgres://`` URL, forced read-only and
    without schema creation; returns (storage, adapter)."""
    from relstorage.options import Options
    from relstorage.storage import RelStorage
    from relstorage.zodburi_resolver import postgresql_resolver as resolver
    from ZODB.POSException import StorageError

    u = urlsplit("http://" + zurl.split("://", 1)[1])
    kw = dict(parse_qsl(u.query))
    adapter_factory, kw = resolver.adapter_helper(u, kw)
    kw, unused = resolver.interpret_kwargs(kw)
    unknown = set(unused) - _ZODBURI_DB_PARAMS
    if unknown:
        raise ValueError(f"{zurl}: unsupported RelStorage URL parameter(s) {sorted(unknown)}")
    if kw.pop("demostorage", False):
        raise ValueError(f"{zurl}: demostorage keeps changes in memory; cannot be served")
    if kw.get("keep_history", True) is False:
        raise ValueError(f"{zurl}: history-free RelStorage is not supported: the WCFS server "
                         f"needs past revisions (history-preserving schema required)")
    kw.update(read_only=True, create_schema=False)
    kw.setdefault("cache_local_mb", 0)   # our loads bypass RelStorage's cache anyway
    options = Options(**kw)
    adapter = adapter_factory(options)
    try:
        storage = RelStorage(adapter=adapter, options=options)
    except StorageError as e:
        adapter.release()
        if "history-free" in str(e):
            raise ValueError(f"{zurl}: history-free RelStorage database is not supported: "
                             f"the WCFS server needs past revisions ({e})") from e
        raise ZStorError(f"{zurl}: cannot open RelStorage: {e}") from e
    return storage, adapter


class _RelZStor(ZStor):
    """RelStorage (PostgreSQL, history-preserving): SQL polling feed and a
    bounded pool of storage instances for loads.

    RelStorage instances are single-threaded, and each holds a database
    connection.  Loads check an instance out of the pool and back in: the
    number of connections stays bounded by ``MAX_LOAD_INSTANCES`` however many
    threads load (libfuse creates and retires worker threads all the time; an
    instance per thread would exhaust PostgreSQL's connection limit).

    Feed-thread-only: ``_last``, ``_pending``, ``_down_since``.
    ``_feed_lock`` protects the feed connection ``_conn``/``_cursor`` (used by
    the feed thread, closed by close()).  ``_delivered`` (int tid) is written
    by the feed thread and read by loaders (one reference assignment).
    ``_pool_cond`` protects ``_idle`` and ``_ninst``.
    """

    MAX_LOAD_INSTANCES = 8

    _NEW_TXNS = ('SELECT t.tid, t.packed, s.zoid FROM "transaction" t '
                 'LEFT JOIN object_state s ON s.tid = t.tid '
                 'WHERE t.tid > %s ORDER BY t.tid')
    _HAS_TXN = 'SELECT 1 FROM "transaction" WHERE tid = %s'

    def __init__(self, zurl: str, poll_interval: float, reconnect_timeout: float):
        self.zurl = zurl
        self._poll_interval = poll_interval
        self._reconnect_timeout = reconnect_timeout
        self._closed = threading.Event()
        self._storage, adapter = _open_relstorage(zurl)
        self._connmanager = adapter.connmanager
        self._feed_lock = threading.Lock()
        self._conn = self._cursor = None
        try:
            self._connect()
            self._cursor.execute('SELECT COALESCE(MAX(tid), 0) FROM "transaction"')
            head_int = self._cursor.fetchone()[0]
            self._connmanager.rollback_quietly(self._conn, self._cursor)
        except Exception:
            self._disconnect()
            self._storage.close()
            raise
        self.head = p64(head_int)
        self._last = head_int
        self._delivered = head_int
        self._pending: collections.deque[Commit] = collections.deque()
        self._down_since: float | None = None
        self._pool_cond = threading.Condition()
        self._idle: list[list] = []      # [instance, last tid it was synced to]
        self._ninst = 0                  # instances in existence (idle + checked out)

    # -- loads ---------------------------------------------------------------------

    def _checkout(self) -> list:
        with self._pool_cond:
            while True:
                if self._closed.is_set():
                    raise ZStorError(f"{self.zurl}: closed")
                if self._idle:
                    return self._idle.pop()
                if self._ninst < self.MAX_LOAD_INSTANCES:
                    self._ninst += 1
                    break
                self._pool_cond.wait()
        try:
            return [self._storage.new_instance(), -1]   # -1: synced on first use
        except BaseException:
            with self._pool_cond:
                self._ninst -= 1
                self._pool_cond.notify()
            raise

    def _checkin(self, slot: list) -> None:
        with self._pool_cond:
            if not self._closed.is_set():
                self._idle.append(slot)
                self._pool_cond.notify()
                return
            self._ninst -= 1
        slot[0].release()

    def load_before(self, oid: bytes, before: bytes) -> tuple[bytes, bytes, bytes | None]:
        slot = self._checkout()
        try:
            inst = slot[0]
            want = self._delivered
            try:
                if slot[1] < want:
                    inst.poll_invalidations()   # new snapshot: sees everything delivered
                    slot[1] = want
                r = inst.loadBefore(oid, before)
            except POSKeyError:
                raise
            except Exception:
                slot[1] = -1             # resync (and reconnect) before its next load
                raise
        finally:
            self._checkin(slot)
        if r is None:                    # created later
            raise POSKeyError(oid)
        data, serial, next_serial = r
        if not data:                     # NULL state: undone creation / deleted
            raise ObjectDeleted(oid, serial)
        return data, serial, next_serial

    # -- feed ----------------------------------------------------------------------

    def _connect(self) -> None:
        self._conn, self._cursor = self._connmanager.open_for_load()

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._connmanager.close(self._conn, self._cursor)
        self._conn = self._cursor = None

    def _poll(self) -> None:
        with self._feed_lock:
            if self._closed.is_set():
                return
            self._poll_locked()

    def _poll_locked(self) -> None:
        last = self._last
        if self._conn is None:
            self._connect()
        cur = self._cursor
        try:
            cur.execute(self._NEW_TXNS, (last,))
            rows = cur.fetchall()
            if rows and last:
                cur.execute(self._HAS_TXN, (last,))
                if not cur.fetchall():
                    raise FeedError(f"{self.zurl}: the last delivered transaction "
                                    f"{p64(last).hex()} vanished (packed?); cannot "
                                    f"continue without a gap")
        finally:
            # Each poll gets a fresh snapshot.
            self._connmanager.rollback_quietly(self._conn, cur)
        commits: list[Commit] = []
        tid = None
        oids: set[bytes] = set()
        for rtid, packed, zoid in rows:
            if packed:
                raise FeedError(f"{self.zurl}: transaction {p64(rtid).hex()} was packed "
                                f"before it could be delivered; its oid set is incomplete")
            if rtid != tid:
                if tid is not None:
                    commits.append(Commit(p64(tid), frozenset(oids)))
                tid, oids = rtid, set()
            if zoid is not None:
                oids.add(p64(zoid))
        if tid is not None:
            commits.append(Commit(p64(tid), frozenset(oids)))
        self._pending.extend(commits)
        if commits:
            self._last = u64(commits[-1].tid)

    def _next_commit(self, timeout: float | None) -> Commit | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed.is_set():
                raise FeedError(f"{self.zurl}: closed")
            if self._pending:
                c = self._pending.popleft()
                self._delivered = u64(c.tid)
                return c
            try:
                self._poll()
                self._down_since = None
            except FeedError:
                raise
            except Exception as e:
                with self._feed_lock:
                    self._disconnect()
                now = time.monotonic()
                if self._down_since is None:
                    log.warning("%s: feed query failed (%s); retrying", self.zurl, e)
                self._down_since = self._down_since or now
                if now - self._down_since > self._reconnect_timeout:
                    raise FeedError(f"{self.zurl}: cannot poll the database for more than "
                                    f"{self._reconnect_timeout:g}s after "
                                    f"{p64(self._last).hex()}: {e}") from e
            if self._pending:
                continue
            if not self._pause(deadline):
                return None

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._pool_cond:
            idle, self._idle = self._idle, []
            self._ninst -= len(idle)
            self._pool_cond.notify_all()
        for inst, _ in idle:
            try:
                inst.release()
            except Exception as e:  # noqa: BLE001 - best effort while closing
                log.debug("%s: releasing a load instance: %s", self.zurl, e)
        with self._feed_lock:            # waits for a poll in progress, at most
            self._disconnect()
        self._storage.close()
