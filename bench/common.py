"""Shared machinery of the benchmark suite: figures, servers, databases, page-cache tools.

What it provides.

* `Figure` -- one measured quantity over several runs (min/median/max), with
  an optional `Target`; `Report` -- what a benchmark returns (figures,
  parameters, notes).  A *ratio* against a baseline is an ordinary figure
  computed per run from a wcfs run and the baseline run next to it: the
  machine is shared and noisy, so only ratios of interleaved runs are worth
  comparing across machines and days.
* `Server` -- ``python -m wcfs serve ZURL MNT`` as it runs in production (no
  ``--debug``), started and waited for with timeouts, always unmounted and
  stopped by pid; `ZEO` -- ``runzeo`` on a free port.
* `build_zbigfiles` -- writes ZBigFiles with ZODB itself (a FileStorage the
  suite owns), so the server reads exactly what applications write.
* Page-cache helpers: `residency` (mincore, vectorised with numpy),
  `read_through` (sequential read() into one buffer), `warm_file`,
  `touch_pages` (mmap page-touch at C speed).
* Profiling: `Server` can run under py-spy or perf (``--profile``);
  `top_frames` and `perf_summary` turn their output into short text.

Databases live under the work directory, on tmpfs (``/dev/shm``) by default:
a ``Data.fs`` there can never be evicted, so the server and the in-process
baselines always read it from RAM, whatever the host's page-cache reclaim
does (on our VMs a daemon reclaims idle cache within seconds, MEASURED.md).

Concurrency: the suite is single-threaded except where a benchmark starts
threads itself; nothing here keeps shared mutable state.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

log = logging.getLogger("bench")

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
BINDIR = os.path.dirname(PY)
MiB = 1 << 20
GiB = 1 << 30


# --- figures -----------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A goal for the median of a figure: ``median >= value`` or ``median <= value``."""
    op: str                     # ">=" or "<="
    value: float
    source: str = ""            # where the target comes from (e.g. "issue 3")

    def met(self, v: float) -> bool:
        return v >= self.value if self.op == ">=" else v <= self.value

    def text(self, unit: str) -> str:
        sym = "≥" if self.op == ">=" else "≤"
        s = f"{sym} {fmt_num(self.value)} {unit}".rstrip()
        return f"{s} ({self.source})" if self.source else s


@dataclass
class Figure:
    """One quantity measured once per run."""
    name: str
    unit: str
    runs: list[float]
    target: Target | None = None

    @property
    def min(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def max(self) -> float:
        return max(self.runs)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.median)

    def as_json(self) -> dict:
        return {"name": self.name, "unit": self.unit, "runs": self.runs, "min": self.min,
                "median": self.median, "max": self.max,
                "target": None if self.target is None else
                {"op": self.target.op, "value": self.target.value, "source": self.target.source},
                "met": self.met}


@dataclass
class Report:
    """What one benchmark returns."""
    figures: list[Figure] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)       # extra raw numbers for the JSON only

    def add(self, name: str, unit: str, runs: Sequence[float], target: Target | None = None) -> Figure:
        if not runs:
            raise ValueError(f"figure {name!r}: no runs")
        fig = Figure(name, unit, [float(v) for v in runs], target)
        self.figures.append(fig)
        return fig

    def ratio(self, name: str, num: Sequence[float], den: Sequence[float],
              target: Target | None = None) -> Figure:
        """Per-run ratios of interleaved runs (run i of ``num`` over run i of ``den``)."""
        if len(num) != len(den):
            raise ValueError(f"ratio {name!r}: {len(num)} runs over {len(den)} runs")
        return self.add(name, "×", [a / b for a, b in zip(num, den)], target)


def fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def machine_info() -> dict:
    u = os.uname()
    info = {"nproc": len(os.sched_getaffinity(0)), "kernel": u.release, "host": u.nodename,
            "python": sys.version.split()[0], "loadavg": os.getloadavg()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            info["mem_total_mib"] = int(f.readline().split()[1]) // 1024
    return info


# --- processes -----------------------------------------------------------------------

def wait_until(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def is_mounted(mnt: str) -> bool:
    mnt = os.path.abspath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].replace("\\040", " ") == mnt for line in f)


def unmount(mnt: str) -> None:
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True, timeout=15)
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=15)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop a process this suite started: signal it by pid, wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class Server:
    """A ``wcfs serve`` process without ``--debug``, as production runs it.

    ``profile = (tool, prefix)`` attaches a profiler to the server for its
    whole life: ``py-spy`` writes ``<prefix>.svg`` (flame graph),
    ``<prefix>.txt`` (collapsed stacks) and, at stop, ``<prefix>.top.txt``
    (hottest lines, see `top_frames`); ``perf`` writes ``<prefix>.perf.data``
    and, at stop, ``<prefix>.perf.txt`` with the hottest user and kernel
    symbols (where py-spy cannot see: copies, FUSE, scheduling).
    """

    def __init__(self, zurl: str, mnt: str, *options: str, profile: tuple[str, str] | None = None,
                 timeout: float = 60.0) -> None:
        self.zurl = zurl
        self.mnt = os.path.abspath(mnt)
        os.makedirs(self.mnt, exist_ok=True)
        unmount(self.mnt)
        self.log_path = self.mnt + ".log"
        self._log = open(self.log_path, "ab")
        self.profilers: list[subprocess.Popen] = []
        self.profile = profile
        self.proc = subprocess.Popen([PY, "-m", "wcfs", "serve", *options, zurl, self.mnt],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT_DIR,
                                     env=dict(os.environ, WCFS_OPTIONS=""))
        try:
            wait_until(self._ready, timeout, f"wcfs serve {zurl} on {self.mnt}", 0.02)
            if profile:
                self._attach(*profile)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"wcfs serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            with open(os.path.join(self.mnt, ".wcfs/zurl")) as f:
                return f.read() == self.zurl
        except OSError:
            return False

    def _attach(self, tool: str, prefix: str) -> None:
        pid = str(self.proc.pid)
        if tool == "py-spy":
            spy = os.path.join(BINDIR, "py-spy")
            for fmt, ext in (("flamegraph", "svg"), ("raw", "txt")):
                self.profilers.append(subprocess.Popen(
                    [spy, "record", "--threads", "--nonblocking", "-r", "250", "-f", fmt,
                     "-o", f"{prefix}.{ext}", "--pid", pid],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        elif tool == "perf":
            self.profilers.append(subprocess.Popen(
                ["perf", "record", "-e", "cpu-clock", "-F", "2000", "-g", "-p", pid,
                 "-o", f"{prefix}.perf.data"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        else:
            raise ValueError(f"unknown profiler {tool!r}")
        time.sleep(0.5)          # let the profiler attach before the benchmark starts

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def path(self, *parts: str) -> str:
        return os.path.join(self.mnt, *parts)

    def bigfile(self, oid: int, rev: int | None = None) -> str:
        view = "head" if rev is None else f"@{rev:016x}"
        return self.path(view, "bigfile", f"{oid:016x}")

    def head_at(self) -> int:
        with open(self.path("head/at")) as f:
            return int(f.read(), 16)

    def stats(self) -> dict[str, int]:
        with open(self.path(".wcfs/stats")) as f:
            return {k.strip(): int(v) for k, v in (ln.split(":") for ln in f.read().splitlines())}

    def stop(self) -> None:
        try:
            for prof in self.profilers:
                # Both profilers write their output on SIGINT (ctrl-c) before exiting.
                stop_process(prof, 30, signal.SIGINT)
            if self.profilers and self.profile:
                tool, prefix = self.profile
                if tool == "perf":
                    perf_summary(prefix)
                else:
                    with open(f"{prefix}.top.txt", "w") as f:
                        f.write("# self time of the busiest lines (idle waits left out)\n")
                        f.writelines(f"{share * 100:5.1f}% {frame}\n"
                                     for frame, share in top_frames(f"{prefix}.txt", 40))
            if self.proc.poll() is None:
                unmount(self.mnt)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    stop_process(self.proc)
        finally:
            unmount(self.mnt)
            self._log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ZEO:
    """``runzeo`` serving one Data.fs on a free loopback port."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.port = free_port()
        self.log_path = path + ".zeo.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([os.path.join(BINDIR, "runzeo"), "-a", f"127.0.0.1:{self.port}",
                                      "-f", path], stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, timeout, f"runzeo on port {self.port}", 0.05)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"runzeo exited with {self.proc.returncode}, see {self.log_path}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    @property
    def zurl(self) -> str:
        return f"zeo://127.0.0.1:{self.port}"

    def stop(self) -> None:
        try:
            stop_process(self.proc)
        finally:
            self._log.close()

    def __enter__(self) -> "ZEO":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def perf_summary(prefix: str, n: int = 60) -> None:
    """Write ``<prefix>.perf.txt``: hottest symbols (self time), and callers of the kernel ones."""
    data = f"{prefix}.perf.data"
    with open(f"{prefix}.perf.txt", "w") as out:
        for args in (["--no-children", "--sort", "dso,sym", "-g", "none"],
                     ["--children", "--sort", "sym", "-g", "none"]):
            try:
                r = subprocess.run(["perf", "report", "-i", data, "--stdio", *args], capture_output=True,
                                   text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                out.write(f"perf report failed: {exc}\n")
                return
            lines = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
            out.write(f"# perf report {' '.join(args)}\n" + "\n".join(lines[:n]) + "\n\n")


def top_frames(collapsed_path: str, n: int = 12) -> list[tuple[str, float]]:
    """Self-time share of the busiest lines in a py-spy ``raw`` (collapsed stacks) file.

    py-spy leaves idle threads out by default, so this is where the server
    spends CPU (a native call shows as the Python line that made it).
    """
    selfs: dict[str, int] = {}
    total = 0
    try:
        with open(collapsed_path) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                leaf = stack.split(";")[-1]
                selfs[leaf] = selfs.get(leaf, 0) + int(count)
                total += int(count)
    except OSError:
        return []
    return [(k, v / total) for k, v in sorted(selfs.items(), key=lambda kv: -kv[1])[:n]] if total else []


# --- databases --------------------------------------------------------------------------

def block_content(pool: np.ndarray, blk: int, blksize: int, salt: int = 0) -> bytes:
    """Random-looking, distinct content for block ``blk``: a rotated window of a random pool
    with the block number and salt stamped in front (cheap for GiB-sized files)."""
    start = ((blk * 2654435761 + salt * 40503) % (len(pool) - blksize)) & ~7
    data = bytearray(pool[start:start + blksize].tobytes())
    data[:16] = blk.to_bytes(8, "little") + salt.to_bytes(8, "little")
    return bytes(data)


def random_pool(nbytes: int = 64 * MiB, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


@dataclass
class FileSpec:
    """A ZBigFile to write: ``nblk`` blocks of ``blksize``."""
    name: str
    blksize: int
    nblk: int
    salt: int = 0


@contextlib.contextmanager
def zblk_format(fmt: str) -> Iterator[None]:
    """Force the block format zbigarray writes ($ZBIGARRAY_ZBLK_FMT is read at every store)."""
    old = os.environ.get("ZBIGARRAY_ZBLK_FMT")
    os.environ["ZBIGARRAY_ZBLK_FMT"] = fmt
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ZBIGARRAY_ZBLK_FMT", None)
        else:
            os.environ["ZBIGARRAY_ZBLK_FMT"] = old


def build_zbigfiles(path: str, specs: Sequence[FileSpec], *, fmt: str = "ZBlk0",
                    txn_bytes: int = 64 * MiB, pool: np.ndarray | None = None) -> tuple[dict[str, int], int]:
    """Create ``path`` (a new FileStorage) holding the files; return ({name: oid}, last tid).

    Blocks are committed ``txn_bytes`` at a time and the connection cache is
    emptied after each commit, so the writer never holds the file in RAM.
    """
    import transaction
    import ZODB
    from ZODB.FileStorage import FileStorage
    from ZODB.utils import u64

    from zbigarray import ZBigFile

    for ext in ("", ".index", ".lock", ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + ext)
    pool = random_pool() if pool is None else pool
    db = ZODB.DB(FileStorage(path))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    oids: dict[str, int] = {}
    try:
        root = conn.root()
        files = {}
        for spec in specs:
            files[spec.name] = root[spec.name] = ZBigFile(spec.blksize)
        tm.commit()
        for spec in specs:
            zf = files[spec.name]
            oids[spec.name] = u64(zf._p_oid)
            per_txn = max(1, txn_bytes // spec.blksize)
            for blk in range(spec.nblk):
                with zblk_format(fmt):
                    zf.storeblk(blk, block_content(pool, blk, spec.blksize, spec.salt))
                if (blk + 1) % per_txn == 0:
                    tm.commit()
                    conn.cacheMinimize()
            tm.commit()
            conn.cacheMinimize()
        last = u64(db.storage.lastTransaction())
    finally:
        tm.abort()
        db.close()
    return oids, last


class Writer:
    """A read-write FileStorage connection for commits during a benchmark."""

    def __init__(self, path: str, fmt: str = "ZBlk0") -> None:
        import transaction
        import ZODB
        from ZODB.FileStorage import FileStorage
        self.fmt = fmt
        self.db = ZODB.DB(FileStorage(path))
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(self.tm)
        self.root = self.conn.root()

    def commit(self) -> int:
        from ZODB.utils import u64
        self.tm.commit()
        self.conn.cacheMinimize()
        return u64(self.db.storage.lastTransaction())

    def store(self, name: str, blk: int, data: bytes) -> None:
        with zblk_format(self.fmt):
            self.root[name].storeblk(blk, data)

    def close(self) -> None:
        self.tm.abort()
        self.db.close()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- page cache ------------------------------------------------------------------------

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
PAGE = mmap.PAGESIZE


def residency(path: str, off: int = 0, length: int | None = None) -> np.ndarray:
    """Page-cache residency (bool per page) of ``[off, off+length)`` of a file, by mincore.

    Mapping a file does not fault anything in; mincore only reports.  Call
    it right after the access it checks (idle cache is reclaimed in seconds).
    """
    with open(path, "rb") as f:
        if length is None:
            length = os.fstat(f.fileno()).st_size - off
        if length <= 0:
            return np.zeros(0, dtype=bool)
        mm = mmap.mmap(f.fileno(), length, mmap.MAP_SHARED, mmap.PROT_READ, offset=off)
    try:
        npages = (length + PAGE - 1) // PAGE
        vec = np.zeros(npages, dtype=np.uint8)
        view = np.frombuffer(mm, dtype=np.uint8)        # only for the mapping's address
        try:
            if _libc.mincore(view.ctypes.data, length, vec.ctypes.data) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"mincore {path}: {os.strerror(e)}")
        finally:
            del view
        return (vec & 1).astype(bool)
    finally:
        mm.close()


def resident_fraction(path: str, off: int = 0, length: int | None = None) -> float:
    r = residency(path, off, length)
    return float(r.mean()) if len(r) else 0.0


def read_through(path: str, chunk: int = MiB, buf: bytearray | None = None) -> int:
    """Read a whole file sequentially into one reused buffer; return the bytes read."""
    buf = bytearray(chunk) if buf is None else buf
    mv = memoryview(buf)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [mv])
            if n <= 0:
                return total
            total += n
    finally:
        os.close(fd)


def warm_file(path: str) -> None:
    """Make sure a (local) file is entirely in the page cache: read it if anything is missing."""
    if resident_fraction(path) < 1.0:
        read_through(path, 8 * MiB)


def touch_pages(path: str) -> int:
    """Map a file afresh and read one byte of every page at C speed; return the checksum."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        a = np.frombuffer(mm, dtype=np.uint8)
        try:
            return int(a[::PAGE].sum())
        finally:
            del a
    finally:
        mm.close()


def tune_malloc() -> None:
    """Keep multi-MiB buffers on the heap, as the server does (wcfs.server.tune_malloc).

    The in-process baselines allocate a 2 MiB record per load; with glibc's
    default mmap threshold each one is a fresh mmap plus 512 page faults
    (MEASURED.md).  Tuning the baseline like the server keeps the comparison
    about the data path, not about allocator settings.
    """
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)       # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)      # M_TRIM_THRESHOLD


# --- run context --------------------------------------------------------------------------

@dataclass
class BigDB:
    """A FileStorage with one ZBigFile of ``nblk`` × ``blksize`` ZBlk0 blocks."""
    path: str
    oid: int
    blksize: int
    nblk: int
    tid: int                 # last transaction

    @property
    def zurl(self) -> str:
        return f"file://{self.path}"

    @property
    def size(self) -> int:
        return self.blksize * self.nblk


@dataclass
class Context:
    """What every benchmark gets: mode, directories, shared datasets."""
    quick: bool
    workdir: str
    outdir: str
    profile: str | None = None          # None, "py-spy" or "perf"
    _cache: dict = field(default_factory=dict)
    _nprofile: int = 0

    def runs(self, full: int = 3, quick: int = 2) -> int:
        return quick if self.quick else full

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def server(self, zurl: str, mnt: str, *options: str) -> Server:
        profile = None
        if self.profile:
            self._nprofile += 1
            prefix = os.path.join(self.outdir, f"profile-{os.path.basename(mnt)}-{self._nprofile}")
            log.info("profiling the server with %s into %s.*", self.profile, prefix)
            profile = (self.profile, prefix)
        return Server(zurl, mnt, *options, profile=profile)

    @property
    def big_size(self) -> int:
        return 64 * MiB if self.quick else GiB

    def big_db(self) -> BigDB:
        """The shared big file (1 GiB, 64 MiB with --quick), built on first use; read-only."""
        db = self._cache.get("big")
        if db is None:
            blksize = 2 * MiB
            nblk = self.big_size // blksize
            path = self.path("big", "Data.fs")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            t0 = time.perf_counter()
            oids, tid = build_zbigfiles(path, [FileSpec("big", blksize, nblk)])
            log.info("built %s (%d × %d MiB) in %.1fs", path, nblk, blksize // MiB, time.perf_counter() - t0)
            db = self._cache["big"] = BigDB(path, oids["big"], blksize, nblk, tid)
        return db

    def big_db_copy(self, name: str) -> BigDB:
        """A private copy of the big database, for benchmarks that commit to it."""
        import shutil
        src = self.big_db()
        path = self.path(name, "Data.fs")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for ext in ("", ".index"):
            shutil.copyfile(src.path + ext, path + ext)
        return BigDB(path, src.oid, src.blksize, src.nblk, src.tid)


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far (threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def bdi_read_ahead_kb(path: str) -> int | None:
    """The readahead window the kernel uses for files of the filesystem holding ``path``."""
    st = os.stat(path)
    try:
        with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None
