"""WCFS server management: mountpoints, starting, finding, probing and stopping servers.

This module is shared by the ``wcfs`` command line (``serve``/``status``/``stop``)
and by the client's ``join()`` autostart.  It implements WCFS.md §6:

* **Naming.**  A zurl maps to ``<root>/<sha1 hex of the normalized zurl>`` with
  ``root = /dev/shm/wcfs`` (mode 01777).  Normalization makes equivalent NEO
  URLs (different credentials paths, client-only options, option or master
  order) share one server; other schemes are used verbatim.
* **Discovery.**  Mounts are read from ``/proc/self/mountinfo``; the serving
  process is found by heuristics (same uid as the FUSE connection, ``/dev/fuse``
  open, a ``wcfs serve`` command line naming the same zurl and mountpoint).
* **Start.**  `start` refuses when a healthy server answers on the mountpoint,
  unmounts the leftovers of a crashed one (its mount answers ENOTCONN or
  ECONNABORTED), spawns ``python -m wcfs serve`` and waits until
  ``.wcfs/zurl`` can be read, then opens the connection's fusectl ``abort``
  file so that the server can be aborted even when it no longer answers.
* **Stop.**  `Server.stop` runs the escalating stop sequence of §6.5 at most
  once: unmount; SIGTERM and abort the connection; SIGQUIT; SIGKILL; kill
  clients still using the dead mount; unmount again; remove the mountpoint.
  Every wait is bounded; a server stuck in the kernel even after SIGKILL is
  waited for at most ``stuck_timeout`` seconds and then reported as an error.
  Clients are found by path under the mountpoint and also by FUSE connection
  (``mnt_id`` in /proc/<pid>/fdinfo, device of mappings), because a server
  that is told to stop while busy detaches its mount lazily: its clients then
  no longer show paths under the mountpoint, yet still hold the dead
  connection.  (Mount ids and anonymous device numbers are reused at once
  after an unmount, so this matching is only trusted within the stop
  sequence.)
* **Status.**  `status` prints ``ok - …`` / ``fail - …`` lines.  The probes that
  touch the mount run in child processes with a timeout, because a request a
  hung server never answers can block the calling thread uninterruptibly
  (even SIGKILL does not free it until the connection is aborted).  A probe
  that does not die is left behind rather than waited for.

Concurrency: functions here keep no shared state except the per-`Server`
stop lock, so they may be called from any thread.  Nothing here touches a
mount from the calling thread: `start`'s attach and readiness reads run on a
helper thread joined with a timeout, `status` probes in child processes.

Test hooks: `mountpoint_for` and the functions built on it take ``root=``
to use a private mount root; `Server.stop` takes ``stuck_timeout=``; `status`
takes ``probe_timeout=``.  There is no environment variable for the mount root.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

log = logging.getLogger("wcfs")

__all__ = [
    "MOUNT_ROOT", "normalize_zurl", "mountpoint_for", "MountEntry", "parse_mountinfo",
    "find_mount", "fuse_abort_path", "find_server_pid", "Server", "start", "stop_zurl",
    "status", "ensure_not_running", "unmount", "add_serve_arguments", "stuck_dump",
    "mount_users",
]

MOUNT_ROOT = "/dev/shm/wcfs"
FUSECTL_DIR = "/sys/fs/fuse/connections"
STOP_TIMEOUT = 25.0          # T of the stop sequence (§6.5)
START_TIMEOUT = 30.0         # overall limit for a spawned server to come up
POLL_INTERVAL = 0.1          # start polls (process exit, mount readiness)
PROBE_TIMEOUT = 5.0          # each `status` probe
ATTACH_TIMEOUT = 10.0        # reading .wcfs/zurl of a server found on the mountpoint
STUCK_TIMEOUT = 300.0        # how long to wait for a server stuck in the kernel after SIGKILL
_CMD_TIMEOUT = 10.0          # fusermount3 / umount / mount helpers


# ---------------------------------------------------------------------------
# zurl normalization and mountpoint naming (§6.1)

_NEO_SECURITY_KEYS = ("ca", "cert", "key")
_NEO_CLIENT_ONLY_KEYS = ("compress", "read-only", "logfile", "cache-size")


def normalize_zurl(zurl: str) -> str:
    """Canonical form of `zurl` used to name its mountpoint.

    ``neo://`` / ``neos://``: drop ``ca``/``cert``/``key`` (any of them non-empty
    forces scheme ``neos``), drop the client-only options ``compress``,
    ``read-only``, ``logfile``, ``cache-size``, sort the remaining query items by
    key and sort the comma-separated master list (a ``<cluster>@`` prefix is
    kept).  Every other scheme (file, zeo, demo, postgres, …) is unchanged.
    """
    scheme, sep, _ = zurl.partition("://")
    if not sep or scheme.lower() not in ("neo", "neos"):
        return zurl
    return _normalize_neo(zurl)


def _normalize_neo(zurl: str) -> str:
    u = urlsplit(zurl)
    scheme = u.scheme.lower()
    cluster, at, masters = u.netloc.rpartition("@")
    masters_sorted = ",".join(sorted(m for m in masters.split(",") if m))
    netloc = cluster + at + masters_sorted
    kept: list[tuple[str, str]] = []
    for item in u.query.split("&"):
        if not item:
            continue
        rawkey, _, rawval = item.partition("=")
        key = unquote(rawkey)
        if key in _NEO_SECURITY_KEYS:
            if unquote(rawval) != "":
                scheme = "neos"
            continue
        if key in _NEO_CLIENT_ONLY_KEYS:
            continue
        kept.append((key, item))
    # stable sort by decoded key: items with equal keys keep their order
    kept.sort(key=lambda kv: kv[0])
    query = "&".join(item for _, item in kept)
    return urlunsplit((scheme, netloc, u.path, query, u.fragment))


def _ensure_root(root: str) -> None:
    os.makedirs(root, exist_ok=True)
    st = os.stat(root)
    want = 0o777 | stat.S_ISVTX
    if stat.S_IMODE(st.st_mode) != want and st.st_uid == os.getuid():
        # created just now (umask applied) or by us earlier with another mode
        os.chmod(root, want)


def mountpoint_for(zurl: str, create: bool = True, *, root: str | None = None) -> str:
    """Default mountpoint of `zurl`: ``<root>/<sha1 hex of normalize_zurl(zurl)>``.

    `root` defaults to ``/dev/shm/wcfs``.  With `create`, the root is created
    with mode 01777 (fixed if it exists, belongs to us and differs) and the
    mountpoint directory is created like ``mkdir -p``.
    """
    root = MOUNT_ROOT if root is None else root
    digest = hashlib.sha1(normalize_zurl(zurl).encode("utf-8", "surrogateescape")).hexdigest()
    mnt = os.path.join(root, digest)
    if create:
        _ensure_root(root)
        try:
            os.mkdir(mnt)
        except FileExistsError:
            # also the stale mount of a crashed server, where isdir() fails with ENOTCONN
            pass
    return mnt


def _norm_path(path: str, cwd: str | None = None) -> str:
    # no realpath: resolving would stat the mount root, which hangs on a hung server
    if cwd is not None and not os.path.isabs(path):
        path = os.path.join(cwd, path)
    return os.path.normpath(os.path.abspath(path))


# ---------------------------------------------------------------------------
# mount table (§6.6)

@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, with octal escapes undone."""
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str

    @property
    def dev(self) -> int:
        """st_dev of files on this mount."""
        return os.makedev(self.major, self.minor)

    def super_option(self, name: str) -> str | None:
        for opt in self.super_options.split(","):
            k, eq, v = opt.partition("=")
            if k == name:
                return v if eq else ""
        return None


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    raw = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)
    return os.fsdecode(raw)


def parse_mountinfo(data: bytes) -> list[MountEntry]:
    """Parse the content of a mountinfo file (proc(5)); malformed lines are skipped."""
    entries = []
    for line in data.split(b"\n"):
        if not line:
            continue
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            major, minor = fields[2].split(b":")
            entries.append(MountEntry(
                mount_id=int(fields[0]), parent_id=int(fields[1]),
                major=int(major), minor=int(minor),
                root=_unescape(fields[3]), mountpoint=_unescape(fields[4]),
                options=_unescape(fields[5]),
                fstype=_unescape(fields[sep + 1]), source=_unescape(fields[sep + 2]),
                super_options=_unescape(fields[sep + 3]) if len(fields) > sep + 3 else "",
            ))
        except (ValueError, IndexError):
            log.debug("mountinfo: skipping malformed line %r", line)
    return entries


def _read_mountinfo() -> list[MountEntry]:
    with open("/proc/self/mountinfo", "rb") as f:
        return parse_mountinfo(f.read())


def find_mount(mountpoint: str) -> MountEntry | None:
    """Topmost mount at `mountpoint` (the last matching mountinfo line), or None."""
    mnt = _norm_path(mountpoint)
    found = None
    for e in _read_mountinfo():
        if e.mountpoint == mnt:
            found = e
    return found


def _ensure_fusectl() -> None:
    if any(e.fstype == "fusectl" and e.mountpoint == FUSECTL_DIR for e in _read_mountinfo()):
        return
    log.info("mounting fusectl on %s", FUSECTL_DIR)
    _run(["mount", "-t", "fusectl", "fusectl", FUSECTL_DIR], check=True)


def fuse_abort_path(entry: MountEntry) -> str:
    """Path of the fusectl ``abort`` file of the FUSE connection behind `entry`.

    Mounts fusectl on /sys/fs/fuse/connections first if it is not mounted.
    """
    if not entry.fstype.startswith("fuse"):
        raise ValueError(f"wcfs: {entry.mountpoint}: not a FUSE mount ({entry.fstype})")
    _ensure_fusectl()
    # FUSE connections live on anonymous devices (major 0): the directory is the minor
    return os.path.join(FUSECTL_DIR, str(entry.minor), "abort")


# ---------------------------------------------------------------------------
# process discovery

def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [os.fsdecode(a) for a in raw.split(b"\0")[:-1]] if raw else []


def _has_dev_fuse(pid: int) -> bool:
    fddir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fddir)
    except OSError:
        return False
    return any(_readlink(f"{fddir}/{fd}") == "/dev/fuse" for fd in fds)


def _is_under(path: str, mnt: str) -> bool:
    return path == mnt or path.startswith(mnt + "/")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``wcfs serve`` (shared by the CLI and by server discovery)."""
    p.add_argument("--pin-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="time a client has to acknowledge a pin (default: 30)")
    p.add_argument("--debug", action="store_true",
                   help="enable .wcfs/debug/ and debug tracing")
    p.add_argument("--log-level", type=_log_level, default="INFO", metavar="LEVEL",
                   help="logging level name (default: INFO)")
    p.add_argument("zurl", metavar="ZURL", help="ZODB storage URL")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", default=None,
                   help="where to mount (default: /dev/shm/wcfs/<sha1 of normalized ZURL>)")


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s!r}")
    return v


def _log_level(s: str) -> str:
    from wcfs.log import parse_level
    try:
        parse_level(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


class _QuietParser(argparse.ArgumentParser):
    """Parser that raises instead of printing and exiting (for foreign command lines)."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def _serve_argv_tail(argv: Sequence[str]) -> list[str] | None:
    """Arguments after ``serve`` if `argv` runs ``wcfs serve``, else None.

    Recognized: ``<python> [opts] -m wcfs serve …`` and the console script,
    ``[<python>] …/wcfs serve …`` (a shebang script shows up with its interpreter).
    """
    n = len(argv)
    i = 1
    while i < n:                       # interpreter options before -m
        a = argv[i]
        if a == "-m" and i + 1 < n:
            rest = argv[i + 1:] if argv[i + 1] == "wcfs" else None
            break
        if a == "-mwcfs":
            rest = argv[i:]
            break
        if a in ("-X", "-W"):
            i += 2
            continue
        if not a.startswith("-") or a in ("-c", "-"):
            rest = None
            break
        i += 1
    else:
        rest = None
    if rest is None:
        for j in (0, 1):
            if j < n and os.path.basename(argv[j]) == "wcfs":
                rest = list(argv[j:])
                break
    if rest is None or len(rest) < 2 or rest[1] != "serve":
        return None
    return list(rest[2:])


def _parse_serve_cmdline(argv: Sequence[str]) -> tuple[str, str | None] | None:
    """(zurl, mountpoint or None) of a ``wcfs serve`` command line, else None."""
    tail = _serve_argv_tail(argv)
    if tail is None:
        return None
    p = _QuietParser(prog="wcfs serve", add_help=False)
    add_serve_arguments(p)
    try:
        args = p.parse_args(tail)
    except (ValueError, argparse.ArgumentError):
        return None
    return args.zurl, args.mountpoint


def _fuse_uid(entry: MountEntry) -> int:
    """uid owning the FUSE connection: owner of its abort file, else the user_id= option."""
    try:
        return os.stat(fuse_abort_path(entry)).st_uid
    except (OSError, RuntimeError) as e:
        uid = entry.super_option("user_id")
        if uid is not None and uid.isdigit():
            return int(uid)
        raise RuntimeError(f"wcfs: {entry.mountpoint}: cannot find the owner of the "
                           f"FUSE connection") from e


def find_server_pid(zurl: str, mountpoint: str, *, root: str | None = None) -> int | None:
    """Pid of the ``wcfs serve`` process serving `zurl` on `mountpoint`, or None.

    Candidates run as the uid owning the FUSE connection, have /dev/fuse open
    and run ``wcfs serve`` with this zurl and this mountpoint (explicit, or
    the default one for the zurl).  More than one candidate is an error.
    """
    mnt = _norm_path(mountpoint)
    entry = find_mount(mnt)
    if entry is not None and not entry.fstype.startswith("fuse"):
        return None
    uid = _fuse_uid(entry) if entry is not None else os.getuid()
    found = []
    for pid in _pids():
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
        except OSError:
            continue
        argv = _cmdline(pid)
        if not argv:
            continue
        parsed = _parse_serve_cmdline(argv)
        if parsed is None or parsed[0] != zurl:
            continue
        pmnt = parsed[1]
        if pmnt is None:
            pmnt = mountpoint_for(parsed[0], create=False, root=root)
        else:
            cwd = _readlink(f"/proc/{pid}/cwd")
            if cwd is None:
                continue
            pmnt = _norm_path(pmnt, cwd)
        if pmnt != mnt or not _has_dev_fuse(pid):
            continue
        found.append(pid)
    if len(found) > 1:
        raise RuntimeError(f"wcfs: {zurl} @ {mnt}: several server processes found: {found}")
    return found[0] if found else None


def mount_users(mountpoint: str, *, conn: MountEntry | None = None,
                exclude: Iterable[int] = ()) -> dict[int, list[str]]:
    """Processes using files under `mountpoint` -> what they use (fds, mappings, cwd, root).

    With `conn` (the mount entry of a FUSE connection), files of that connection
    are found even after the mount was detached (lazily unmounted): open files
    by the ``mnt_id`` of /proc/<pid>/fdinfo, mappings by device number.  Only
    link targets and /proc files are read, never the mount itself, so this is
    safe while the server hangs.  Our own pid is never reported.
    """
    mnt = _norm_path(mountpoint)
    skip = set(exclude) | {os.getpid()}
    users: dict[int, list[str]] = {}
    for pid in _pids():
        if pid in skip:
            continue
        uses = _uses_of(pid, mnt, conn)
        if uses:
            users[pid] = uses
    return users


def _uses_of(pid: int, mnt: str, conn: MountEntry | None) -> list[str]:
    uses: list[str] = []
    for what in ("cwd", "root"):
        t = _readlink(f"/proc/{pid}/{what}")
        if t is not None and _is_under(t, mnt):
            uses.append(f"{what} {t}")
    fddir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fddir)
    except OSError:
        fds = []
    for fd in fds:
        t = _readlink(f"{fddir}/{fd}")
        if t is None:
            continue
        if _is_under(t, mnt) or (conn is not None and t.startswith("/")
                                 and _fd_mnt_id(pid, fd) == conn.mount_id):
            uses.append(f"fd {fd} {t}")
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            maps = f.read()
    except OSError:
        maps = b""
    seen = set()
    for line in maps.split(b"\n"):
        # address perms offset dev inode [path]
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        t = os.fsdecode(parts[5])
        if t in seen:
            continue
        on_conn = False
        if conn is not None:
            major, _, minor = parts[3].partition(b":")
            try:
                on_conn = (int(major, 16), int(minor, 16)) == (conn.major, conn.minor)
            except ValueError:
                pass
        if on_conn or _is_under(t, mnt):
            seen.add(t)
            uses.append(f"mmap {t}")
    return uses


def _fd_mnt_id(pid: int, fd: str) -> int | None:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _kernel_stack(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stack") as f:
            return f.read().rstrip("\n") or "(empty)"
    except OSError as e:
        return f"(unreadable: {e.strerror})"


def stuck_dump(pid: int | None, mountpoint: str | None = None, *,
               conn: MountEntry | None = None) -> None:
    """Log the kernel stack of `pid` and, for each client of the mount, its argv,
    open files on the mount and kernel stack."""
    if pid is not None:
        log.warning("stuck dump: server pid%d %s; kernel stack:\n%s",
                    pid, _cmdline(pid), _kernel_stack(pid))
    if mountpoint is not None:
        users = mount_users(mountpoint, conn=conn, exclude=() if pid is None else (pid,))
        for cpid, uses in sorted(users.items()):
            log.warning("stuck dump: client pid%d %s uses:\n  %s\nkernel stack:\n%s",
                        cpid, _cmdline(cpid), "\n  ".join(uses), _kernel_stack(cpid))


def _log_users(mountpoint: str, users: dict[int, list[str]]) -> None:
    if not users:
        log.warning("%s: no process found using the mount", mountpoint)
    for pid, uses in sorted(users.items()):
        log.warning("%s: in use by pid%d %s:\n  %s", mountpoint, pid, _cmdline(pid),
                    "\n  ".join(uses))


# ---------------------------------------------------------------------------
# external commands, unmounting

def _tool_path() -> str:
    return os.environ.get("PATH", "") + ":/bin:/usr/bin"


def _run(cmd: list[str], *, check: bool = False,
         timeout: float = _CMD_TIMEOUT) -> subprocess.CompletedProcess | None:
    """Run a helper command; None if it could not run.  check=True raises RuntimeError."""
    exe = shutil.which(cmd[0], path=_tool_path())
    if exe is None:
        if check:
            raise RuntimeError(f"wcfs: {cmd[0]}: not found in PATH")
        log.warning("%s: not found in PATH", cmd[0])
        return None
    try:
        r = subprocess.run([exe] + cmd[1:], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        if check:
            raise RuntimeError(f"wcfs: {' '.join(cmd)}: timed out") from e
        log.warning("%s: timed out after %.1fs", " ".join(cmd), timeout)
        return None
    if check and r.returncode != 0:
        raise RuntimeError(f"wcfs: {' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def _fusermount_u(mnt: str, lazy: bool = False) -> tuple[bool, str]:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mnt]
    r = _run(cmd)
    if r is None:
        return False, "fusermount3 could not run"
    return r.returncode == 0, r.stderr.strip()


def unmount(mountpoint: str) -> bool:
    """Unmount a dead or idle mount: ``fusermount3 -u``, then ``umount -l``, then
    ``fusermount3 -u -z``.  True when nothing is mounted there any more."""
    mnt = _norm_path(mountpoint)
    if find_mount(mnt) is None:
        return True
    ok, err = _fusermount_u(mnt)
    if ok or find_mount(mnt) is None:
        return True
    log.warning("%s: fusermount3 -u: %s; trying lazy unmount", mnt, err)
    for cmd in (["umount", "-l", mnt], ["fusermount3", "-u", "-z", mnt]):
        r = _run(cmd)
        if find_mount(mnt) is None:
            return True
        if r is not None:
            log.warning("%s: %s: %s", mnt, " ".join(cmd), r.stderr.strip())
    return find_mount(mnt) is None


def _read_attach(mnt: str, timeout: float) -> bytes:
    """Content of ``<mnt>/.wcfs/zurl``; OSError as raised, TimeoutError if no answer.

    The read runs on a helper thread: a hung server would block it
    uninterruptibly, and the caller must stay able to give up.  Such a thread
    ends when the connection is aborted or the server dies.
    """
    path = os.path.join(mnt, ".wcfs", "zurl")
    result: list = []

    def read() -> None:
        try:
            with open(path, "rb") as f:
                result.append(f.read())
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=read, name="wcfs-attach", daemon=True)
    t.start()
    t.join(max(timeout, 0))
    if not result:
        raise TimeoutError(errno.ETIMEDOUT, f"{path}: no answer within {timeout:.1f}s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def ensure_not_running(zurl: str, mountpoint: str) -> None:
    """§6.4 pre-start checks: raise if a server answers on `mountpoint`; unmount
    the stale mount of a crashed server (ENOTCONN / ECONNABORTED)."""
    mnt = _norm_path(mountpoint)
    try:
        content = _read_attach(mnt, ATTACH_TIMEOUT)
    except TimeoutError as e:
        raise RuntimeError(f"wcfs: {zurl} @ {mnt}: a server is mounted there but does not "
                           f"answer (hung?); stop it with `wcfs stop`") from e
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise RuntimeError(f"wcfs: {zurl} @ {mnt}: cannot check for a running "
                               f"server: {e}") from e
        log.warning("%s: stale mount of a crashed server (%s); unmounting", mnt,
                    os.strerror(e.errno))
        if not unmount(mnt):
            raise RuntimeError(f"wcfs: {zurl} @ {mnt}: cannot unmount the stale mount "
                               f"of a crashed server") from e
        return
    if content.decode("utf-8", "surrogateescape") == zurl:
        raise RuntimeError(f"wcfs: {zurl} @ {mnt}: already running")
    raise RuntimeError(f"wcfs: {zurl} @ {mnt}: mountpoint is served for another zurl "
                       f"({content!r})")


# ---------------------------------------------------------------------------
# processes

class _Proc:
    """A process to watch and signal: our child (Popen, reaped by us) or a
    foreign one (watched through a pidfd, immune to pid reuse)."""

    def __init__(self, pid: int, popen: subprocess.Popen | None = None):
        self.pid = pid
        self.popen = popen
        self.pidfd: int | None = None
        if popen is None:
            try:
                self.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                pass        # already gone: wait() reports exited

    def wait(self, timeout: float) -> bool:
        """True once the process has exited (within `timeout` seconds)."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout=max(timeout, 0))
                return True
            except subprocess.TimeoutExpired:
                return False
        if self.pidfd is None:
            return True
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return bool(p.poll(max(timeout, 0) * 1000))

    def signal(self, sig: int) -> None:
        try:
            if self.popen is not None:
                self.popen.send_signal(sig)
            elif self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class Server:
    """Handle of a WCFS server process serving `zurl` on `mountpoint`.

    Obtained from `start` (our child) or built by `stop_zurl` for a server
    found on the system.  `entry` is the mount of the server's FUSE
    connection: the stop sequence uses it to abort the connection and to find
    its clients even after the mount was detached.  `stop` runs the stop
    sequence once; later or concurrent calls wait for the first one and return.
    """

    def __init__(self, zurl: str, mountpoint: str, pid: int | None, *,
                 popen: subprocess.Popen | None = None, entry: MountEntry | None = None):
        self.zurl = zurl
        self.mountpoint = _norm_path(mountpoint)
        self.pid = pid
        self.entry = entry
        self._proc = _Proc(pid, popen) if pid is not None else None
        self._stop_lock = threading.Lock()   # serializes stop(); protects _stopped, _abort_fd
        self._stopped = False
        self._abort_fd: int | None = None

    @property
    def popen(self) -> subprocess.Popen | None:
        return self._proc.popen if self._proc is not None else None

    def __repr__(self) -> str:
        return f"<wcfs.Server pid{self.pid} {self.zurl!r} @ {self.mountpoint}>"

    def _open_abort(self) -> None:
        """Open the fusectl abort file of our connection for writing (raises on failure)."""
        if self.entry is None:
            raise RuntimeError(f"wcfs: {self.mountpoint}: no FUSE connection known")
        self._abort_fd = os.open(fuse_abort_path(self.entry), os.O_WRONLY)

    def stop(self, timeout: float = STOP_TIMEOUT, *, stuck_timeout: float = STUCK_TIMEOUT) -> None:
        """Unmount and stop the server; make sure nothing is left using the mount.

        Steps of 0.2·timeout each (§6.5); once the deadline is past, each step
        gets 0.1 s.  If the server survives SIGKILL (stuck in the kernel), wait
        up to `stuck_timeout` more seconds, then raise RuntimeError.  Raises
        RuntimeError too if the mount cannot be removed.
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                self._stop(timeout, stuck_timeout)
            finally:
                self._close_abort()
                if self._proc is not None:
                    self._proc.close()

    def _close_abort(self) -> None:
        if self._abort_fd is not None:
            os.close(self._abort_fd)
            self._abort_fd = None

    def _stop(self, timeout: float, stuck_timeout: float) -> None:
        mnt = self.mountpoint
        deadline = time.monotonic() + timeout
        step = 0.2 * timeout

        def budget(part: float = 1.0) -> float:
            left = deadline - time.monotonic()
            return min(step * part, left) if left > 0 else 0.1

        proc = self._proc
        not_server = [self.pid] if self.pid is not None else []
        if self.entry is None:
            self.entry = find_mount(mnt)
        conn = self.entry
        if conn is not None and self._abort_fd is None:
            try:
                self._open_abort()          # also pins the identity of the connection
            except (OSError, RuntimeError, ValueError) as e:
                log.warning("%s: cannot open the FUSE abort file: %s", mnt, e)
        log.info("stopping %s @ %s (server %s)", self.zurl, mnt,
                 f"pid{self.pid}" if self.pid is not None else "not found")

        # 1. unmount; if busy, terminate the server and abort its connection
        if find_mount(mnt) is not None:
            ok, err = _fusermount_u(mnt)
            if ok:
                log.info("%s: unmounted", mnt)
            else:
                log.warning("%s: fusermount3 -u failed: %s", mnt, err)
                _log_users(mnt, mount_users(mnt, conn=conn, exclude=not_server))
                if proc is not None:
                    log.warning("pid%d: SIGTERM", proc.pid)
                    proc.signal(signal.SIGTERM)
                    if not proc.wait(budget()):
                        log.warning("pid%d: still alive after SIGTERM", proc.pid)
                        stuck_dump(proc.pid, mnt, conn=conn)
                self._abort()

        # 2. wait for the server, escalating
        if proc is not None:
            exited = proc.wait(budget())
            for sig in (signal.SIGQUIT, signal.SIGKILL):
                if exited:
                    break
                log.warning("pid%d: did not exit; sending %s", proc.pid, sig.name)
                stuck_dump(proc.pid, mnt, conn=conn)
                proc.signal(sig)
                exited = proc.wait(budget())
            if not exited:
                log.error("pid%d: did not exit after SIGKILL: probably stuck in kernel; "
                          "waiting up to %.0fs", proc.pid, stuck_timeout)
                stuck_dump(proc.pid, mnt, conn=conn)
                if not proc.wait(stuck_timeout):
                    raise RuntimeError(f"wcfs: stop {self.zurl} @ {mnt}: server pid{proc.pid} "
                                       f"is stuck in the kernel and did not exit")
            if proc.popen is not None:
                log.info("pid%d: exited with %s", proc.pid, proc.popen.returncode)
            else:
                log.info("pid%d: exited", proc.pid)

        # 3. the connection died with the server; its abort file is of no use now
        # (but it still tells whether the connection itself is gone, see step 4)
        conn_alive = self._conn_alive()
        self._close_abort()

        # 4. clients still on the dead connection must go, so that it can be
        # unmounted: restarting them beats leaving them on a dead mount.  The
        # server may have detached the mount itself, so look by connection too --
        # but only while that connection provably still exists: device numbers
        # and mount ids are reused at once, and another mount's users must
        # never be killed.
        users = mount_users(mnt, conn=conn if conn_alive else None, exclude=not_server)
        if users:
            _log_users(mnt, users)
            _kill_all(list(users), budget(0.5))

        # 5. last unmount try
        if find_mount(mnt) is not None:
            log.info("%s: last unmount try", mnt)
            if not unmount(mnt):
                _log_users(mnt, mount_users(mnt, conn=conn))
                raise RuntimeError(f"wcfs: stop {self.zurl} @ {mnt}: cannot unmount")

        # 6. remove the mountpoint
        try:
            os.rmdir(mnt)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("%s: cannot remove mountpoint: %s", mnt, e)
        log.info("stopped %s @ %s", self.zurl, mnt)

    def _conn_alive(self) -> bool:
        """Whether the FUSE connection we attached to still exists.

        Our abort file descriptor pins the fusectl inode of that connection;
        once the connection dies its fusectl directory is removed (the inode
        is unlinked) and a new connection with the same minor gets a new one.
        """
        if self._abort_fd is None or self.entry is None:
            return False
        try:
            st = os.fstat(self._abort_fd)
            cur = os.stat(fuse_abort_path(self.entry))
            return st.st_nlink > 0 and cur.st_ino == st.st_ino
        except OSError:
            return False

    def _abort(self) -> None:
        if self._abort_fd is None:
            try:
                self._open_abort()
            except (OSError, RuntimeError, ValueError) as e:
                log.error("%s: cannot open the FUSE abort file: %s", self.mountpoint, e)
                return
        log.warning("%s: aborting the FUSE connection", self.mountpoint)
        try:
            os.write(self._abort_fd, b"1\n")
        except OSError as e:
            log.error("%s: writing the FUSE abort file: %s", self.mountpoint, e)


def _kill_all(pids: list[int], per_signal: float) -> None:
    procs = [_Proc(pid) for pid in pids]
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in procs if not p.wait(0)]
            if not alive:
                return
            for p in alive:
                log.warning("pid%d %s: %s", p.pid, _cmdline(p.pid), sig.name)
                p.signal(sig)
            end = time.monotonic() + per_signal
            for p in alive:
                p.wait(end - time.monotonic())
        for p in procs:
            if not p.wait(0):
                log.error("pid%d: did not exit after SIGKILL", p.pid)
    finally:
        for p in procs:
            p.close()


# ---------------------------------------------------------------------------
# start / stop (§6.4, §6.5)

def start(zurl: str, mountpoint: str | None = None, options: Sequence[str] = (), *,
          timeout: float = START_TIMEOUT, root: str | None = None) -> Server:
    """Spawn ``python -m wcfs serve [options] zurl mountpoint`` and wait until it serves.

    Raises RuntimeError if a server already answers there, if the child exits
    early ("exited with <code>") or does not come up within `timeout` (the
    child is stopped then).  $WCFS_OPTIONS is not added here: it reaches the
    child through the inherited environment and ``wcfs serve`` prepends it.
    """
    mnt = _norm_path(mountpoint) if mountpoint is not None else mountpoint_for(zurl, root=root)
    ensure_not_running(zurl, mnt)
    argv = [sys.executable, "-m", "wcfs", "serve", *options, zurl, mnt]
    log.info("starting for %s @ %s ...", zurl, mnt)
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)
    srv = Server(zurl, mnt, popen.pid, popen=popen)
    try:
        _wait_ready(srv, popen, timeout)
        srv.entry = find_mount(mnt)
        if srv.entry is None:
            raise RuntimeError(f"wcfs: start {zurl} @ {mnt}: served but no mount entry")
        srv._open_abort()
    except BaseException:
        try:
            srv.stop()
        except Exception:
            log.exception("stopping the failed server")
        raise
    log.info("started pid%d @ %s", popen.pid, mnt)
    return srv


def _wait_ready(srv: Server, popen: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = popen.poll()
        if code is not None:
            raise RuntimeError(f"wcfs: start {srv.zurl} @ {srv.mountpoint}: "
                               f"server exited with {code}")
        try:
            content = _read_attach(srv.mountpoint, max(deadline - time.monotonic(), 0.1))
        except FileNotFoundError:
            pass
        except TimeoutError as e:
            raise RuntimeError(f"wcfs: start {srv.zurl} @ {srv.mountpoint}: server does not "
                               f"answer within {timeout:.0f}s") from e
        except OSError as e:
            raise RuntimeError(f"wcfs: start {srv.zurl} @ {srv.mountpoint}: {e}") from e
        else:
            got = content.decode("utf-8", "surrogateescape")
            if got != srv.zurl:
                raise RuntimeError(f"wcfs: start {srv.zurl} @ {srv.mountpoint}: "
                                   f".wcfs/zurl is {got!r}")
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"wcfs: start {srv.zurl} @ {srv.mountpoint}: "
                               f"server did not come up within {timeout:.0f}s")
        time.sleep(POLL_INTERVAL)


def stop_zurl(zurl: str, mountpoint: str | None = None, *, timeout: float = STOP_TIMEOUT,
              stuck_timeout: float = STUCK_TIMEOUT, root: str | None = None) -> None:
    """``wcfs stop``: find the mount and its server process, run the stop sequence."""
    mnt = (_norm_path(mountpoint) if mountpoint is not None
           else mountpoint_for(zurl, create=False, root=root))
    entry = find_mount(mnt)
    pid = None
    if entry is None:
        log.info("%s: not mounted", mnt)
    else:
        pid = find_server_pid(zurl, mnt, root=root)
        if pid is None:
            log.warning("%s: server process not found", mnt)
    Server(zurl, mnt, pid, entry=entry).stop(timeout, stuck_timeout=stuck_timeout)


# ---------------------------------------------------------------------------
# status (§6.6)

_PROBE_CODE = """\
import os, sys
op, path = sys.argv[1], sys.argv[2]
if op == "stat":
    sys.stdout.write(str(os.stat(path).st_dev))
else:
    with open(path, "rb") as f:
        sys.stdout.buffer.write(f.read())
"""


class _ProbeTimeout(Exception):
    pass


def _probe(op: str, path: str, timeout: float) -> bytes:
    """Run one probe in a child process; bytes it printed, OSError-like
    RuntimeError on failure, _ProbeTimeout if it did not finish in time."""
    p = subprocess.Popen([sys.executable, "-I", "-S", "-c", _PROBE_CODE, op, path],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, close_fds=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        try:
            p.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            # blocked on an unanswered FUSE request: unkillable until the
            # connection is aborted; leave it (subprocess reaps it later)
            log.warning("probe pid%d is stuck in the kernel; leaving it", p.pid)
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()
        raise _ProbeTimeout() from None
    if p.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"probe exited with {p.returncode}")
    return out


def status(zurl: str, *, probe_timeout: float = PROBE_TIMEOUT, root: str | None = None,
           out=None) -> bool:
    """``wcfs status``: print ``ok - <subject>`` / ``fail - <subject>: <why>`` lines,
    stop at the first failure; True only when everything is healthy."""
    out = sys.stdout if out is None else out

    def ok(subject: str) -> None:
        print(f"ok - {subject}", file=out, flush=True)

    def fail(subject: str, why: str) -> bool:
        print(f"fail - {subject}: {why}", file=out, flush=True)
        return False

    mnt = mountpoint_for(zurl, create=False, root=root)
    subject = f"mount entry {mnt}"
    entry = find_mount(mnt)
    if entry is None:
        return fail(subject, "not mounted")
    if entry.fstype != "fuse.wcfs":
        return fail(subject, f"fs type is {entry.fstype!r}, not 'fuse.wcfs'")
    if entry.source != zurl:
        return fail(subject, f"source is {entry.source!r}, not {zurl!r}")
    ok(subject)

    subject = "wcfs server"
    try:
        pid = find_server_pid(zurl, mnt, root=root)
    except RuntimeError as e:
        return fail(subject, str(e))
    if pid is None:
        return fail(subject, "process not found")
    ok(f"{subject} pid{pid}")

    probes = [
        ("stat mountpoint", "stat", mnt),
        ("read .wcfs/zurl", "read", os.path.join(mnt, ".wcfs", "zurl")),
        ("read .wcfs/stats", "read", os.path.join(mnt, ".wcfs", "stats")),
    ]
    for subject, op, path in probes:
        try:
            got = _probe(op, path, probe_timeout)
        except _ProbeTimeout:
            fail(subject, "timed out (wcfs might be stuck)")
            stuck_dump(pid, mnt, conn=entry)
            return False
        except RuntimeError as e:
            return fail(subject, str(e))
        if op == "stat":
            dev = int(got)
            if dev != entry.dev:
                return fail(subject, f"st_dev {os.major(dev)}:{os.minor(dev)} != "
                                     f"mount {entry.major}:{entry.minor}")
        elif path.endswith("zurl"):
            text = got.decode("utf-8", "surrogateescape")
            if text != zurl:
                return fail(subject, f"{text!r} != {zurl!r}")
        ok(subject)
    return True
