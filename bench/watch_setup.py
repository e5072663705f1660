"""watch_setup: time of ``watch <foid> @<at>`` on files whose blocks were all read through head.

Setup.  Three ZBigFiles of 4 KiB blocks are created (tid ``at``) and the
server starts:

* A10   -- 10 000 blocks, 10 of them change after ``at``;
* A1000 -- 10 000 blocks, 1 000 change after ``at``;
* B10   --  1 000 blocks, 10 change after ``at``.

Every block of every file is read through ``head/`` (so the server tracks
all of them, WCFS.md §3.2), then one commit changes the K blocks of each
file, spread evenly.  (With --quick: 2 000 / 2 000 / 200 blocks and K = 10 /
200 / 10.)

Measured.  On a new watch link (the in-process single-threaded
`bench.wclient`, which acks each pin as soon as it reads it), the time from
writing ``watch <foid> @<at>`` to reading ``ok``, which includes sending and
acknowledging the K pins.  Each run measures the three files in turn, each
on a fresh link closed with ``bye`` afterwards, so every setup is a first
setup.  The pin counts are checked (must be K).

What it shows: setup cost per pin (A1000 vs A10) and that the setup does
not grow with the file size (A10 vs B10: same K, 10× the blocks); the
ratio A10/B10 is reported and should stay near 1.  A1000 is also set up by
a client that answers all pins of one ``read()`` with a single ``write()``:
the difference is what handling one FUSE write per ack costs the server.
"""
from __future__ import annotations

import logging
import os
import time

from .common import (Context, FileSpec, Report, Writer, block_content, build_zbigfiles, random_pool,
                     read_through, wait_until)
from .wclient import WatchClient

log = logging.getLogger("bench")

NAME = "watch_setup"
TITLE = "watch setup time vs number of pins and file size"

BLKSIZE = 4096


def run(ctx: Context) -> Report:
    if ctx.quick:
        cases = [("A10", 2000, 10), ("A1000", 2000, 200), ("B10", 200, 10)]
    else:
        cases = [("A10", 10_000, 10), ("A1000", 10_000, 1000), ("B10", 1000, 10)]
    path = ctx.path("watch", "Data.fs")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t0 = time.perf_counter()
    oids, at = build_zbigfiles(path, [FileSpec(n, BLKSIZE, nblk) for n, nblk, _ in cases],
                               pool=random_pool(4 << 20))
    log.info("database built in %.1fs", time.perf_counter() - t0)
    rep = Report(params={"blksize": "4 KiB", **{n: f"{nblk} blocks, K = {k}" for n, nblk, k in cases}})
    pool = random_pool(4 << 20, seed=3)
    times: dict[str, list[float]] = {n: [] for n, _, _ in cases}
    batched: list[float] = []
    with ctx.server(f"file://{path}", ctx.path("mnt-watch")) as srv:
        t0 = time.perf_counter()
        for name, _, _ in cases:
            read_through(srv.bigfile(oids[name]))
        log.info("all blocks read through head in %.1fs", time.perf_counter() - t0)
        with Writer(path) as w:
            for name, nblk, k in cases:
                for j in range(k):
                    blk = j * nblk // k
                    w.store(name, blk, block_content(pool, blk, BLKSIZE, salt=11))
            tid = w.commit()
        wait_until(lambda: srv.head_at() >= tid, 30, f"head/at >= {tid:016x}")
        many = cases[1]
        for r in range(ctx.runs(5, 3)):
            for (name, _, k), batch in [(c, False) for c in cases] + [(many, True)]:
                with WatchClient(srv.mnt, batch_acks=batch) as wc:
                    t0 = time.perf_counter()
                    reply = wc.watch(oids[name], at)
                    dt = time.perf_counter() - t0
                    if reply != "ok":
                        raise RuntimeError(f"watch {name} @{at:016x}: {reply}")
                    if wc.npins != k:
                        raise RuntimeError(f"watch {name}: {wc.npins} pins, expected {k}")
                (batched if batch else times[name]).append(dt * 1e3)
            log.info("run %d: %s, %s batched acks %.1f ms", r,
                     ", ".join(f"{n} {times[n][-1]:.1f} ms" for n in times), many[0], batched[-1])
    (a10, n_a, k_a), (a1000, _, k_b), (b10, n_b, _) = cases
    rep.add(f"setup, {n_a} blocks, K = {k_a}", "ms", times[a10])
    rep.add(f"setup, {n_a} blocks, K = {k_b}", "ms", times[a1000])
    rep.add(f"setup, {n_b} blocks, K = {k_a}", "ms", times[b10])
    rep.add(f"setup, {n_a} blocks, K = {k_b}, acks batched per read()", "ms", batched)
    rep.add(f"per pin ((K={k_b}) − (K={k_a})) / {k_b - k_a}", "µs",
            [(b - a) * 1e3 / (k_b - k_a) for a, b in zip(times[a10], times[a1000])])
    rep.ratio(f"{n_a} blocks / {n_b} blocks, same K = {k_a}", times[a10], times[b10])
    rep.notes.append("a fresh watch link per setup (the time includes acking the K pins, not opening the link)")
    return rep
