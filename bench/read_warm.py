"""read_warm: reads of a ZBigFile that is in the page cache, against the same bytes on tmpfs.

What is measured.  The big file (1 GiB, 64 MiB with --quick) is read once
through ``head/bigfile/<oid>`` so that every page is cached, and a copy of
the same bytes is written to a tmpfs file.  Then, alternating between the
two files in every run:

* ``read()`` of 1 MiB chunks into one reused buffer, start to end;
* mmap page-touch: a fresh ``MAP_SHARED`` mapping, one byte read per page in
  order (numpy strided sum, i.e. C speed), so the figure is the cost of
  faulting cached pages in -- the client's hot path.

The minor page faults taken per MiB touched are reported for both files:
with 4 KiB pages a fault maps up to 16 cached pages around it ("fault
around"), larger folios map more, so this shows why mmap figures differ
when they do.

Once the cache is warm the server is not involved at all: these figures
show whether WCFS's way of filling the cache (notify-store from the server,
FUSE's address-space operations) leaves the kernel anything slower than
tmpfs.  Residency of the FUSE file is checked before every run (idle cache
is reclaimed on these VMs within seconds) and the file re-warmed if pages
went missing; the minimum residency seen is reported.

Target: within 10 % of tmpfs (ratio ≥ 0.9), for both access kinds.
"""
from __future__ import annotations

import logging
import os
import resource
import time

from .common import (Context, Report, Target, read_through, resident_fraction, touch_pages, MiB)

log = logging.getLogger("bench")

NAME = "read_warm"
TITLE = "warm (page-cache) reads of a ZBigFile vs the same bytes on tmpfs"


def copy_out(src: str, dst: str) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            b = fi.read(8 * MiB)
            if not b:
                return
            fo.write(b)


def timed(fn, path: str, size: int, faults: list[float] | None = None) -> float:
    """GB/s of ``fn(path)``; appends the minor page faults per MiB taken meanwhile to ``faults``."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    fn(path)
    dt = time.perf_counter() - t0
    if faults is not None:
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (size / MiB))
    return size / dt / 1e9


def run(ctx: Context) -> Report:
    db = ctx.big_db()
    rep = Report(params={"file": f"{db.size >> 20} MiB", "blksize": f"{db.blksize >> 20} MiB",
                         "read chunk": "1 MiB", "tmpfs": "/dev/shm"})
    ref = os.path.join("/dev/shm", f"wcfs-bench-warm-{os.getpid()}.bin")
    with ctx.server(db.zurl, ctx.path("mnt-warm")) as srv:
        path = srv.bigfile(db.oid)
        copy_out(path, ref)                        # also warms the FUSE file
        try:
            size = os.stat(path).st_size
            rd_w, rd_t, mm_w, mm_t, residency = [], [], [], [], []
            flt_w: list[float] = []
            flt_t: list[float] = []
            rewarms = 0

            def ensure_warm() -> None:
                nonlocal rewarms
                r = resident_fraction(path)
                residency.append(r)
                if r < 1.0:
                    rewarms += 1
                    read_through(path)

            # One untimed pass of each kind first (first-touch effects of the mapping code).
            ensure_warm()
            touch_pages(path)
            touch_pages(ref)
            for i in range(ctx.runs(5, 3)):
                ensure_warm()
                rd_w.append(timed(read_through, path, size))
                rd_t.append(timed(read_through, ref, size))
                ensure_warm()
                mm_w.append(timed(touch_pages, path, size, flt_w))
                mm_t.append(timed(touch_pages, ref, size, flt_t))
                log.info("run %d: read %.2f vs %.2f GB/s, mmap %.2f vs %.2f GB/s", i,
                         rd_w[-1], rd_t[-1], mm_w[-1], mm_t[-1])
        finally:
            os.unlink(ref)
    rep.add("wcfs read() 1 MiB", "GB/s", rd_w)
    rep.add("tmpfs read() 1 MiB", "GB/s", rd_t)
    rep.ratio("wcfs / tmpfs read()", rd_w, rd_t, Target(">=", 0.9, "within 10 %"))
    rep.add("wcfs mmap page-touch", "GB/s", mm_w)
    rep.add("tmpfs mmap page-touch", "GB/s", mm_t)
    rep.ratio("wcfs / tmpfs mmap page-touch", mm_w, mm_t, Target(">=", 0.9, "within 10 %"))
    rep.add("page faults per MiB touched, wcfs", "1/MiB", flt_w)
    rep.add("page faults per MiB touched, tmpfs", "1/MiB", flt_t)
    rep.notes.append(f"FUSE file residency before timed runs: min {min(residency):.4f}; "
                     f"re-warmed {rewarms} time(s)")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            rep.params["tmpfs THP"] = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        pass
    return rep
