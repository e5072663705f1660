"""Command line of the benchmark suite (see the package docstring).

::

    python -m bench [--quick] [--only NAME[,NAME…]] [--out DIR] [--workdir DIR] [--keep]
                    [--profile {py-spy,perf}] [--list]

Benchmarks run one after another in registry order (those that commit to a
database use their own copy, so any subset can run alone).  A benchmark that
fails is reported as failed and the others still run; the exit status is 1
then.  Output: the Markdown is printed and written to
``DIR/bench-<stamp>.md`` and ``DIR/latest.md``, the raw numbers to
``DIR/bench-<stamp>.json`` and ``DIR/latest.json``.

The work directory (databases, mountpoints, server logs) defaults to a fresh
directory on tmpfs and is removed at the end unless ``--keep`` is given; when
a benchmark failed, the server logs are first copied to ``DIR/logs-<stamp>/``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from types import ModuleType

from . import cache_retention, client, pin_rtt, read_cold, read_warm, watch_setup
from .common import Context, Report, fmt_num, machine_info, tune_malloc, unmount, is_mounted

log = logging.getLogger("bench")

REGISTRY: list[ModuleType] = [read_cold, read_warm, cache_retention, pin_rtt, watch_setup, client]
BENCHMARKS: dict[str, ModuleType] = {m.NAME: m for m in REGISTRY}


def machine_line(m: dict) -> str:
    cpu = f" ({m['cpu']})" if "cpu" in m else ""
    load = ", ".join(f"{x:.2f}" for x in m["loadavg"])
    return (f"machine: nproc {m['nproc']}{cpu}, kernel `{m['kernel']}`, Python {m['python']}, "
            f"{m.get('mem_total_mib', '?')} MiB RAM, load average {load}")


def render_report(name: str, title: str, rep: Report | None, machine: dict, quick: bool,
                  seconds: float, error: str | None) -> str:
    out = [f"## {name} — {title}", "", machine_line(machine) + ("; **--quick**" if quick else ""), ""]
    if error is not None:
        out += ["**FAILED**:", "", "```", error.rstrip(), "```", ""]
        return "\n".join(out)
    assert rep is not None
    if rep.params:
        out += ["parameters: " + ", ".join(f"{k} = {v}" for k, v in rep.params.items()), ""]
    out += ["| figure | unit | runs | min | median | max | target | met |",
            "|---|---|---|---|---|---|---|---|"]
    for f in rep.figures:
        target = f.target.text(f.unit) if f.target else ""
        met = "" if f.met is None else ("yes" if f.met else "**NO**")
        out.append(f"| {f.name} | {f.unit} | {len(f.runs)} | {fmt_num(f.min)} | {fmt_num(f.median)} | "
                   f"{fmt_num(f.max)} | {target} | {met} |")
    out.append("")
    out += [f"- {n}" for n in rep.notes]
    out += ["", f"({seconds:.1f} s)", ""]
    return "\n".join(out)


def render_summary(results: list[dict]) -> str:
    rows = ["## Targets", "", "| benchmark | figure | median | target | met |", "|---|---|---|---|---|"]
    for r in results:
        if r["error"] is not None:
            rows.append(f"| {r['name']} | (failed) | | | **NO** |")
            continue
        for f in r["report"].figures:
            if f.target is not None:
                rows.append(f"| {r['name']} | {f.name} | {fmt_num(f.median)} {f.unit} | "
                            f"{f.target.text(f.unit)} | {'yes' if f.met else '**NO**'} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description="WCFS benchmark suite.")
    p.add_argument("--quick", action="store_true", help="small sizes, fewer runs (< 1 minute)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only these benchmarks (repeatable or comma-separated)")
    p.add_argument("--out", default="results", help="output directory (default: results/)")
    p.add_argument("--workdir", default=None,
                   help="where databases and mounts go (default: a new directory in /dev/shm)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--profile", choices=("py-spy", "perf"), default=None,
                   help="attach a profiler to every server (writes profile-* files to --out; "
                        "the figures are then distorted)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.list:
        for m in REGISTRY:
            print(f"{m.NAME:16} {m.TITLE}")
        return 0
    names = [n for arg in args.only for n in arg.split(",") if n] or [m.NAME for m in REGISTRY]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")

    tune_malloc()
    os.makedirs(args.out, exist_ok=True)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    workdir = args.workdir or tempfile.mkdtemp(prefix="wcfs-bench-", dir=base)
    os.makedirs(workdir, exist_ok=True)
    ctx = Context(quick=args.quick, workdir=os.path.abspath(workdir), outdir=os.path.abspath(args.out),
                  profile=args.profile)
    machine = machine_info()
    started = datetime.datetime.now()
    results: list[dict] = []
    t_all = time.perf_counter()
    try:
        for name in names:
            mod = BENCHMARKS[name]
            log.info("=== %s: %s", name, mod.TITLE)
            t0 = time.perf_counter()
            rep, error = None, None
            try:
                rep = mod.run(ctx)
            except Exception:
                error = traceback.format_exc()
                log.error("%s failed:\n%s", name, error)
            dt = time.perf_counter() - t0
            results.append({"name": name, "title": mod.TITLE, "report": rep, "error": error, "seconds": dt})
            print(render_report(name, mod.TITLE, rep, machine, args.quick, dt, error), flush=True)
    finally:
        leftovers = [os.path.join(dp, d) for dp, ds, _ in os.walk(ctx.workdir) for d in ds]
        for d in leftovers:
            if is_mounted(d):
                log.warning("unmounting leftover mount %s", d)
                unmount(d)
        if any(r["error"] for r in results):
            # Server and ZEO logs explain most failures; keep them with the results.
            logdir = os.path.join(ctx.outdir, f"logs-{started:%Y%m%d-%H%M%S}")
            for dp, _, fs in os.walk(ctx.workdir):
                for fn in fs:
                    if fn.endswith(".log"):
                        os.makedirs(logdir, exist_ok=True)
                        shutil.copy(os.path.join(dp, fn), logdir)
            log.info("server logs copied to %s", logdir)
        if not args.keep:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
        else:
            log.info("work directory kept: %s", ctx.workdir)
    total = time.perf_counter() - t_all

    header = [f"# WCFS benchmarks, {started:%Y-%m-%d %H:%M}", "",
              machine_line(machine) + ("; **--quick**" if args.quick else "") +
              (f"; **profiled with {args.profile} (figures distorted)**" if args.profile else ""),
              f"total time {total:.0f} s", ""]
    md = "\n".join(header) + "\n" + render_summary(results) + "\n" + "\n".join(
        render_report(r["name"], r["title"], r["report"], machine, args.quick, r["seconds"], r["error"])
        for r in results)
    doc = {"started": started.isoformat(timespec="seconds"), "quick": args.quick, "profile": args.profile,
           "machine": machine, "seconds": total,
           "benchmarks": {r["name"]: {"title": r["title"], "seconds": r["seconds"], "error": r["error"],
                                      **({"params": r["report"].params, "notes": r["report"].notes,
                                          "figures": [f.as_json() for f in r["report"].figures],
                                          "raw": r["report"].raw} if r["report"] else {})}
                          for r in results}}
    stamp = f"{started:%Y%m%d-%H%M%S}"
    for fname in (f"bench-{stamp}", "latest"):
        with open(os.path.join(args.out, fname + ".md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, fname + ".json"), "w") as f:
            json.dump(doc, f, indent=1)
    print(render_summary(results))
    print(f"written: {os.path.join(args.out, f'bench-{stamp}.md')} (+ .json), total {total:.0f} s")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
