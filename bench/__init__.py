"""Benchmark suite of WCFS: ``python -m bench [--quick] [--only NAME] [--out DIR]``.

Each benchmark is a module with ``NAME``, ``TITLE`` and ``run(ctx) ->
Report`` (see `bench.common`), registered in `bench.__main__`.  The suite
prints one Markdown table per benchmark and writes the same text plus a
JSON of every raw number to the output directory (default ``results/``).

Principles, because the machine is shared and noisy:

* every figure is measured in several runs and reported as min/median/max;
* a figure with a baseline is compared by the *ratio* of interleaved runs
  (wcfs run i against baseline run i, both taken within seconds), and
  targets on ratios are what should be compared across machines;
* the data the server reads lives in RAM for both sides (tmpfs), so that
  "cold" means cold in WCFS, not a disk seek;
* targets are judged on the median and reported, never asserted: the
  benchmarks are not tests.

The servers run exactly as in production (``python -m wcfs serve``, no
``--debug``).  ``--profile py-spy`` or ``--profile perf`` attaches a profiler
to each of them and leaves its output next to the results (the figures are
then distorted by the sampling and flagged as such): py-spy shows the Python
side, perf the kernel side (copies, FUSE, scheduling) that py-spy cannot see.
"""
