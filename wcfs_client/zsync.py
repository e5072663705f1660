"""A WCFS Conn kept in sync with a ZODB Connection (WCFS.md §5.3).

``wconn_of(zconn)`` gives the ``wcfs_client.Conn`` whose view (``at``) is
the view of the ZODB connection ``zconn``: created on first call (join the
server of the connection's database, connect at the connection's view), the
same object afterwards.  A synchroniser (`_ZSync`) keeps the pair together:

* After every call of ``zconn.newTransaction`` -- the one place where ZODB 5/6
  moves a connection's view: on open, after commit/abort, on explicit begin --
  it resyncs the Conn to the new view.  The hook is a per-instance wrapper of
  ``newTransaction`` (an instance attribute shadowing the class method), not a
  transaction synchroniser: those run in an unspecified order relative to the
  connection's own, so they could see the old view.  Per instance rather
  than a class-level patch so that connections that never use WCFS (and
  other Connection subclasses) run ZODB's code untouched, and so that
  releasing the synchroniser simply removes the attribute.  A view that did
  not move costs no server round trip.
* A connection returned to the pool keeps its Conn at the old view; it is
  resynced when the connection is reopened (open calls newTransaction).
* The Conn is released when the connection is garbage collected (weak
  reference) or right before its ``DB.close`` (a per-instance wrapper of
  ``close``), whichever comes first, and only once: the synchroniser is
  unregistered and ``wconn.close(); wc.close()`` is handed to a background
  thread.  Closing may block (it talks to the server) and must never run in
  a weakref callback, which can fire inside any allocation of any thread --
  possibly one holding our locks -- so the callback only puts a job on a
  ``queue.SimpleQueue`` (safe there: no lock of ours, reentrant put).  An
  ``atexit`` hook waits, bounded, for the queued releases.

Errors at a transaction boundary are logged, not raised: ``newTransaction``
runs inside ``commit``/``abort`` of the transaction manager, where an
exception would make a successful commit look failed.  A failed resync
leaves the Conn closed (the C++ core closes it on any resync error), so the
synchroniser releases itself and the next ``wconn_of(zconn)`` connects anew;
holders of the old Conn get "connection closed".

Concurrency: `_mu` protects the module registry `_registry` (which keeps
synchronisers alive) and the DB-close hooks' sets of synchronisers; each
synchroniser's ``_mu`` protects its state (``_released``) and serialises its
resyncs with its release.  Lock order: a synchroniser's ``_mu``, then `_mu`.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import weakref
from typing import Any, Callable
from urllib.parse import quote

from ZODB.Connection import Connection
from ZODB.POSException import ConnectionStateError
from ZODB.utils import p64, u64

import wcfs_client

__all__ = ["wconn_of", "zconn_at", "zurl_of", "record_zurl"]

log = logging.getLogger("wcfs_client")

EXIT_WAIT = 10.0        # atexit: at most this long for pending releases

_mu = threading.Lock()                    # protects _registry and every _DBCloseHook.syncs
_registry: set["_ZSync"] = set()          # live synchronisers (keeps them alive)
_ATTR = "_wcfs_zsync"                     # zconn attribute: its live _ZSync

# Releases are done by one worker thread fed through a SimpleQueue; the
# worker is started lazily (never from a weakref callback) and anew in a
# forked child.
_jobs: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
_worker_mu = threading.Lock()             # protects _worker
_worker: threading.Thread | None = None

# URIs recorded by record_zurl for storages whose URI cannot be derived from
# the storage object (RelStorage).
_recorded_mu = threading.Lock()           # protects _recorded
_recorded: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------
# Helpers: the view of a connection, the zurl of a storage.

def zconn_at(zconn: Connection) -> bytes:
    """The tid the view of an opened ZODB connection is at (8 bytes).

    ZODB >= 5: ``_start - 1`` of the connection's MVCC adapter instance, or
    ``before - 1`` of a historical connection.  RelStorage (an IMVCCStorage:
    the connection holds a storage instance of its own): the highest tid its
    current snapshot sees.  ConnectionStateError if the connection is closed
    or has no view yet (explicit transaction manager before ``begin``).
    """
    from ZODB.mvccadapter import HistoricalStorageAdapter, MVCCAdapterInstance

    if zconn.opened is None:
        raise ConnectionStateError(f"{zconn!r}: connection is closed")
    # _normal_storage, not _storage: inside a savepoint _storage is a TmpStore.
    stor = zconn._normal_storage
    if stor is None:
        raise ConnectionStateError(f"{zconn!r}: its database is closed")
    if isinstance(stor, MVCCAdapterInstance):
        start = stor._start
        if start is None:
            raise ConnectionStateError(f"{zconn!r}: no transaction started yet (no view)")
        return p64(u64(start) - 1)
    if isinstance(stor, HistoricalStorageAdapter):
        return p64(u64(stor._before) - 1)
    if _is_relstorage(stor):
        # The instance polls in newTransaction (poll_invalidations) and reads
        # through one database snapshot until the next poll; the highest tid
        # it has seen there (or committed itself) is its view.
        tid = stor.highest_visible_tid
        if not tid:
            raise ConnectionStateError(f"{zconn!r}: RelStorage instance has not polled yet (no view)")
        return p64(tid)
    raise NotImplementedError(f"{zconn!r}: cannot determine the view of a connection "
                              f"over {type(stor).__module__}.{type(stor).__qualname__}")


def _is_relstorage(storage: Any) -> bool:
    return type(storage).__module__.split(".", 1)[0] == "relstorage"


def record_zurl(storage: Any, zurl: str) -> None:
    """Remember the zodburi URI `storage` was opened from (for `zurl_of`).

    Needed for RelStorage, whose URI cannot be derived from the storage
    object; call it right after opening the storage.
    """
    with _recorded_mu:
        _recorded[storage] = zurl


def _recorded_zurl(storage: Any) -> str | None:
    with _recorded_mu:
        try:
            return _recorded.get(storage)
        except TypeError:           # not weak-referenceable: never recorded
            return None


def zurl_of(storage: Any) -> str:
    """The URL a WCFS server opens to serve the database of `storage`.

    FileStorage -> ``file://<abs path>``; ZEO client -> ``zeo://host:port``
    (IPv6 host in brackets) or ``zeo://<unix socket path>``, plus
    ``?storage=<name>`` unless the name is "1"; DemoStorage ->
    ``demo:(<base>)/(<changes>)``; RelStorage -> the URI given to
    `record_zurl`.  MappingStorage -> ValueError (it lives in this process's
    RAM); anything else (and ZEO with several servers) -> NotImplementedError.
    """
    from ZEO.ClientStorage import ClientStorage
    from ZODB.DemoStorage import DemoStorage
    from ZODB.FileStorage import FileStorage
    from ZODB.MappingStorage import MappingStorage

    if isinstance(storage, FileStorage):
        return "file://" + os.path.abspath(storage._file_name)
    if isinstance(storage, ClientStorage):
        return _zeo_zurl(storage)
    if isinstance(storage, DemoStorage):
        return f"demo:({zurl_of(storage.base)})/({zurl_of(storage.changes)})"
    if isinstance(storage, MappingStorage):
        raise ValueError(f"{storage!r}: MappingStorage lives in this process's memory; "
                         f"a WCFS server cannot open it")
    recorded = _recorded_zurl(storage)
    if recorded is not None:
        return recorded
    if _is_relstorage(storage):
        raise ValueError(f"{storage!r}: no zodburi URI recorded for this RelStorage: call "
                         f"wcfs_client.zsync.record_zurl(storage, uri) when opening it")
    raise NotImplementedError(f"{storage!r}: zurl of {type(storage).__module__}."
                              f"{type(storage).__qualname__} storages is not supported")


def _zeo_zurl(storage: Any) -> str:
    addrs = storage._addr
    if isinstance(addrs, (str, tuple)):     # new_addr() stores it unnormalized
        addrs = [addrs]
    if len(addrs) != 1:
        raise NotImplementedError(f"{storage!r}: ZEO client of several servers {addrs!r}: "
                                  f"a zurl names one server")
    addr = addrs[0]
    if isinstance(addr, str):
        where = os.path.abspath(addr)      # zeo:///path/to/socket
    else:
        host, port = addr
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = str(storage._storage)
    query = "" if name == "1" else "?storage=" + quote(name, safe="")
    return f"zeo://{where}{query}"


# ---------------------------------------------------------------------------
# The synchroniser.

class _ZSync:
    """Keeps one Conn in sync with one ZODB connection until released."""

    def __init__(self, zconn: Connection, wc: Any, wconn: Any) -> None:
        self.wc = wc
        self.wconn = wconn
        self._zconn = weakref.ref(zconn, self._on_zconn_gc)
        self._mu = threading.Lock()       # protects _released; serialises resync/release
        self._released = False
        self._db_hook: _DBCloseHook | None = None   # set once registered; under _mu (module)

    def __repr__(self) -> str:
        return f"<zsync {self.wconn!r}>"

    def _on_zconn_gc(self, _ref: Any) -> None:
        # Weakref callback: may run inside any allocation of any thread.
        _jobs.put(lambda: self.release("connection garbage-collected"))

    def resync(self) -> None:
        """After zconn's view may have changed: move the Conn to it."""
        with self._mu:
            if self._released:
                return
            zconn = self._zconn()
            if zconn is None:
                return
            try:
                at = zconn_at(zconn)
                if at != self.wconn.at():
                    self.wconn.resync(at)
                return
            except Exception:
                log.exception("wcfs: %r: resync to the view of %r failed; the WCFS Conn is "
                              "released, the next wconn_of connects anew", self, zconn)
        self.release("resync failed")

    def release(self, why: str) -> None:
        """Unregister and unhook (once); the Conn is closed by the worker."""
        with self._mu:
            if self._released:
                return
            self._released = True
        log.debug("wcfs: %r: release (%s)", self, why)
        with _mu:
            _registry.discard(self)
            if self._db_hook is not None:
                self._db_hook.syncs.discard(self)
        zconn = self._zconn()
        if zconn is not None:
            d = zconn.__dict__
            if getattr(d.get("newTransaction"), "zsync", None) is self:
                del d["newTransaction"]
            if d.get(_ATTR) is self:
                del d[_ATTR]
        if threading.current_thread() is _worker:
            self._close()
        else:
            _jobs.put(self._close)

    def _close(self) -> None:
        try:
            self.wconn.close()
        except Exception as e:
            log.warning("wcfs: %r: close: %s", self, e)
        try:
            self.wc.close()
        except Exception as e:
            log.warning("wcfs: %r: close the join: %s", self, e)


class _NewTransactionHook:
    """Instance attribute shadowing ``zconn.newTransaction``: runs the real
    one, then resyncs.  Holds zconn only weakly (via the synchroniser)."""

    def __init__(self, zsync: _ZSync, orig: Callable[..., Any] | None) -> None:
        self.zsync = zsync
        self._orig = orig        # an earlier per-instance wrapper, if any (else the class method)

    def __call__(self, transaction: Any, sync: bool = True) -> None:
        zconn = self.zsync._zconn()
        if zconn is None:
            return
        if self._orig is not None:
            self._orig(transaction, sync)
        else:
            type(zconn).newTransaction(zconn, transaction, sync)
        self.zsync.resync()


class _DBCloseHook:
    """Instance attribute shadowing ``db.close``: releases the synchronisers
    of the database's connections, then closes it."""

    def __init__(self, db: Any, orig: Callable[[], Any] | None) -> None:
        self._db = weakref.ref(db)
        self._orig = orig
        self.syncs: set[_ZSync] = set()   # under _mu (module)

    def __call__(self) -> None:
        with _mu:
            syncs = list(self.syncs)
        for s in syncs:
            s.release("DB.close")
        db = self._db()
        if db is None:
            return
        if db.__dict__.get("close") is self:
            del db.__dict__["close"]
        if self._orig is not None:
            self._orig()
        else:
            type(db).close(db)


def _db_close_hook_locked(db: Any) -> _DBCloseHook:
    hook = db.__dict__.get("close")
    if isinstance(hook, _DBCloseHook):
        return hook
    hook = _DBCloseHook(db, hook)
    db.__dict__["close"] = hook
    return hook


def wconn_of(zconn: Connection) -> Any:
    """The WCFS Conn kept in sync with the opened ZODB connection `zconn`.

    The first call joins the WCFS server of the connection's database
    (``join(zurl_of(storage))``, autostart per ``$WCFS_AUTOSTART``) and
    connects at ``zconn_at(zconn)``; later calls return the same Conn, which
    follows every new transaction of `zconn` and is closed when `zconn` is
    garbage collected or its database is closed.
    """
    if not isinstance(zconn, Connection):
        raise TypeError(f"wconn_of: expected a ZODB Connection, got {type(zconn).__name__}")
    at = zconn_at(zconn)          # ConnectionStateError if closed
    existing = zconn.__dict__.get(_ATTR)
    if existing is not None and not existing._released:
        return existing.wconn

    db = zconn.db()
    zurl = zurl_of(db.storage)
    wc = wcfs_client.join(zurl)
    try:
        wconn = wc.connect(at)
    except BaseException:
        wc.close()
        raise
    zsync = _ZSync(zconn, wc, wconn)
    _ensure_worker()
    with _mu:
        # Another thread may have got there first while we connected.
        existing = zconn.__dict__.get(_ATTR)
        if existing is None or existing._released:
            hook = _db_close_hook_locked(db)
            hook.syncs.add(zsync)
            zsync._db_hook = hook
            _registry.add(zsync)
            zconn.__dict__["newTransaction"] = _NewTransactionHook(
                zsync, zconn.__dict__.get("newTransaction"))
            zconn.__dict__[_ATTR] = zsync
            existing = None
    if existing is not None:
        zsync._released = True
        zsync._close()
        return existing.wconn
    # The view may have moved while we connected (another thread committed
    # through this connection's transaction manager): catch up now.
    zsync.resync()
    log.debug("wcfs: %r follows %r", wconn, zconn)
    return wconn


# ---------------------------------------------------------------------------
# The release worker.

def _run_worker() -> None:
    while True:
        job = _jobs.get()
        try:
            job()
        except Exception:
            log.exception("wcfs: zsync release job failed")


def defer(job: Callable[[], None]) -> None:
    """Run ``job()`` later on the release thread.

    Only queues: safe from finalizers and weakref callbacks, which must not
    talk to the server or start threads.  Call ``ensure_release_thread()``
    beforehand from ordinary code.
    """
    _jobs.put(job)


def ensure_release_thread() -> None:
    """Start the release thread if it is not running (not from a finalizer)."""
    _ensure_worker()


def _ensure_worker() -> None:
    global _worker
    with _worker_mu:
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_run_worker, name="wcfs-zsync-release", daemon=True)
            _worker.start()


def _after_fork_in_child() -> None:
    # The parent's worker does not exist here; jobs queued in the child (the
    # child's own garbage collection) need one.
    global _worker, _worker_mu, _mu
    _worker_mu = threading.Lock()
    _mu = threading.Lock()
    _worker = None
    if _registry:
        _ensure_worker()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _at_exit() -> None:
    """Wait (at most EXIT_WAIT) for the releases queued so far."""
    if _worker is None or not _worker.is_alive():
        return
    done = threading.Event()
    _jobs.put(done.set)               # FIFO: set once everything before it ran
    if not done.wait(EXIT_WAIT):
        log.warning("wcfs: at exit: WCFS Conn releases still pending after %.0fs", EXIT_WAIT)


# Registered after wcfs_client's own exit hook, hence run before it: our
# releases finish before it closes the remaining Conns and stops servers.
atexit.register(_at_exit)
