"""read_cold: cold sequential read of a big ZBigFile through ``head/bigfile/<oid>``.

What is measured.  A 1 GiB ZBigFile (64 MiB with --quick) of 2 MiB ZBlk0
blocks with random content is read from start to end with ``read()`` of
1 MiB into one reused buffer, through a server that has *just started*: its
page cache for the file is empty (a new mount has new inodes) and its object
caches are empty too.  The same is done with an mmap page-touch (one byte
per page, in order), which is how clients really consume the data.

Against what.  The baseline (issue 3's "in-process loadBefore + copy") is
what a process does without WCFS: ``loadBefore`` of each block's ZBlk0 record
from the storage itself -- ZODB's ``FileStorage`` (a pread of the record) or
ZEO's ``ClientStorage`` -- and a copy of the payload into a preallocated,
already-faulted buffer, sequentially in the benchmark process.  A second,
stricter reference line uses the server's own zero-copy reader (records of
FileStorage served from a map of Data.fs, so it is a bare memcpy): the
difference to it is everything serving over FUSE costs.  Every run pairs one
baseline and one wcfs read taken seconds apart, and the ratio is computed per
pair.

Both sides read the same Data.fs from RAM -- it is on tmpfs unless
``--workdir`` says otherwise, and it is re-read into the page cache before
every timed read if any page of it went missing -- for FileStorage directly
and for ZEO through a ``runzeo`` on loopback.  One untimed warm-up pair per
backend comes first: the first pass over a freshly written Data.fs is
consistently slower on these VMs for both sides.

Targets (issue 3): ≥ 1 GB/s and ≥ 60 % of the baseline.  The absolute target
applies to FileStorage only: ZEO itself delivers 0.3-0.8 GB/s here
(MEASURED.md), below the target whatever WCFS does.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
from ZODB.utils import p64

from .common import (BigDB, Context, Report, Target, ZEO, bdi_read_ahead_kb, proc_cpu,
                     read_through, touch_pages, warm_file)

log = logging.getLogger("bench")

NAME = "read_cold"
TITLE = "cold sequential read of a big ZBigFile vs in-process load_before"


def block_refs(zurl: str, oid: int, at: int) -> tuple[int, list]:
    """(blksize, the ZBlk refs of blocks 0..n-1) of ZBigFile ``oid`` at ``at``."""
    from wcfs.zobj import ZReader
    from wcfs.zstor import open_zstor
    st = open_zstor(zurl)
    try:
        reader = ZReader(st.load_before)
        (blksize, root), _ = reader.zbigfile(p64(oid), at)
        maxkey, _ = reader.maxkey(root, at)
        refs = []
        for blk in range(maxkey + 1):
            lk = reader.lookup(root, blk, at)
            if lk.zblk is None:
                raise RuntimeError(f"block #{blk} is a hole: the benchmark file must be dense")
            refs.append(lk.zblk)
        return blksize, refs
    finally:
        st.close()


def open_plain_storage(zurl: str):
    """The storage a process without WCFS would use for ``zurl`` (read-only)."""
    if zurl.startswith("file://"):
        from ZODB.FileStorage import FileStorage
        return FileStorage(zurl[len("file://"):], read_only=True)
    if zurl.startswith("zeo://"):
        from ZEO.ClientStorage import ClientStorage
        host, _, port = zurl[len("zeo://"):].partition(":")
        return ClientStorage((host, int(port)), read_only=True, wait_timeout=30)
    raise ValueError(f"no plain storage for {zurl}")


def _timed_copy(payloads, nblocks: int, blksize: int, buf: np.ndarray) -> float:
    """Copy each payload (zero-padded to blksize) into ``buf``; GB/s of the whole loop.

    ``payloads`` is a generator: loading the records happens inside the timing.
    """
    dst = memoryview(buf)
    t0 = time.perf_counter()
    for payload in payloads:
        n = len(payload)
        dst[:n] = payload
        if n < blksize:
            dst[n:blksize] = bytes(blksize - n)
    return blksize * nblocks / (time.perf_counter() - t0) / 1e9


def plain_baseline_once(zurl: str, at: int, blksize: int, refs: list, buf: np.ndarray) -> float:
    """Storage ``loadBefore`` of every block record + copy of its payload into ``buf``; GB/s."""
    from wcfs.zobj import record_class, zblk0_payload, _RawUnpickler
    st = open_plain_storage(zurl)
    before = p64(at + 1)

    def payloads():
        for ref in refs:
            data, _, _ = st.loadBefore(ref.oid, before)
            u = _RawUnpickler(data[:512])
            u.load()
            payload = zblk0_payload(data, u.stream.tell())
            if payload is None:
                raise RuntimeError(f"{ref.oid.hex()}: not a ZBlk0 record ({record_class(data)})")
            yield payload
    try:
        return _timed_copy(payloads(), len(refs), blksize, buf)
    finally:
        st.close()


def baseline_once(zurl: str, at: int, blksize: int, refs: list, buf: np.ndarray) -> float:
    """The server's own zero-copy reader + copy of every payload into ``buf``; GB/s."""
    from wcfs.zobj import ZReader
    from wcfs.zstor import open_zstor
    st = open_zstor(zurl)
    reader = ZReader(st.load_before)
    try:
        return _timed_copy((reader.load_block(ref, at, blksize)[0] for ref in refs), len(refs), blksize, buf)
    finally:
        st.close()


class Cpu:
    """CPU seconds per GB served, split user/system, for the server and for the reader."""

    def __init__(self) -> None:
        self.srv_user: list[float] = []
        self.srv_sys: list[float] = []
        self.cli_sys: list[float] = []

    def add(self, srv0: tuple[float, float], srv1: tuple[float, float], cli0: os.times_result,
            cli1: os.times_result, size: int) -> None:
        gb = size / 1e9
        self.srv_user.append((srv1[0] - srv0[0]) / gb)
        self.srv_sys.append((srv1[1] - srv0[1]) / gb)
        self.cli_sys.append((cli1.system - cli0.system) / gb)


def wcfs_once(ctx: Context, zurl: str, mnt: str, oid: int, mode: str, cpu: Cpu | None) -> tuple[float, int | None]:
    """Cold read through a fresh server; return (GB/s, bdi read_ahead_kb)."""
    with ctx.server(zurl, mnt) as srv:
        path = srv.bigfile(oid)
        size = os.stat(path).st_size
        s0, c0 = proc_cpu(srv.pid), os.times()
        t0 = time.perf_counter()
        if mode == "read":
            n = read_through(path)
            if n != size:
                raise RuntimeError(f"read {n} bytes of {size}")
        else:
            touch_pages(path)
        dt = time.perf_counter() - t0
        if cpu is not None:
            cpu.add(s0, proc_cpu(srv.pid), c0, os.times(), size)
        return size / dt / 1e9, bdi_read_ahead_kb(path)


def measure_backend(ctx: Context, rep: Report, db: BigDB, label: str, zurl: str, runs: int,
                    with_mmap: bool, abs_target: Target | None) -> None:
    blksize, refs = block_refs(zurl, db.oid, db.tid)
    buf = np.ones(blksize, dtype=np.uint8)          # faulted in: the copy must not page-fault
    mnt = ctx.path(f"mnt-cold-{label.lower()}")
    cpu = Cpu()
    # Warm-up pair, not counted.
    plain_baseline_once(zurl, db.tid, blksize, refs, buf)
    baseline_once(zurl, db.tid, blksize, refs, buf)
    _, ra = wcfs_once(ctx, zurl, mnt, db.oid, "read", None)
    rep.params["bdi read_ahead_kb"] = ra
    base, zc, rd, mm = [], [], [], []
    for i in range(runs):
        warm_file(db.path)
        base.append(plain_baseline_once(zurl, db.tid, blksize, refs, buf))
        zc.append(baseline_once(zurl, db.tid, blksize, refs, buf))
        warm_file(db.path)
        rd.append(wcfs_once(ctx, zurl, mnt, db.oid, "read", cpu)[0])
        if with_mmap:
            warm_file(db.path)
            mm.append(wcfs_once(ctx, zurl, mnt, db.oid, "mmap", None)[0])
        log.info("%s run %d: baseline %.2f GB/s, read %.2f GB/s%s", label, i, base[-1], rd[-1],
                 f", mmap {mm[-1]:.2f} GB/s" if mm else "")
    rep.add(f"baseline storage loadBefore+copy, {label}", "GB/s", base)
    rep.add(f"reference: zero-copy reader+copy, {label}", "GB/s", zc)
    rep.add(f"wcfs read() 1 MiB, {label}", "GB/s", rd, abs_target)
    rep.ratio(f"wcfs read() / baseline, {label}", rd, base, Target(">=", 0.6, "issue 3"))
    rep.ratio(f"wcfs read() / zero-copy reference, {label}", rd, zc)
    if with_mmap:
        rep.add(f"wcfs mmap page-touch, {label}", "GB/s", mm)
        rep.ratio(f"wcfs mmap / baseline, {label}", mm, base, Target(">=", 0.6, "issue 3"))
    rep.add(f"server CPU per GB read(), user, {label}", "s/GB", cpu.srv_user)
    rep.add(f"server CPU per GB read(), system, {label}", "s/GB", cpu.srv_sys)
    rep.add(f"reader CPU per GB read(), system, {label}", "s/GB", cpu.cli_sys)


def fs_type(path: str) -> str:
    """Filesystem type holding ``path`` (longest matching mountpoint in /proc/mounts)."""
    best, kind = "", "?"
    path = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, typ = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, typ
    return kind


def run(ctx: Context) -> Report:
    db = ctx.big_db()
    rep = Report(params={"file": f"{db.size >> 20} MiB", "blksize": f"{db.blksize >> 20} MiB",
                         "format": "ZBlk0", "Data.fs": fs_type(db.path)})
    measure_backend(ctx, rep, db, "FileStorage", db.zurl, ctx.runs(5, 2), True, Target(">=", 1.0, "issue 3"))
    with ZEO(db.path) as zeo:
        measure_backend(ctx, rep, db, "ZEO", zeo.zurl, ctx.runs(3, 1), False, None)
    rep.notes.append("each wcfs run starts a new server (empty page cache and object caches); "
                     "ratios are per pair of runs taken seconds apart")
    rep.notes.append("CPU per GB: CPU seconds of the server process (all threads) and of the reading "
                     "process per GB read; server user + system close to 1/throughput means the "
                     "server is the bottleneck (2 vCPUs are shared by server, reader and ZEO)")
    return rep
