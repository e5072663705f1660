"""Stand-ins for ``wcfs.server.serve`` used by tests/test_mgmt.py.

Selected with ``WCFS_SERVE_IMPL=mgmt_fakeserver:<function>`` (tests/ on
PYTHONPATH), so the process still runs as ``python -m wcfs serve ZURL MNT``
and is found by the management code exactly like the real server.

* `record_serve` only writes its arguments to ``$MGMT_FAKESERVER_RECORD``.
* `serve` is a tiny FUSE server on the project's libfuse3 binding
  (``wcfs._fuse``) that serves just what management looks at: a root with
  ``.wcfs/zurl`` and ``.wcfs/stats``, mounted like the real server
  (fs type ``fuse.wcfs``, source = zurl) but without ``auto_unmount``, so
  that a killed server leaves its stale mount behind for the tests.

  Like the real server it unmounts (lazily) and exits on SIGTERM/SIGINT.
  Misbehaviour on demand, for the stop/status tests:

  - ``$MGMT_FAKESERVER_HANG=<path>``: while <path> exists, reads of the
    ``.wcfs/`` files it names (default: ``stats``) are parked and never
    answered (interrupts are ignored, so the reader is unkillable until the
    connection is aborted), and SIGTERM is ignored -- a wedged server that
    only a FUSE abort stops.
  - ``$MGMT_FAKESERVER_STUBBORN=1``: after its FUSE loop ended the process
    ignores SIGTERM and SIGQUIT and never exits: only SIGKILL ends it.
  - ``$MGMT_FAKESERVER_EXIT=<code>``: exit with <code> before mounting.

Concurrency: FUSE handlers run on the binding's worker threads; the only
shared mutable state is the list of parked requests, guarded by
`FakeFS.mu`.  Signal handlers run on the main thread, which waits in
``Session.loop()`` interruptibly.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import threading
import time

log = logging.getLogger("wcfs.fake")

ROOT, DOTWCFS, ZURL, STATS = 1, 2, 3, 4
TIMEOUT = 1.0            # entry/attr cache time


def record_serve(zurl: str, mountpoint: str, *, pin_timeout: float, debug: bool) -> int:
    with open(os.environ["MGMT_FAKESERVER_RECORD"], "w") as f:
        f.write(f"{zurl} {mountpoint} {pin_timeout} {debug}")
    return 0


def _hung() -> bool:
    flag = os.environ.get("MGMT_FAKESERVER_HANG")
    return bool(flag) and os.path.exists(flag)


def _hangs(name: str) -> bool:
    """Whether reads of .wcfs/<name> are to be parked: the hang flag file lists
    the names (whitespace-separated); an empty flag means just "stats"."""
    flag = os.environ.get("MGMT_FAKESERVER_HANG")
    try:
        with open(flag or "", "r") as f:
            names = f.read().split() or ["stats"]
    except OSError:
        return False
    return name in names


def _make_ops(zurl: str):
    from wcfs import _fuse

    class FakeFS(_fuse.Operations):
        def __init__(self) -> None:
            self.files = {ZURL: zurl.encode("utf-8", "surrogateescape"),
                          STATS: b"BigFile: 0\nRevHead: 0\nPinnedBlk: 0\n"}
            self.dirs = {ROOT: {b".wcfs": DOTWCFS}, DOTWCFS: {b"zurl": ZURL, b"stats": STATS}}
            self.mu = threading.Lock()      # protects parked
            self.parked: list = []          # requests never to be answered (hang mode)

        def attr(self, ino: int):
            if ino in self.dirs:
                return _fuse.Attr(ino=ino, mode=stat.S_IFDIR | 0o755, nlink=2)
            return _fuse.Attr(ino=ino, mode=stat.S_IFREG | 0o644, nlink=1,
                              size=len(self.files[ino]))

        def lookup(self, req, parent, name):
            ino = self.dirs.get(parent, {}).get(name)
            if ino is None:
                req.reply_err(errno.ENOENT)
            else:
                req.reply_entry(self.attr(ino), entry_timeout=TIMEOUT, attr_timeout=TIMEOUT)

        def getattr(self, req, ino, fh):
            if ino in self.dirs or ino in self.files:
                req.reply_attr(self.attr(ino), TIMEOUT)
            else:
                req.reply_err(errno.ENOENT)

        def open(self, req, ino, flags):
            if ino in self.dirs:
                req.reply_err(errno.EISDIR)
            elif (flags & os.O_ACCMODE) != os.O_RDONLY:
                req.reply_err(errno.EACCES)
            else:
                req.reply_open(0, direct_io=True)

        def read(self, req, ino, size, off, fh):
            name = "stats" if ino == STATS else "zurl"
            if _hangs(name):
                with self.mu:
                    self.parked.append(req)
                log.info("hang: parked a read of .wcfs/%s (pid %d)", name, req.pid)
                return
            req.reply_data(self.files[ino][off:off + size])

        def opendir(self, req, ino, flags):
            req.reply_open(0)

        def readdir(self, req, ino, size, off, fh):
            entries = [(b".", ino, stat.S_IFDIR), (b"..", ROOT, stat.S_IFDIR)]
            entries += [(name, child, stat.S_IFDIR if child in self.dirs else stat.S_IFREG)
                        for name, child in self.dirs[ino].items()]
            req.reply_dir(entries, size, off)

        def statfs(self, req, ino):
            req.reply_statfs(bsize=2 << 20, frsize=2 << 20)

    return FakeFS()


def serve(zurl: str, mountpoint: str, *, pin_timeout: float, debug: bool) -> int:
    from wcfs import _fuse

    code = os.environ.get("MGMT_FAKESERVER_EXIT")
    if code:
        log.error("exiting with %s as told", code)
        return int(code)
    fs = _make_ops(zurl)
    opt_zurl = zurl.replace("\\", "\\\\").replace(",", "\\,")
    session = _fuse.Session(fs, mountpoint, [f"fsname={opt_zurl}", "subtype=wcfs"],
                            max_threads=4)

    def on_term(signum, frame) -> None:
        if _hung():
            log.warning("wedged: ignoring %s", signal.Signals(signum).name)
            return
        log.info("%s: unmounting", signal.Signals(signum).name)
        session.unmount()
        session.exit()

    session.mount()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log.info('fake server start "%s" "%s"', mountpoint, zurl)
    try:
        session.loop()
    finally:
        log.info('fake server stop "%s" "%s"', mountpoint, zurl)
        session.close()
    if os.environ.get("MGMT_FAKESERVER_STUBBORN"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        log.warning("stubborn: refusing to exit")
        while True:
            time.sleep(3600)
    return 0
