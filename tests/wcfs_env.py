"""Test environment for the WCFS server: a writer database and a real server process.

* ``WriterDB`` -- the test process itself is the database writer: it opens the
  storage read-write (FileStorage, or a ZEO client) and commits; the server,
  a separate process, follows those commits.
* ``WcfsProc`` -- ``python -m wcfs serve --debug ZURL MNT`` in a subprocess;
  waits (bounded) until the mount answers, and on ``stop`` unmounts, signals,
  kills by pid and always leaves no mount behind.

Every wait here has a timeout.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
import time

import transaction
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.utils import u64

from zbigarray import ZBigFile

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def wait_until(cond, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _mountinfo_entry(mnt: str) -> list[str] | None:
    """The /proc/self/mountinfo fields of the mount at ``mnt`` (never touches the mount)."""
    mnt = os.path.abspath(mnt)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace("\\040", " ") == mnt:
                found = fields
    return found


def is_mounted(mnt: str) -> bool:
    return _mountinfo_entry(mnt) is not None


def abort_connection(mnt: str) -> None:
    """Abort the FUSE connection behind ``mnt`` (frees a server stuck in the kernel)."""
    e = _mountinfo_entry(mnt)
    if e is None:
        return
    minor = e[2].split(":")[1]
    try:
        with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
            f.write("1\n")
    except OSError:
        pass


def force_unmount(mnt: str) -> None:
    """Unmount without ever blocking on a hung server: lazy unmount (detach)."""
    if not is_mounted(mnt):
        return
    try:
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        abort_connection(mnt)
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=10)


class WriterDB:
    """A read-write connection to the test database."""

    def __init__(self, storage, zurl: str) -> None:
        self.storage = storage
        self.zurl = zurl
        self.db = ZODB.DB(storage)
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(self.tm)
        self.root = self.conn.root()

    @classmethod
    def filestorage(cls, path: str) -> "WriterDB":
        return cls(FileStorage(path), f"file://{path}")

    def new_file(self, name: str, blksize: int) -> ZBigFile:
        zf = ZBigFile(blksize)
        self.root[name] = zf
        self.commit()
        return zf

    def commit(self) -> int:
        self.tm.commit()
        return u64(self.storage.lastTransaction())

    def abort(self) -> None:
        self.tm.abort()

    @property
    def head(self) -> int:
        return u64(self.storage.lastTransaction())

    def close(self) -> None:
        self.tm.abort()
        self.db.close()


class WcfsProc:
    """A real ``wcfs serve`` process for one zurl."""

    def __init__(self, zurl: str, mnt: str, *options: str, env: dict | None = None) -> None:
        self.zurl = zurl
        self.mnt = mnt
        os.makedirs(mnt, exist_ok=True)
        self.log_path = mnt.rstrip("/") + ".log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wcfs", "serve", "--debug", *options, zurl, mnt],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT_DIR,
            env=dict(os.environ, **(env or {})))
        try:
            wait_until(self._ready, 30, f"wcfs serve {zurl} to mount {mnt}", 0.05)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"wcfs serve exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with open(os.path.join(self.mnt, ".wcfs/zurl")) as f:
                return f.read() == self.zurl
        except OSError:
            return False

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def path(self, *parts: str) -> str:
        return os.path.join(self.mnt, *parts)

    def head_at(self) -> int:
        with open(self.path("head/at")) as f:
            return int(f.read(), 16)

    def wait_head(self, tid: int, timeout: float = 10) -> None:
        wait_until(lambda: self.head_at() >= tid, timeout, f"head/at >= {tid:016x}")

    def stats(self) -> dict[str, int]:
        with open(self.path(".wcfs/stats")) as f:
            return {k.strip(): int(v) for k, v in (line.split(":") for line in f.read().splitlines())}

    def stop(self) -> None:
        """Stop the server; bounded even if it is stuck (then its connection is aborted)."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)          # unmounts cleanly
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    abort_connection(self.mnt)                # e.g. stuck in a notification
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            force_unmount(self.mnt)
            self._log.close()


def read_file(path: str, off: int = 0, size: int | None = None, readahead: bool = True) -> bytes:
    """pread a range; readahead=False reads exactly the range (the kernel reads no more)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if not readahead:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if size is None:
            size = os.fstat(fd).st_size - off
        out = bytearray()
        while len(out) < size:
            chunk = os.pread(fd, size - len(out), off + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(path: str, off: int, length: int) -> list[bool]:
    """Page-cache residency of [off, off+length) of a file (mincore on a fresh mapping).

    Call it right after the access it checks: a reclaim daemon on our machines
    can evict idle page cache within seconds.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, off)
    finally:
        os.close(fd)
    if addr == _MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, f"mmap {path}: {os.strerror(e)}")
    try:
        npages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * npages)()
        if _libc.mincore(addr, length, vec) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mincore: {os.strerror(e)}")
        return [bool(v & 1) for v in vec]
    finally:
        _libc.munmap(addr, length)


def block_resident(path: str, blk: int, blksize: int) -> bool:
    return all(resident_pages(path, blk * blksize, blksize))


def block_uncached(path: str, blk: int, blksize: int) -> bool:
    return not any(resident_pages(path, blk * blksize, blksize))


def stop_autostarted(mnt: str) -> None:
    """Stop the servers this process autostarted (wcfs_client.join) on ``mnt``; no mount left."""
    import wcfs_client
    from wcfs import mgmt
    with wcfs_client._mu:
        ours = [s for s in wcfs_client._autostarted if s.mountpoint == mnt]
        for s in ours:
            wcfs_client._autostarted.remove(s)
    for s in ours:
        s.stop()
    if mgmt.find_mount(mnt) is not None:
        mgmt.unmount(mnt)
    try:
        os.rmdir(mnt)
    except FileNotFoundError:
        pass


__all__ = ["WriterDB", "WcfsProc", "stop_autostarted", "wait_until", "is_mounted", "force_unmount", "read_file",
           "resident_pages", "block_resident", "block_uncached", "errno"]
