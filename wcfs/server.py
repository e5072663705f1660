"""The ``wcfs serve`` process: mount the filesystem and follow the database.

Process structure (WCFS.md §3.1):

* the main thread opens the storage read-only (which fixes the initial head),
  mounts the filesystem, starts the FUSE session loop on a background thread
  and then runs the commit watcher (``WCFS.run_zwatcher``) until the
  filesystem is unmounted or the process is signalled;
* SIGTERM / SIGINT unmount cleanly; SIGQUIT dumps every thread's stack to
  stderr and exits (the stop sequence uses it on a stuck server);
* glibc's malloc is told to keep multi-MiB buffers on the heap: with the
  default dynamic mmap threshold every 2 MiB block allocation is a fresh
  mmap + page faults, measured ~10x slower (MEASURED.md).

The function returns the process exit code: 0 after a clean unmount, 1 if
the filesystem had to switch to EIO mode.
"""
from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import sys
import threading

from . import _fuse
from .fs import WCFS
from .zstor import open_zstor

log = logging.getLogger("wcfs")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


def escape_mount_option(value: str) -> str:
    """libfuse splits -o options at commas; a backslash escapes them."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def raise_readahead(mountpoint: str, kb: int = 2048) -> None:
    """Bigger readahead: 1 MiB READ requests instead of 128 KiB (MEASURED.md)."""
    st = os.stat(mountpoint)
    path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.info("could not raise readahead (%s): %s", path, exc)


def abort_connection(dev: int) -> None:
    path = f"/sys/fs/fuse/connections/{os.minor(dev)}/abort"
    try:
        with open(path, "w") as f:
            f.write("1\n")
        log.info("aborted FUSE connection %s", path)
    except OSError as exc:
        log.warning("could not abort FUSE connection (%s): %s", path, exc)


def serve(zurl: str, mountpoint: str, *, pin_timeout: float = 30.0, debug: bool = False,
          allow_other: bool = False) -> int:
    import zbigarray
    tune_malloc()
    zbigarray.install_wendelin_aliases()
    mountpoint = os.path.abspath(mountpoint)
    log.info('start "%s" "%s"', mountpoint, zurl)
    log.info("python %s, libfuse %s", sys.version.split()[0], _fuse.FUSE_VERSION)

    zstor = open_zstor(zurl)
    fs = WCFS(zstor, zurl, mountpoint, pin_timeout=pin_timeout, debug=debug)
    options = [f"fsname={escape_mount_option(zurl)}", "subtype=wcfs", "default_permissions",
               "auto_unmount"] + (["allow_other"] if allow_other else [])
    # Plenty of workers: reads may park on the head lock while a commit is applied,
    # and the kernel's answers to our notify-retrieves need a free worker then.
    session = _fuse.Session(fs, mountpoint, options, max_threads=64, max_idle_threads=16)
    fs.session = session
    stop = threading.Event()

    def loop() -> None:
        try:
            session.loop()
        except Exception:
            log.exception("FUSE session loop failed")
        finally:
            stop.set()

    def on_signal(signum, frame) -> None:
        log.info("signal %s: unmounting", signal.Signals(signum).name)
        stop.set()

    def on_sigquit(signum, frame) -> None:
        faulthandler.dump_traceback(all_threads=True)
        os._exit(3)

    try:
        session.mount()
    except Exception:
        zstor.close()
        raise
    loop_thread = threading.Thread(target=loop, name="wcfs-fuse", daemon=True)
    loop_thread.start()
    dev = os.stat(mountpoint).st_dev
    raise_readahead(mountpoint)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGQUIT, on_sigquit)
    # Dumped from the C signal handler: works even when the main thread is stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    log.info("serving %s @%016x", mountpoint, fs.head)

    try:
        fs.run_zwatcher(stop)
        if fs.eio_reason is not None:
            # Keep answering EIO (never stale data) until we are told to stop.
            stop.wait()
    finally:
        log.info('stop "%s" "%s"', mountpoint, zurl)
        fs.shutdown()
        session.unmount()
        session.exit()
        loop_thread.join(timeout=2)
        if loop_thread.is_alive():
            # Still busy (a lazily detached mount whose clients hold files open):
            # abort the connection so that the loop ends and clients get ENOTCONN.
            abort_connection(dev)
            loop_thread.join(timeout=5)
        zstor.close()
        if not loop_thread.is_alive():
            session.close()
    return 1 if fs.eio_reason is not None else 0
