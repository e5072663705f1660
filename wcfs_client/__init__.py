"""WCFS client: isolated, shared-memory views of ZBigFiles served by WCFS.

``join(zurl)`` attaches this process to the WCFS server of a database (and
starts one if allowed); ``wc.connect(at)`` gives a ``Conn`` that views the
database as of ``at``; ``conn.open(foid).mmap(blk, n)`` maps blocks of a
ZBigFile read-only.  The mapped memory is the server's page cache, shared by
every process, yet each Conn sees exactly the data of its ``at``: the C++
core (``wcfs_client/cpp``, wrapped by ``_wcfs``) re-maps changed blocks to
``@<rev>`` files when the server asks it to (WCFS.md §4, API.md §4).

Joining (WCFS.md §6.3).  A process-wide registry maps mountpoints to
``WCFS`` objects; joining an already joined mountpoint returns the same object
and counts the join, ``WCFS.close()`` drops one join (never unmounts).  The
first join attaches by opening ``<mnt>/.wcfs/zurl``, checking its content and
keeping it open.  If nothing serves the mountpoint (ENOENT), or a crashed
server left its mount behind (ENOTCONN / ECONNABORTED), the server is started
through ``wcfs.mgmt.start`` -- which also unmounts such a stale mount -- when
autostart is allowed: ``join(autostart=...)``, else ``$WCFS_AUTOSTART``
(``yes``/``no``, default ``yes``, read at each call).  Servers started here
are stopped when this process exits; if one of them dies, the next ``join``
notices (its process exited), drops the dead registry entry and starts a new
server.  A crash of a server started elsewhere is noticed by the first join
after all joins of the dead one were closed.

Concurrency: the registry is protected by ``_mu``; joins (including a server
start, which may take seconds) are serialised by it.  All blocking work of
``Conn``/``FileH``/``Mapping`` happens in C++ with the GIL released.

Fork: a forked child must not use the parent's Conns (their mappings fault,
their operations fail with "connection closed"); it may connect anew.  Only the
process that started a server stops it at exit.
"""
from __future__ import annotations

import atexit
import errno
import logging
import os
import threading
import weakref
from typing import Any

from wcfs import mgmt

from . import _wcfs
from ._wcfs import Conn, FileH, Mapping, PinReq, WatchLink

__all__ = ["join", "WCFS", "Conn", "FileH", "Mapping", "WatchLink", "PinReq"]

log = logging.getLogger("wcfs_client")

ATTACH_TIMEOUT = 10.0       # reading .wcfs/zurl of a server found on the mountpoint

_mu = threading.Lock()                    # protects _joined, _autostarted, WCFS._njoin/_attach_fd
_joined: dict[str, "WCFS"] = {}           # mountpoint -> WCFS
_autostarted: list[Any] = []              # wcfs.mgmt.Server handles started by this process
_conns_mu = threading.Lock()              # protects _conns (not _mu: joins may hold it for seconds)
_conns: "weakref.WeakSet[Conn]" = weakref.WeakSet()   # every Conn made through a WCFS here
_owner_pid = os.getpid()                  # the process that may stop _autostarted servers


class WCFS(_wcfs.WCFS):
    """A joined WCFS server: ``mountpoint``, ``connect(at)``, ``close()``."""

    def __init__(self, mountpoint: str, zurl: str, attach_fd: int | None, server: Any = None) -> None:
        self.zurl = zurl
        self._attach_fd = attach_fd       # <mnt>/.wcfs/zurl, kept open while joined
        self._server = server             # wcfs.mgmt.Server if we started it
        self._njoin = 1                   # under _mu

    def _connected(self, conn: Conn) -> None:
        with _conns_mu:
            _conns.add(conn)

    def close(self) -> None:
        """Drop this join; the last one closes ``.wcfs/zurl`` (never unmounts)."""
        with _mu:
            if self._njoin <= 0:
                return
            self._njoin -= 1
            if self._njoin > 0:
                return
            if _joined.get(self.mountpoint) is self:
                del _joined[self.mountpoint]
            fd, self._attach_fd = self._attach_fd, None
        _close_fd(fd)

    def __repr__(self) -> str:
        return f"<wcfs_client.WCFS {self.zurl!r} @ {self.mountpoint}>"


def _close_fd(fd: int | None) -> None:
    """Close a descriptor on the mount; it is released even if close(2) fails
    (a dead server's mount answers ENOTCONN)."""
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError as e:
        log.debug("wcfs: close fd %d: %s", fd, e)


def _autostart_default() -> bool:
    v = os.environ.get("WCFS_AUTOSTART", "yes").strip().lower()
    if v == "yes":
        return True
    if v == "no":
        return False
    raise ValueError(f"$WCFS_AUTOSTART={v!r}: expected 'yes' or 'no'")


def _open_attach(mnt: str, timeout: float) -> tuple[int, str]:
    """Open ``<mnt>/.wcfs/zurl`` and read it -> (fd kept open, content).

    Runs on a helper thread: a hung server would block the open
    uninterruptibly, and join must be able to give up (TimeoutError).
    """
    path = os.path.join(mnt, ".wcfs", "zurl")
    lock = threading.Lock()
    result: list = []
    abandoned = False

    def attach() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, 1 << 16, 0)
            except BaseException:
                os.close(fd)
                raise
            out: Any = (fd, data.decode("utf-8", "surrogateescape"))
        except BaseException as e:
            out = e
        with lock:
            if abandoned:
                if isinstance(out, tuple):
                    os.close(out[0])
                return
            result.append(out)

    t = threading.Thread(target=attach, name="wcfs-join-attach", daemon=True)
    t.start()
    t.join(timeout)
    with lock:
        if not result:
            abandoned = True
            raise TimeoutError(errno.ETIMEDOUT, f"{path}: no answer within {timeout:.0f}s (server hung?)")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _try_attach(zurl: str, mnt: str) -> tuple[int | None, bool]:
    """-> (fd, stale): fd of .wcfs/zurl if a server for zurl answers; stale if
    a crashed server's mount is there."""
    try:
        fd, content = _open_attach(mnt, ATTACH_TIMEOUT)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None, False
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return None, True
        raise RuntimeError(f"wcfs: join {zurl}: attach {mnt}: {e}") from e
    if content != zurl:
        os.close(fd)
        raise RuntimeError(f"wcfs: join {zurl}: {mnt} serves another database ({content!r})")
    return fd, False


def _start(zurl: str, mnt: str) -> tuple[Any, int]:
    """Start a server (under _mu) -> (server handle or None, attach fd)."""
    mgmt.mountpoint_for(zurl)       # (re)creates the directory a stopped server removed
    try:
        srv = mgmt.start(zurl, mnt)
    except RuntimeError:
        # Another process may have started it meanwhile: use that one.
        fd, _ = _try_attach(zurl, mnt)
        if fd is None:
            raise
        return None, fd
    _autostarted.append(srv)
    fd, _ = _try_attach(zurl, mnt)
    if fd is None:
        raise RuntimeError(f"wcfs: join {zurl}: the server started @ {mnt} does not answer")
    return srv, fd


def join(zurl: str, autostart: bool | None = None) -> WCFS:
    """Attach to (or, if allowed, start) the WCFS server for `zurl`.

    `autostart` None means ``$WCFS_AUTOSTART`` (yes|no, default yes).  Raises
    RuntimeError("wcfs: join <zurl>: server not running") when no server
    answers and autostart is off.
    """
    if autostart is None:
        autostart = _autostart_default()
    mnt = mgmt.mountpoint_for(zurl)
    with _mu:
        _reap_dead_locked(zurl, mnt)
        wc = _joined.get(mnt)
        if wc is not None:
            wc._njoin += 1
            return wc
        fd, stale = _try_attach(zurl, mnt)
        srv = None
        if fd is None:
            if not autostart:
                why = " (stale mount of a crashed server)" if stale else ""
                raise RuntimeError(f"wcfs: join {zurl}: server not running{why}")
            srv, fd = _start(zurl, mnt)
        wc = WCFS(mnt, zurl, fd, srv)
        _joined[mnt] = wc
        return wc


def _reap_dead_locked(zurl: str, mnt: str) -> None:
    """Forget the servers we started on `mnt` that died, and clean up after them.

    Their registry entry goes (the next join attaches anew or starts a new
    server), and their stop sequence runs now: it reaps the process and
    removes a stale mount -- later, it could hit a new server's mount.
    """
    if os.getpid() != _owner_pid:
        return
    dead = [s for s in _autostarted
            if s.mountpoint == mnt and s.popen is not None and s.popen.poll() is not None]
    for srv in dead:
        log.warning("wcfs: join %s: the server we started (pid%d) died (exit status %s)",
                    zurl, srv.pid, srv.popen.returncode)
        _autostarted.remove(srv)
        wc = _joined.get(mnt)
        if wc is not None and wc._server is srv:
            del _joined[mnt]
            fd, wc._attach_fd = wc._attach_fd, None
            wc._server = None
            _close_fd(fd)
        try:
            srv.stop()
        except Exception:
            log.exception("wcfs: cleaning up after the dead server %r", srv)


def _at_exit() -> None:
    """Close our Conns, then stop the servers this process started."""
    if os.getpid() != _owner_pid:
        return
    with _conns_mu:
        conns = list(_conns)
    with _mu:
        wcs = list(_joined.values())
        servers = list(_autostarted)
        _autostarted.clear()
    for conn in conns:
        try:
            conn.close()
        except Exception as e:
            log.warning("wcfs: at exit: %r: close: %s", conn, e)
    for wc in wcs:
        with _mu:
            fd, wc._attach_fd = wc._attach_fd, None
        _close_fd(fd)
    for srv in servers:
        try:
            srv.stop()
        except Exception:
            log.exception("wcfs: at exit: stopping %r", srv)


atexit.register(_at_exit)
