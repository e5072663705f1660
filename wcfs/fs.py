"""The WCFS filesystem: ZBigFiles served over FUSE with a shared page cache that follows commits.

Layout (WCFS.md §1)::

    head/at  head/watch  head/bigfile/<oid>     the latest database state
    @<rev>/bigfile/<oid>                        the database as of <rev>
    .wcfs/zurl  .wcfs/pintimeout  .wcfs/stats  .wcfs/debug/zhead

What it guarantees.

* A read of ``head/bigfile/<oid>`` returns data as of the current head; the
  whole block is then pushed into the kernel page cache (notify store) from
  an uploader thread -- never from the read handler, which would deadlock on
  the kernel page locks of the read in progress.
* When a commit arrives, exactly the tracked blocks it changed are dropped
  from the head file's page cache (ranged notify inval), after their old
  content was preserved into the page cache of ``@<rev>/bigfile/<oid>``.
  Unchanged blocks stay cached.  If anything makes this impossible (kernel
  refuses an invalidation, the storage feed fails, a served ZBigFile changes
  its blksize or blktab root) the filesystem switches to EIO mode: every data
  access fails with EIO from then on, and the head caches are dropped.  Stale
  data is never served.
* ``@<rev>`` views are read-only snapshots; an unused view is forgotten after
  ``REV_IDLE`` seconds (the reference keeps them forever).  A rev newer than
  the head is refused: its content is not defined yet.

Concurrency model.  FUSE handlers run on libfuse worker threads; block loads
of a multi-block read run on the ``_loaders`` pool; page-cache uploads on the
``_uploaders`` pool; commits are processed by the caller of ``run_zwatcher``
(the server's main thread).

Locks, in acquisition order:

1. ``_head_lock`` (RWLock) -- shared: head reads, head lookups, getattr of
   head files, stats; exclusive: commit processing.  It protects the head
   tid, head file sizes/roots and the history component's view.
2. ``BigFile.mu`` -- protects that file's ``loading`` table.
3. ``_tab_mu`` -- protects the inode table, the head file table, the rev
   view table and the zhead readers list.
4. ``_upload_cond`` -- protects ``_upload_paused`` / ``_uploads_inflight``.

Uploads and commit processing (§3.7): an uploader takes the head lock shared
only to check "not paused, my loading entry still current" and to register as
in flight, and releases it before the store; the commit processor sets
"paused" under the exclusive lock and re-takes the lock until no upload is in
flight.  It must not wait while holding the lock: a store blocked on a page
locked by a read, with that read waiting for the head lock, would deadlock.
``@<rev>`` files never change, so they need no head lock at all.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from persistent.TimeStamp import TimeStamp
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64

from . import _fuse
from .history import History
from .rwlock import RWLock
from .watch import PinError, Watch, WatchLink, go_duration, hex16, kill_faulty, proc_alive, wait_gone
from .zobj import ZReader

log = logging.getLogger("wcfs")

# Fixed inode numbers.
ROOT, HEAD, HEAD_AT, HEAD_WATCH, HEAD_BIGFILE, WCFS_DIR, ZURL, PINTIMEOUT, STATS, DEBUG_DIR, ZHEAD = range(1, 12)
FIRST_DYNAMIC_INO = 100

S_IFDIR, S_IFREG = 0o040000, 0o100000
ATTR_TIMEOUT = 1.0            # for nodes whose attributes we invalidate explicitly or never change
# Forget an @rev view no open file uses after it was idle this long ($WCFS_REV_IDLE
# overrides it: a tuning/test knob, not part of the public interface).
REV_IDLE = float(os.environ.get("WCFS_REV_IDLE", "60"))
HISTORY_WINDOW = 60.0         # keep at least this much history behind head (seconds)
RETRIEVE_TIMEOUT = 5.0

_HEX16 = re.compile(r"^[0-9a-fA-F]{16}$")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _gaps(size: int, covered: list[tuple[int, int]], page: int) -> list[tuple[int, int]]:
    """Parts of [0, size) not covered by whole pages of ``covered`` ranges."""
    full = sorted((-(-lo // page) * page, hi // page * page) for lo, hi in covered)
    out, pos = [], 0
    for lo, hi in full:
        if lo >= hi:
            continue
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < size:
        out.append((pos, size))
    return out


def tid_time(tid: int) -> float:
    """Wall-clock time of a tid (the ZODB TimeStamp encoding)."""
    return TimeStamp(p64(tid)).timeTime()


def tid_ns(tid: int) -> int:
    return int(tid_time(tid) * 1e9)


class FsError(Exception):
    """An error to answer a FUSE request with: errno + message for the log."""

    def __init__(self, err: int, msg: str) -> None:
        super().__init__(msg)
        self.errno = err


@dataclass
class Loading:
    """A block being loaded (or loaded and waiting for its page-cache upload)."""
    ready: threading.Event = field(default_factory=threading.Event)
    data: bytes | memoryview | None = None
    error: BaseException | None = None
    # Block-relative ranges that READ replies deliver to the page cache anyway;
    # the upload skips them (under BigFile.mu).
    served: list[tuple[int, int]] = field(default_factory=list)


class View:
    """A database view: head (moves with commits) or @<rev> (fixed)."""

    def __init__(self, fs: "WCFS", rev: int | None, dir_ino: int, bigfile_ino: int) -> None:
        self.fs = fs
        self.rev = rev                       # None for head
        self.dir_ino = dir_ino
        self.bigfile_ino = bigfile_ino
        self.files: dict[int, "BigFile"] = {}     # oid -> file (under fs._tab_mu)
        self.nopen = 0                       # open handles of its files (under fs._tab_mu)
        self.last_used = time.monotonic()

    @property
    def is_head(self) -> bool:
        return self.rev is None

    def at(self) -> int:
        return self.fs.head if self.rev is None else self.rev


class BigFile:
    """``head/bigfile/<oid>`` or ``@<rev>/bigfile/<oid>``."""

    def __init__(self, view: View, ino: int, oid: int, blksize: int, root: bytes, size: int, rev_approx: int):
        self.view = view
        self.ino = ino
        self.oid = oid
        self.blksize = blksize
        self.root = root                 # blktab oid
        self.size = size                 # head: under head lock
        self.rev_approx = rev_approx     # for mtime
        self.mu = threading.Lock()       # protects `loading`
        self.loading: dict[int, Loading] = {}
        self.watch_mu = threading.Lock() # protects `watches` (head files only)
        self.watches: set[Watch] = set()

    @property
    def zoid(self) -> bytes:
        return p64(self.oid)


class ZheadReader:
    """One open handle of .wcfs/debug/zhead: a queue of tids and a parked read."""

    def __init__(self) -> None:
        self.cond = threading.Condition()     # protects the fields below
        self.pending: list[bytes] = []
        self.parked: "_fuse.Request | None" = None
        self.closed = False


class WCFS(_fuse.Operations):
    """FUSE operations of the WCFS filesystem.  See the module docstring."""

    def __init__(self, zstor, zurl: str, mountpoint: str, *, pin_timeout: float = 30.0,
                 debug: bool = False) -> None:
        self.zstor = zstor
        self.zurl = zurl
        self.mountpoint = mountpoint
        self.pin_timeout = pin_timeout
        self.debug = debug
        self.session: _fuse.Session | None = None
        self.reader = ZReader(zstor.load_before)
        self.head = u64(zstor.head)          # loads happen at this state (changes under the head lock)
        self.head_visible = self.head        # head/at: no older data is left in head caches
        self.history = History(self.reader, self.head)
        self.eio_reason: str | None = None

        self._head_lock = RWLock()
        self._tab_mu = threading.Lock()
        self._upload_cond = threading.Condition()
        self._upload_paused = False
        self._uploads_inflight = 0
        self._loaders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="wcfs-load")
        self._uploaders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="wcfs-upload")
        self._retrieve_mu = threading.Lock()   # serialises retrieve issue/registration with replies
        self._retrieves: dict[int, tuple[threading.Event, list]] = {}
        self._zero = bytes(1 << 21)
        self._head_cond = threading.Condition()    # notified when the head advances

        self._next_ino = FIRST_DYNAMIC_INO
        self._inodes: dict[int, object] = {}      # dynamic ino -> BigFile | View
        self._nlookup: dict[int, int] = {}
        self._headv = View(self, None, HEAD, HEAD_BIGFILE)
        self._revs: dict[int, View] = {}           # rev -> view
        self._zhead: list[ZheadReader] = []
        self._handles: dict[int, object] = {}      # fh -> ZheadReader | BigFile
        self._next_fh = 1
        self.stats = {"pin": 0, "pinkill": 0}

    # --- helpers ------------------------------------------------------------------
    def _alloc_ino_locked(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _attr(self, ino: int, mode: int, *, size: int = 0, mtime_ns: int = 0, blksize: int = 4096,
              nlink: int = 1) -> _fuse.Attr:
        a = _fuse.Attr()
        a.ino = ino
        a.mode = mode
        a.nlink = nlink
        a.uid = os.getuid()
        a.gid = os.getgid()
        a.size = size
        a.blksize = blksize & 0xFFFFFFFF
        a.blocks = (size + 511) // 512
        a.atime_ns = a.mtime_ns = a.ctime_ns = mtime_ns
        return a

    def _check_eio(self) -> None:
        if self.eio_reason is not None:
            raise FsError(errno.EIO, f"filesystem is in EIO mode: {self.eio_reason}")

    def _answer(self, req, fn: Callable[[], None], what: str) -> None:
        """Run a handler body; FsError -> its errno, anything else -> EIO, logged."""
        try:
            fn()
        except (FsError, OSError) as e:
            err = e.errno or errno.EIO
            if err != errno.EINTR:
                log.warning("%s: %s", what, e)
            if not req.replied:
                req.reply_err(err)
        except Exception:
            log.exception("%s: internal error", what)
            if not req.replied:
                req.reply_err(errno.EIO)

    # --- attributes ---------------------------------------------------------------
    def _getattr_locked(self, ino: int) -> _fuse.Attr:
        head_ns = tid_ns(self.head)
        if ino == ROOT:
            return self._attr(ino, S_IFDIR | 0o1755, nlink=2)
        if ino == HEAD:
            return self._attr(ino, S_IFDIR | 0o1555, nlink=2, mtime_ns=head_ns)
        if ino == HEAD_BIGFILE:
            return self._attr(ino, S_IFDIR | 0o1755, nlink=2)
        if ino in (WCFS_DIR, DEBUG_DIR):
            return self._attr(ino, S_IFDIR | 0o1755 if ino == WCFS_DIR else S_IFDIR | 0o755, nlink=2)
        if ino in (HEAD_AT, STATS, ZURL, PINTIMEOUT):
            return self._attr(ino, S_IFREG | 0o644, size=len(self._small_content(ino)))
        if ino in (HEAD_WATCH, ZHEAD):
            return self._attr(ino, S_IFREG | 0o644)
        node = self._inodes.get(ino)
        if isinstance(node, BigFile):
            return self._attr(ino, S_IFREG | 0o444, size=node.size, blksize=node.blksize,
                              mtime_ns=tid_ns(node.rev_approx))
        if isinstance(node, View):
            if ino == node.dir_ino:
                return self._attr(ino, S_IFDIR | 0o555, nlink=2, mtime_ns=tid_ns(node.rev))
            return self._attr(ino, S_IFDIR | 0o755, nlink=2)
        raise FsError(errno.ENOENT, f"getattr: unknown inode {ino}")

    def _small_content(self, ino: int) -> bytes:
        if ino == HEAD_AT:
            return hex16(self.head_visible).encode()
        if ino == ZURL:
            return self.zurl.encode()
        if ino == PINTIMEOUT:
            return f"{self.pin_timeout:.1f}".encode()
        if ino == STATS:
            return self._stats_text().encode()
        raise FsError(errno.EIO, f"inode {ino} is not a small file")

    def _links(self) -> list[WatchLink]:
        with self._tab_mu:
            return [h for h in self._handles.values() if isinstance(h, WatchLink)]

    def _all_watches(self) -> list[Watch]:
        out = []
        for link in self._links():
            with link.mu:
                out += link.byfile.values()
        return out

    def _stats_text(self) -> str:
        links = self._links()
        watches = self._all_watches()
        npinned = 0
        for w in watches:
            with w.mu:
                npinned += len(w.pinned)
        with self._tab_mu:
            vals = [
                ("BigFile", len(self._headv.files)),
                ("RevHead", len(self._revs)),
                ("ZHeadLink", len(self._zhead)),
                ("WatchLink", len(links)),
                ("Watch", len(watches)),
                ("PinnedBlk", npinned),
                ("pin", self.stats["pin"]),
                ("pinkill", self.stats["pinkill"]),
            ]
        return "".join(f"{k}\t: {v}\n" for k, v in vals)

    def getattr(self, req, ino, fh):
        def body():
            node = self._inodes.get(ino)
            if isinstance(node, BigFile) and node.view.is_head:
                with self._head_lock.shared():      # size and mtime change with commits
                    attr = self._getattr_locked(ino)
            else:
                # Never the head lock here: @rev files are opened and stat'ed by client
                # pinners while a head read waits for their ack (and a commit may be
                # queued behind that read).
                attr = self._getattr_locked(ino)
            timeout = 0.0 if ino in (HEAD_AT, STATS) else ATTR_TIMEOUT
            req.reply_attr(attr, timeout)
        self._answer(req, body, f"getattr #{ino}")

    # --- lookup -------------------------------------------------------------------
    def _entry(self, req, ino: int, attr: _fuse.Attr, *, counted: bool = True) -> None:
        if counted:
            with self._tab_mu:
                self._nlookup[ino] = self._nlookup.get(ino, 0) + 1
        req.reply_entry(attr, entry_timeout=ATTR_TIMEOUT, attr_timeout=ATTR_TIMEOUT)

    def lookup(self, req, parent, name):
        self._answer(req, lambda: self._lookup(req, parent, name), f"lookup #{parent}/{name!r}")

    def _lookup(self, req, parent: int, bname: bytes) -> None:
        name = bname.decode("utf-8", "surrogateescape")
        static = {
            ROOT: {"head": HEAD, ".wcfs": WCFS_DIR},
            HEAD: {"at": HEAD_AT, "watch": HEAD_WATCH, "bigfile": HEAD_BIGFILE},
            WCFS_DIR: {"zurl": ZURL, "pintimeout": PINTIMEOUT, "stats": STATS},
            DEBUG_DIR: {"zhead": ZHEAD},
        }
        if self.debug:
            static[WCFS_DIR] = dict(static[WCFS_DIR], debug=DEBUG_DIR)
        if parent in static and name in static[parent]:
            ino = static[parent][name]
            return self._entry(req, ino, self._getattr_locked(ino), counted=False)
        if parent == ROOT:
            return self._lookup_rev(req, name)
        if parent in static:
            raise FsError(errno.ENOENT, f"{name!r}: no such entry")
        if parent == HEAD_BIGFILE:
            with self._head_lock.shared():
                self._check_eio()
                f = self._lookup_bigfile(self._headv, name)
                attr = self._getattr_locked(f.ino)
            return self._entry(req, f.ino, attr)
        node = self._inodes.get(parent)
        if isinstance(node, View):
            if parent == node.dir_ino:
                if name != "bigfile":
                    raise FsError(errno.ENOENT, f"@{hex16(node.rev)}/{name}: no such entry")
                node.last_used = time.monotonic()
                return self._entry(req, node.bigfile_ino, self._getattr_locked(node.bigfile_ino))
            self._check_eio()
            f = self._lookup_bigfile(node, name)
            return self._entry(req, f.ino, self._getattr_locked(f.ino))
        raise FsError(errno.ENOTDIR, f"lookup in non-directory inode {parent}")

    def _lookup_rev(self, req, name: str) -> None:
        if not (name.startswith("@") and _HEX16.match(name[1:])):
            raise FsError(errno.EINVAL, f"/{name}: not @rev")
        rev = int(name[1:], 16)
        if rev > self.head:
            raise FsError(errno.EINVAL, f"/{name}: @rev is in the future of head @{hex16(self.head)}")
        with self._tab_mu:
            view = self._revs.get(rev)
            if view is None:
                view = View(self, rev, self._alloc_ino_locked(), self._alloc_ino_locked())
                self._inodes[view.dir_ino] = view
                self._inodes[view.bigfile_ino] = view
                self._revs[rev] = view
            view.last_used = time.monotonic()
        self._entry(req, view.dir_ino, self._getattr_locked(view.dir_ino))

    def _lookup_bigfile(self, view: View, name: str) -> BigFile:
        """Find or create the BigFile of ``view`` named ``name`` (head: head lock held shared)."""
        if not _HEX16.match(name):
            raise FsError(errno.EINVAL, f"bigfile/{name}: not oid")
        oid = int(name, 16)
        with self._tab_mu:
            f = view.files.get(oid)
        if f is not None:
            return f
        at = view.at()
        try:
            state, serial = self.reader.zbigfile(p64(oid), at)
        except POSKeyError:
            raise FsError(errno.EINVAL, f"bigfile/{name}: object does not exist @{hex16(at)}") from None
        if isinstance(state, str):
            raise FsError(errno.EINVAL, f"bigfile/{name}: {state} is not a ZBigFile")
        blksize, root = state
        maxkey, path = self.reader.maxkey(root, at)
        size = self._size(blksize, maxkey, name)
        with self._tab_mu:
            f = view.files.get(oid)          # double-checked: a concurrent lookup may have won
            if f is None:
                f = BigFile(view, self._alloc_ino_locked(), oid, blksize, root, size, serial)
                view.files[oid] = f
                self._inodes[f.ino] = f
                created = True
            else:
                created = False
        if created and view.is_head:
            self.history.add_file(f.zoid, blksize, root)
            self.history.track_path(f.zoid, path)
        return f

    @staticmethod
    def _size(blksize: int, maxkey: int | None, name: str) -> int:
        size = 0 if maxkey is None else (maxkey + 1) * blksize
        if size >= 2**63:
            raise FsError(errno.EFBIG, f"bigfile/{name}: size overflows")
        return size

    def forget(self, ino, nlookup):
        with self._tab_mu:
            n = self._nlookup.get(ino, 0) - nlookup
            if n > 0:
                self._nlookup[ino] = n
                return
            self._nlookup.pop(ino, None)
            node = self._inodes.get(ino)
            if isinstance(node, View) and node.rev not in self._revs:
                self._inodes.pop(ino, None)
            elif isinstance(node, BigFile) and not node.view.is_head and node.view.rev not in self._revs:
                self._inodes.pop(ino, None)

    # --- directories ----------------------------------------------------------------
    def opendir(self, req, ino, flags):
        req.reply_open(0)

    def releasedir(self, req, ino, fh):
        req.reply_err(0)

    def readdir(self, req, ino, size, off, fh):
        def body():
            d = S_IFDIR
            entries = [(b".", ino, d), (b"..", ROOT, d)]
            with self._tab_mu:
                if ino == ROOT:
                    entries += [(b"head", HEAD, d), (b".wcfs", WCFS_DIR, d)]
                    entries += [(b"@" + hex16(r).encode(), v.dir_ino, d) for r, v in sorted(self._revs.items())]
                elif ino == HEAD:
                    entries += [(b"at", HEAD_AT, S_IFREG), (b"watch", HEAD_WATCH, S_IFREG),
                                (b"bigfile", HEAD_BIGFILE, d)]
                elif ino == WCFS_DIR:
                    entries += [(b"zurl", ZURL, S_IFREG), (b"pintimeout", PINTIMEOUT, S_IFREG),
                                (b"stats", STATS, S_IFREG)] + ([(b"debug", DEBUG_DIR, d)] if self.debug else [])
                elif ino == DEBUG_DIR:
                    entries += [(b"zhead", ZHEAD, S_IFREG)]
                else:
                    view = self._headv if ino == HEAD_BIGFILE else self._inodes.get(ino)
                    if not isinstance(view, View):
                        raise FsError(errno.ENOTDIR, f"readdir of inode {ino}")
                    if ino == view.dir_ino:
                        entries += [(b"bigfile", view.bigfile_ino, d)]
                    else:
                        entries += [(hex16(o).encode(), f.ino, S_IFREG) for o, f in sorted(view.files.items())]
            req.reply_dir(entries, size, off)
        self._answer(req, body, f"readdir #{ino}")

    def statfs(self, req, ino):
        req.reply_statfs(bsize=2 << 20, frsize=2 << 20, namemax=255)

    # --- open / release ----------------------------------------------------------
    def open(self, req, ino, flags):
        self._answer(req, lambda: self._open(req, ino, flags), f"open #{ino}")

    def _open(self, req, ino: int, flags: int) -> None:
        if flags & os.O_ACCMODE != os.O_RDONLY and ino != HEAD_WATCH:
            raise FsError(errno.EPERM, f"open #{ino}: read-only file")
        if ino in (ZURL, PINTIMEOUT):
            return req.reply_open(0, keep_cache=True)
        if ino in (HEAD_AT, STATS):
            return req.reply_open(0, direct_io=True)
        if ino == ZHEAD:
            r = ZheadReader()
            with self._tab_mu:
                self._zhead.append(r)
                fh = self._new_fh_locked(r)
            return req.reply_open(fh, direct_io=True, nonseekable=True, stream=True)
        if ino == HEAD_WATCH:
            if not proc_alive(req.pid):
                raise FsError(errno.EINVAL, f"head/watch: opener pid{req.pid} is not alive")
            with self._tab_mu:
                fh = self._new_fh_locked(None)
                link = self._handles[fh] = WatchLink(self, req.pid, fh)
            log.debug("watch link %d opened by pid%d", fh, link.pid)
            return req.reply_open(fh, direct_io=True, nonseekable=True, stream=True)
        node = self._inodes.get(ino)
        if isinstance(node, BigFile):
            with self._tab_mu:
                node.view.nopen += 1
                node.view.last_used = time.monotonic()
                fh = self._new_fh_locked(node)
            return req.reply_open(fh, keep_cache=True)
        raise FsError(errno.EINVAL, f"open: inode {ino} is not a file")

    def _new_fh_locked(self, obj) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = obj
        return fh

    def release(self, req, ino, fh):
        with self._tab_mu:
            obj = self._handles.pop(fh, None)
            if isinstance(obj, BigFile):
                obj.view.nopen -= 1
                obj.view.last_used = time.monotonic()
            elif isinstance(obj, ZheadReader):
                self._zhead.remove(obj)
        if isinstance(obj, WatchLink):
            obj.on_release()
        if isinstance(obj, ZheadReader):
            with obj.cond:
                obj.closed = True
                parked, obj.parked = obj.parked, None
                obj.cond.notify_all()
            if parked is not None and not parked.replied:
                parked.reply_err(errno.EBADF)
        req.reply_err(0)

    def flush(self, req, ino, fh):
        req.reply_err(0)

    # --- read ---------------------------------------------------------------------
    def read(self, req, ino, size, off, fh):
        self._answer(req, lambda: self._read(req, ino, size, off, fh), f"read #{ino} [{off}, +{size})")

    def _read(self, req, ino: int, size: int, off: int, fh: int) -> None:
        if ino in (HEAD_AT, STATS, ZURL, PINTIMEOUT):
            if ino == STATS:
                with self._head_lock.shared():       # also proves the main lock is not stuck
                    data = self._small_content(ino)
            else:
                data = self._small_content(ino)
            return req.reply_data(data[off:off + size])
        if ino == ZHEAD:
            return self._read_zhead(req, fh)
        if ino == HEAD_WATCH:
            return self._link(fh).on_read(req, size)
        f = self._inodes.get(ino)
        if not isinstance(f, BigFile):
            raise FsError(errno.EINVAL, f"read: inode {ino} is not a file")
        if f.view.is_head:
            with self._head_lock.shared():
                self._check_eio()
                self._read_bigfile(req, f, size, off)
        else:
            self._check_eio()
            f.view.last_used = time.monotonic()
            self._read_bigfile(req, f, size, off)

    def _link(self, fh: int) -> WatchLink:
        with self._tab_mu:
            link = self._handles.get(fh)
        if not isinstance(link, WatchLink):
            raise FsError(errno.EBADF, f"not a watch link handle: {fh}")
        return link

    def write(self, req, ino, data, off, fh):
        def body():
            if ino != HEAD_WATCH:
                raise FsError(errno.EPERM, f"write #{ino}: read-only file")
            try:
                self._link(fh).on_write(data)
            except OSError as exc:
                raise FsError(exc.errno or errno.EIO, str(exc)) from exc
            req.reply_write(len(data))
        self._answer(req, body, f"write #{ino}")

    def _read_bigfile(self, req, f: BigFile, size: int, off: int) -> None:
        end = min(off + size, f.size)
        if off >= end:
            return req.reply_data(b"")
        bs = f.blksize
        first, last = off // bs, (end - 1) // bs
        if first == last:
            entries = [self._block(f, first)]
        else:
            futs = [self._loaders.submit(self._block, f, blk) for blk in range(first, last + 1)]
            entries = [fut.result() for fut in futs]
        with f.mu:
            for i, e in enumerate(entries):
                bstart = (first + i) * bs
                e.served.append((max(off, bstart) - bstart, min(end, bstart + bs) - bstart))
        datas = [e.data for e in entries]
        if len(datas) == 1:
            data = datas[0]
            lo, hi = off - first * bs, end - first * bs
            if hi <= len(data):
                return req.reply_data(memoryview(data)[lo:hi])
        out = bytearray(end - off)
        for i, data in enumerate(datas):
            bstart = (first + i) * bs
            lo = max(off, bstart) - bstart
            hi = min(end, bstart + bs) - bstart
            if lo < len(data):
                n = min(hi, len(data)) - lo
                dst = bstart + lo - off
                out[dst:dst + n] = memoryview(data)[lo:lo + n]
        req.reply_data(out)

    def _block(self, f: BigFile, blk: int) -> Loading:
        """Loaded block ``blk`` of ``f``; ``.data`` may be shorter than blksize (zeros follow).

        Concurrent loads of one block are de-duplicated.
        """
        with f.mu:
            e = f.loading.get(blk)
            owner = e is None
            if owner:
                e = f.loading[blk] = Loading()
        if not owner:
            e.ready.wait()
            if e.error is not None:
                raise FsError(errno.EIO, f"block #{blk}: {e.error}")
            return e
        try:
            e.data = self._load_block(f, blk)
        except BaseException as exc:
            e.error = exc
            with f.mu:
                if f.loading.get(blk) is e:
                    del f.loading[blk]
            e.ready.set()
            log.error("%s: block #%d: load failed: %s", self._fpath(f), blk, exc)
            raise FsError(errno.EIO, f"block #{blk}: {exc}") from exc
        e.ready.set()
        self._uploaders.submit(self._upload, f, blk, e)
        return e

    def _load_block(self, f: BigFile, blk: int):
        at = f.view.at()
        lk = self.reader.lookup(f.root, blk, at)
        if lk.zblk is None:
            data, zser = b"", None
        else:
            data, zser = self.reader.load_block(lk.zblk, at, f.blksize, self._loaders.map)
        if f.view.is_head:
            self.history.track(f.zoid, blk, lk, zser)
            self._pin_on_read(f, blk, max(lk.rev_max, zser or 0))
        return data

    def _fpath(self, f: BigFile) -> str:
        return f"{'head' if f.view.is_head else '@' + hex16(f.view.rev)}/bigfile/{hex16(f.oid)}"

    # --- page-cache uploads ---------------------------------------------------------
    def _upload(self, f: BigFile, blk: int, e: Loading) -> None:
        try:
            if f.view.is_head:
                with self._head_lock.shared():
                    with self._upload_cond:
                        if self._upload_paused:
                            return self._drop_loading(f, blk, e)
                    with f.mu:
                        if f.loading.get(blk) is not e:
                            return
                    with self._upload_cond:
                        self._uploads_inflight += 1
                try:
                    with f.mu:
                        served = list(e.served)
                    self._store_block(f.ino, blk * f.blksize, e.data, f.blksize, served)
                finally:
                    with self._upload_cond:
                        self._uploads_inflight -= 1
                        self._upload_cond.notify_all()
            else:
                with f.mu:
                    served = list(e.served)
                self._store_block(f.ino, blk * f.blksize, e.data, f.blksize, served)
        except OSError as exc:
            log.debug("%s: block #%d: page-cache upload failed: %s", self._fpath(f), blk, exc)
        except Exception:
            log.exception("%s: block #%d: page-cache upload failed", self._fpath(f), blk)
        finally:
            self._drop_loading(f, blk, e)

    @staticmethod
    def _drop_loading(f: BigFile, blk: int, e: Loading) -> None:
        with f.mu:
            if f.loading.get(blk) is e:
                del f.loading[blk]

    def _store_block(self, ino: int, off: int, data, blksize: int,
                     skip: list[tuple[int, int]] = ()) -> None:
        """Put a whole block into the page cache, except the ranges in ``skip``.

        ``skip`` are block-relative ranges that READ replies delivered already
        (a sequential reader gets whole blocks that way: storing them again
        would only double the copying).
        """
        assert self.session is not None
        for lo, hi in _gaps(blksize, skip, PAGE):
            n = len(data)
            if lo < n:
                self.session.notify_store(ino, off + lo, memoryview(data)[lo:min(hi, n)])
            pos = max(lo, n)
            while pos < hi:
                chunk = min(hi - pos, len(self._zero))
                self.session.notify_store(ino, off + pos, memoryview(self._zero)[:chunk])
                pos += chunk

    # --- notify retrieve ------------------------------------------------------------
    def retrieve_reply(self, cookie, ino, offset, data):
        with self._retrieve_mu:
            w = self._retrieves.pop(cookie, None)
        if w is not None:
            w[1].append((offset, data))
            w[0].set()

    def _retrieve(self, ino: int, off: int, size: int) -> bytes | None:
        """Read back ``size`` bytes of an inode's page cache; None if not all cached."""
        assert self.session is not None
        conn = self.session.conn
        step = max(4096, conn.max_write if conn else 1 << 20)
        out = bytearray()
        pos = off
        while pos < off + size:
            n = min(step, off + size - pos)
            ev, box = threading.Event(), []
            with self._retrieve_mu:
                try:
                    cookie = self.session.notify_retrieve(ino, pos, n)
                except OSError as exc:
                    if exc.errno == errno.ENOENT:       # the kernel forgot the inode: nothing cached
                        return None
                    raise
                self._retrieves[cookie] = (ev, box)
            if not ev.wait(RETRIEVE_TIMEOUT):
                with self._retrieve_mu:
                    self._retrieves.pop(cookie, None)
                log.warning("retrieve #%d [%d, +%d): no answer from the kernel", ino, pos, n)
                return None
            _, data = box[0]
            if len(data) != n:
                return None
            out += data
            pos += n
        return bytes(out)

    # --- .wcfs/debug/zhead -----------------------------------------------------------
    def _read_zhead(self, req, fh: int) -> None:
        with self._tab_mu:
            r = self._handles.get(fh)
        if not isinstance(r, ZheadReader):
            raise FsError(errno.EBADF, "zhead: bad handle")
        with r.cond:
            if r.pending:
                line = r.pending.pop(0)
                r.cond.notify_all()
            else:
                r.parked = req
                req.set_interrupt_handler(lambda rq: self._zhead_interrupted(r, rq))
                return
        req.reply_data(line)

    def _zhead_interrupted(self, r: ZheadReader, req) -> None:
        with r.cond:
            if r.parked is req:
                r.parked = None
            else:
                return
        if not req.replied:
            req.reply_err(errno.EINTR)

    def _zhead_publish(self, tid: int) -> None:
        """Send ``tid`` to every zhead reader and wait until each took it (debug facility)."""
        with self._tab_mu:
            readers = list(self._zhead)
        line = (hex16(tid) + "\n").encode()
        for r in readers:
            with r.cond:
                parked, r.parked = r.parked, None
                if parked is None:
                    r.pending.append(line)
            if parked is not None:
                try:
                    parked.reply_data(line)
                except Exception as exc:
                    log.warning("zhead: detaching a reader: %s", exc)
                continue
            with r.cond:
                while line in r.pending and not r.closed:
                    r.cond.wait(1.0)

    # --- isolation protocol (WCFS.md §2) -------------------------------------------------
    def handle_watch_request(self, link: WatchLink, msg: str) -> str:
        """Serve one client request of a watch link; return the reply payload."""
        parts = msg.split(" ")
        if parts[0] != "watch":
            return f'error bad watch: not a watch request: "{msg}"'
        args = parts[1:]
        if len(args) != 2:
            return f"error bad watch: expected 2 arguments, got {len(args)}"
        foid_s, at_s = args
        if not _HEX16.match(foid_s):
            return "error bad watch: invalid oid"
        foid = int(foid_s, 16)
        if at_s == "-":
            return self._unwatch(link, foid)
        if not (at_s.startswith("@") and _HEX16.match(at_s[1:])):
            return "error bad watch: invalid at"
        at = int(at_s[1:], 16)
        try:
            self._setup_watch(link, foid, at)
        except FsError as e:
            return f"error setup watch f<{foid:016x}> @{at:016x}: {e}"
        return "ok"

    def _unwatch(self, link: WatchLink, foid: int) -> str:
        with self._tab_mu:
            known = foid in self._headv.files
        if not known:
            return f"error setup watch f<{foid:016x}> -: file not yet known to wcfs or is not a ZBigFile"
        with link.mu:
            w = link.byfile.pop(foid, None)
        if w is not None:
            with w.file.watch_mu:
                w.file.watches.discard(w)
        return "ok"

    def _wait_head(self, link: WatchLink, at: int) -> None:
        with self._head_cond:
            while self.head_visible < at:
                if link.down:
                    raise FsError(errno.ECONNRESET, "link is down")
                self._head_cond.wait(0.5)

    def _setup_watch(self, link: WatchLink, foid: int, at: int) -> None:
        with link.mu:
            setup_mu = link.setup_mu.setdefault(foid, threading.Lock())
        with setup_mu:
            self._wait_head(link, at)
            with self._head_lock.shared():
                head = self.head
                if at < self.history.tail:
                    dt = go_duration(tid_time(head) - tid_time(at))
                    raise FsError(errno.EINVAL, f"too far away back from head/at (@{hex16(head)}); δt = {dt}")
                with self._tab_mu:
                    f = self._headv.files.get(foid)
                if f is None:
                    raise FsError(errno.EINVAL, "file not yet known to wcfs or is not a ZBigFile")
                with link.mu:
                    w = link.byfile.get(foid)
                if w is not None and at < w.at:
                    raise FsError(errno.EINVAL, "going back in history is forbidden")
                self._check_no_epoch(f, at, head)
                if w is None:
                    w = Watch(link, f, at)
                    with link.mu:
                        if link.down:
                            raise FsError(errno.ECONNRESET, "link is down")
                        link.byfile[foid] = w
                    with f.watch_mu:
                        f.watches.add(w)
                # Registered first, so that concurrent head reads pin for it too; the
                # exclusive at-lock keeps their pins out until ours are decided and sent.
                w.atlock.acquire_exclusive()
                try:
                    w.at = at
                    want = {blk: self.history.blk_rev_at(f.zoid, blk, at)[0]
                            for blk in self.history.changed_since(f.zoid, at)}
                    with w.mu:
                        todo = [(blk, rev) for blk, rev in sorted(want.items()) if w.pinned.get(blk) != rev]
                        todo += [(blk, None) for blk in sorted(w.pinned) if blk not in want]
                    self._pin_many(w, todo)
                finally:
                    w.atlock.release_exclusive()

    def _check_no_epoch(self, f: BigFile, at: int, head: int) -> None:
        """The ZBigFile must have the same blksize and blktab in (at, head]."""
        try:
            state, _ = self.reader.zbigfile(f.zoid, at)
        except Exception:
            state = None
        if state == (f.blksize, f.root):
            return
        _, rev = self.reader.zbigfile(f.zoid, head)
        raise FsError(errno.EINVAL, f"file epoch detected @{hex16(rev)} in between (at,head=@{hex16(head)}]")

    def _pin_many(self, w: Watch, todo: list[tuple[int, int | None]]) -> None:
        """Pins (rev None = @head) on one watch: all sent at once, then all awaited."""
        self._run_pins([(w, blk, rev) for blk, rev in todo])

    def _run_pins(self, pins: list[tuple[Watch, int, int | None]]) -> None:
        """Send every pin, then wait for every reply (one deadline for all, §2.6)."""
        if not pins:
            return
        deadline = time.monotonic() + self.pin_timeout
        inflight = []
        for w, blk, rev in pins:
            revs = "head" if rev is None else hex16(rev)
            with self._tab_mu:
                self.stats["pin"] += 1
            try:
                sid, waiter = w.link.start_request(f"pin {w.file.oid:016x} #{blk} @{revs}")
            except PinError as err:
                self._pin_failed(w, blk, revs, err, deadline)
                continue
            inflight.append((w, blk, rev, revs, sid, waiter))
        for w, blk, rev, revs, sid, waiter in inflight:
            try:
                reply = w.link.wait_reply(sid, waiter, deadline)
                if reply != "ack":
                    raise PinError("reply", f"expected ack; got {reply!r}")
            except PinError as err:
                self._pin_failed(w, blk, revs, err, deadline)
                continue
            with w.mu:
                if rev is None:
                    w.pinned.pop(blk, None)
                else:
                    w.pinned[blk] = rev

    def _pin_failed(self, w: Watch, blk: int, revs: str, err: PinError, deadline: float) -> None:
        log.warning("pid%d: pin %s #%d @%s: %s", w.link.pid, hex16(w.file.oid), blk, revs, err)
        w.link.pin_failed(blk, revs, err, deadline)

    def _pin_on_read(self, f: BigFile, blk: int, bound: int) -> None:
        """§2.5: before a head block leaves the server, lagging watchers pin it."""
        with f.watch_mu:
            lagging = [w for w in f.watches if w.at < bound]
        if not lagging:
            return
        last = self.history.lastrev(f.zoid, blk)
        if last is not None and last[1]:
            head_rev = last[0]                       # known exactly: no history walk
        else:
            head_rev, _ = self.history.blk_rev_at(f.zoid, blk, self.head)
        held, todo = [], []
        try:
            for w in lagging:
                w.atlock.acquire_shared()
                held.append(w)
                if w.at >= head_rev or w.link.down:
                    continue
                rev, _ = self.history.blk_rev_at(f.zoid, blk, w.at)
                with w.mu:
                    if w.pinned.get(blk) == rev:
                        continue
                todo.append((w, blk, rev))
            self._run_pins(todo)
        finally:
            for w in held:
                w.atlock.release_shared()

    def unregister_link_watches(self, link: WatchLink) -> None:
        with link.mu:
            watches = list(link.byfile.values())
            link.byfile.clear()
        for w in watches:
            with w.file.watch_mu:
                w.file.watches.discard(w)

    def deal_with_faulty_client(self, link: WatchLink, err: PinError, deadline: float,
                                blk: int, rev: str) -> None:
        """§2.6: a client failed a pin.  Kill it unless it is already going away."""
        pid = link.pid
        if err.kind == "io":
            if wait_gone(pid, min(3.0, max(0.0, deadline - time.monotonic()))):
                log.info("pid%d: gone after closing its watch link with pins in flight", pid)
                return
        elif err.kind == "timeout" and not proc_alive(pid):
            return
        why = f"pin #{blk} @{rev}: {err}"
        if kill_faulty(pid, self.pin_timeout, why):
            with self._tab_mu:
                self.stats["pinkill"] += 1
            return
        self.switch_to_eio(f"pid{pid}: could not kill faulty client ({why}): isolation cannot be kept")

    # --- commit processing ----------------------------------------------------------
    def run_zwatcher(self, stop: threading.Event) -> None:
        """Follow the storage and apply every commit until ``stop`` is set or the feed fails."""
        from .zstor import FeedError
        next_gc = time.monotonic() + 1.0
        while not stop.is_set():
            if time.monotonic() >= next_gc:
                self._gc_revs()
                # Decoded nodes superseded before the history tail: reloaded on demand
                # by the rare view that still needs them (a scan, so not per commit).
                self.reader.nodes.forget_before(self.history.tail)
                next_gc = time.monotonic() + 1.0
            try:
                commit = self.zstor.next_commit(0.2)
            except FeedError as exc:
                if stop.is_set():
                    return
                self.switch_to_eio(f"zwatcher failed: {exc}")
                return
            if commit is None:
                continue
            try:
                self._apply_commit(u64(commit.tid), commit.oids)
            except Exception as exc:
                log.exception("zwatcher: commit %s", commit.tid.hex())
                self.switch_to_eio(f"zwatcher failed: processing @{commit.tid.hex()}: {exc}")
                return
            if self.debug:
                self._zhead_publish(u64(commit.tid))

    def _pause_uploads(self) -> None:
        """Take the head lock exclusively with no page-cache upload in flight (§3.7)."""
        while True:
            self._head_lock.acquire_exclusive()
            with self._upload_cond:
                self._upload_paused = True
                if self._uploads_inflight == 0:
                    return
            self._head_lock.release_exclusive()
            with self._upload_cond:
                self._upload_cond.wait_for(lambda: self._uploads_inflight == 0, timeout=0.1)

    def _apply_commit(self, tid: int, oids) -> None:
        """Switch the head to ``tid`` (WCFS.md §3.3, with the ordering explained here).

        Phase 1, head lock exclusive and uploads paused: find the changed
        blocks, capture their old content (loading table or page cache:
        retrieve does not lock pages) and switch the internal head, so that
        every read from now on loads the new data.

        Phase 2, lock released, uploads still paused: store the captured old
        content into @rev caches (opening @rev files needs FUSE workers, which
        may all be parked on the head lock in phase 1) and drop the changed
        ranges from the head files' page cache.  This must not run under the head
        lock: the kernel waits for pages locked by READs in flight, and their
        handlers wait for the head lock.  A READ racing with phase 2 returns
        new data, or old data that the invalidation then drops.

        Only then ``head/at`` (``head_visible``) advances and watch setups
        waiting for it proceed: nothing older than it is left in head caches.
        """
        invals: list[tuple[BigFile, int]] = []
        keep: list[tuple[BigFile, int, int, bytes | memoryview]] = []   # old data to put into @rev caches
        sized: list[BigFile] = []
        self._pause_uploads()
        try:
            try:
                old_head = self.head
                self.reader.nodes.invalidate(oids, tid)
                deltas = self.history.update(tid, oids)
                with self._tab_mu:
                    files = {f.zoid: f for f in self._headv.files.values()}
                for foid, d in deltas.items():
                    f = files.get(foid)
                    if f is None:
                        continue
                    if d.epoch:
                        self._check_epoch(f, tid)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("@%s: %s: changed blocks %s%s", hex16(tid), self._fpath(f),
                                  sorted(d.blocks), " (size may change)" if d.size_changed else "")
                    for blk in sorted(d.blocks):
                        old = self._old_block(f, blk, old_head)
                        if old is not None:
                            keep.append((f, blk) + old)
                        invals.append((f, blk))
                    if d.size_changed:
                        maxkey, path = self.reader.maxkey(f.root, tid)
                        f.size = self._size(f.blksize, maxkey, hex16(f.oid))
                        self.history.track_path(foid, path)
                        sized.append(f)
                    f.rev_approx = tid
                self.head = tid
            finally:
                self._head_lock.release_exclusive()
            for f, blk, rev, data in keep:
                self._preserve(f, blk, rev, data)
            for f, blk in invals:
                self._inval_block(f, blk)
            for f in sized:
                self._inval_attr(f)
            with self._head_cond:
                self.head_visible = tid
                self._head_cond.notify_all()
            self._forget_history()
        finally:
            with self._upload_cond:
                self._upload_paused = False

    def _check_epoch(self, f: BigFile, tid: int) -> None:
        try:
            state, _ = self.reader.zbigfile(f.zoid, tid)
        except POSKeyError:
            state = "deleted"
        if state != (f.blksize, f.root):
            raise RuntimeError(f"ZBigFile {hex16(f.oid)} changed @{hex16(tid)} "
                               f"(blksize/blktab {f.blksize}/{f.root.hex()} -> {state})")

    def _old_block(self, f: BigFile, blk: int, old_head: int) -> tuple[int, bytes | memoryview] | None:
        """(rev, data) of a changed block as of the old head, if it is at hand (else None)."""
        bs = f.blksize
        old = None
        with f.mu:
            e = f.loading.pop(blk, None)
        if e is not None and e.ready.is_set() and e.error is None:
            old = e.data
        elif (blk + 1) * bs <= f.size:
            old = self._retrieve(f.ino, blk * bs, bs)
        if old is None:
            return None
        rev, _ = self.history.blk_rev_at(f.zoid, blk, old_head)
        return rev, old

    def _inval_block(self, f: BigFile, blk: int) -> None:
        try:
            self.session.notify_inval_inode(f.ino, blk * f.blksize, f.blksize)
        except OSError as exc:
            if exc.errno != errno.ENOENT:         # ENOENT: the kernel forgot the inode, nothing cached
                raise RuntimeError(f"{self._fpath(f)}: invalidate block #{blk}: {exc}") from exc

    def _preserve(self, f: BigFile, blk: int, rev: int, data) -> None:
        """Put old block data into the page cache of @<rev>/bigfile/<oid> (best effort)."""
        path = os.path.join(self.mountpoint, f"@{hex16(rev)}", "bigfile", hex16(f.oid))
        try:
            fd = os.open(path, os.O_RDONLY)   # makes the kernel know the inode; we are not a FUSE handler
            try:
                with self._tab_mu:
                    view = self._revs.get(rev)
                    rf = view.files.get(f.oid) if view is not None else None
                if rf is None:
                    raise RuntimeError(f"@{hex16(rev)}/bigfile/{hex16(f.oid)} vanished")
                if (blk + 1) * f.blksize <= rf.size:
                    self._store_block(rf.ino, blk * f.blksize, data, f.blksize)
            finally:
                os.close(fd)
        except Exception as exc:
            log.warning("%s: block #%d: could not preserve old data in @%s cache "
                        "(reading @revX/bigfile will be slow): %s", self._fpath(f), blk, hex16(rev), exc)

    def _inval_attr(self, f: BigFile) -> None:
        try:
            self.session.notify_inval_inode(f.ino, -1, 0)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise RuntimeError(f"{self._fpath(f)}: invalidate attributes: {exc}") from exc

    def _forget_history(self) -> None:
        cut_time = tid_time(self.head) - HISTORY_WINDOW
        cut = u64(TimeStamp(*time.gmtime(cut_time)[:5], cut_time % 60).raw())
        ats = [w.at for w in self._all_watches()]
        self.history.forget_past(min([cut, self.head] + ats))

    def _gc_revs(self) -> None:
        """Forget @rev views that no open file uses and that were idle for REV_IDLE."""
        now = time.monotonic()
        with self._tab_mu:
            idle = [v for v in self._revs.values() if v.nopen == 0 and now - v.last_used > REV_IDLE]
            for v in idle:
                del self._revs[v.rev]
        for v in idle:
            log.debug("forgetting idle @%s", hex16(v.rev))
            try:
                self.session.notify_inval_entry(ROOT, f"@{hex16(v.rev)}".encode())
            except OSError as exc:
                log.debug("@%s: inval entry: %s", hex16(v.rev), exc)

    # --- EIO mode ------------------------------------------------------------------
    def switch_to_eio(self, reason: str) -> None:
        """Stop serving data for good: never serve stale data (WCFS.md §3.8)."""
        if self.eio_reason is not None:
            return
        self.eio_reason = reason
        log.critical("%s", reason)
        log.critical("switching filesystem to EIO mode")
        with self._tab_mu:
            files = list(self._headv.files.values())
        for f in files:
            try:
                self.session.notify_inval_inode(f.ino, 0, 0)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.critical("%s: cannot drop page cache (%s): aborting the FUSE connection",
                                 self._fpath(f), exc)
                    self.session.exit()
                    return

    def shutdown(self) -> None:
        for link in self._links():
            link.shutdown("filesystem stopping", control=None, graceful=True)
        self._loaders.shutdown(wait=False, cancel_futures=True)
        self._uploaders.shutdown(wait=False, cancel_futures=True)
