"""``wcfs`` command line: ``serve``, ``status`` and ``stop`` (WCFS.md §6.6).

::

    wcfs serve [--pin-timeout SECONDS] [--debug] [--log-level LEVEL] ZURL [MOUNTPOINT]
    wcfs status ZURL
    wcfs stop ZURL

``python -m wcfs`` and the ``wcfs`` console script both end up in `main`, which
returns the exit status: 0 on success, 1 on failure, 2 on usage errors
(argparse's convention, also for a missing or unknown command).

``serve`` prepends the whitespace-separated words of ``$WCFS_OPTIONS`` to its
own arguments, so servers started by ``join()`` (which inherit the
environment) pick them up too.  Before serving in the foreground it applies
the same checks as `wcfs.mgmt.start`: a healthy server already answering on
the mountpoint is an error, the stale mount of a crashed one is unmounted.
The server implementation (`wcfs.server.serve`) is imported only by ``serve``
so that ``status`` and ``stop`` work without it.

Test hook: ``$WCFS_SERVE_IMPL=module:function`` replaces `wcfs.server.serve`
for ``serve`` (same signature).  It exists so that the management tests can
run a stand-in server whose process still looks exactly like
``python -m wcfs serve ZURL MOUNTPOINT``; it has no use in production.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable, Sequence

from wcfs import mgmt
from wcfs.log import setup_logging

log = logging.getLogger("wcfs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wcfs",
        description="WCFS: FUSE filesystem serving ZBigFiles of a ZODB database.",
        epilog="$WCFS_OPTIONS is prepended to the options of 'serve'.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    ps = sub.add_parser("serve", help="run a server in the foreground",
                        description="Serve ZURL as a WCFS filesystem in the foreground "
                                    "until unmounted or sent SIGTERM/SIGINT.")
    mgmt.add_serve_arguments(ps)
    pst = sub.add_parser("status", help="check the health of the server for ZURL",
                         description="Print ok/fail lines; exit 0 only when healthy.")
    pst.add_argument("zurl", metavar="ZURL")
    pstop = sub.add_parser("stop", help="unmount and stop the server for ZURL",
                           description="Unmount and stop the server for ZURL, killing "
                                       "processes that still use the mount.")
    pstop.add_argument("zurl", metavar="ZURL")
    return p


def _serve_impl() -> Callable[..., int]:
    spec = os.environ.get("WCFS_SERVE_IMPL", "")
    if spec:
        modname, _, func = spec.partition(":")
        if not modname or not func:
            raise RuntimeError(f"$WCFS_SERVE_IMPL={spec!r}: expected module:function")
        return getattr(importlib.import_module(modname), func)
    from wcfs.server import serve
    return serve


def _cmd_serve(args: argparse.Namespace) -> int:
    zurl = args.zurl
    mnt = (os.path.abspath(args.mountpoint) if args.mountpoint is not None
           else mgmt.mountpoint_for(zurl))
    try:
        mgmt.ensure_not_running(zurl, mnt)
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    serve = _serve_impl()
    return int(serve(zurl, mnt, pin_timeout=args.pin_timeout, debug=args.debug) or 0)


def _cmd_status(args: argparse.Namespace) -> int:
    return 0 if mgmt.status(args.zurl) else 1


def _cmd_stop(args: argparse.Namespace) -> int:
    try:
        mgmt.stop_zurl(args.zurl)
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``wcfs`` command line with `argv` (default: sys.argv[1:]); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        argv = ["serve"] + os.environ.get("WCFS_OPTIONS", "").split() + argv[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:          # -h (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    setup_logging(getattr(args, "log_level", "INFO"))
    handler = {"serve": _cmd_serve, "status": _cmd_status, "stop": _cmd_stop}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
