"""The main demo (README's first command): big arrays in an embedded database.

Run: ``python -m zbigarray.demo [--dir DIR] [--mib N]``

It creates a FileStorage database (in a temporary directory unless ``--dir``
is given), builds a ZBigArray of ``--mib`` MiB by appending in steps and
committing, makes a small in-place change, and reopens the database to verify
every byte, reporting throughput and how the block formats were chosen
(``ZBlk0`` for whole blocks, ``ZBlk1`` for small changes).  The WCFS
shared-memory part of the demo builds on this once the server and client land.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import logging
import os
import sys
import tempfile
import time

import numpy as np
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from zbigarray import ZBigArray

log = logging.getLogger("zbigarray.demo")


def progress(msg: str) -> None:
    print(msg, flush=True)


PATCH = (12345).to_bytes(8, "little")


def patch_offset(nbytes: int, blksize: int) -> int:
    """Byte offset of the small in-place change: inside the middle block."""
    nblk = (nbytes + blksize - 1) // blksize
    return (nblk // 2) * blksize + 100


def build(path: str, nbytes: int, step: int) -> str:
    """Create the array by appending ``step``-byte slabs, then patch 8 bytes in place.

    Returns the sha1 of the expected final content.
    """
    db = ZODB.DB(FileStorage(path))
    try:
        conn = db.open()
        A = ZBigArray((0,), np.uint64)
        conn.root()["A"] = A
        transaction.commit()
        digest = hashlib.sha1()
        rng = np.random.default_rng(42)
        poff = patch_offset(nbytes, A.zfile.blksize)
        t0 = time.monotonic()
        done = 0
        while done < nbytes:
            n = min(step, nbytes - done) // 8
            slab = rng.integers(0, 2**63, n, dtype=np.uint64)
            A.append(slab)
            transaction.commit()
            raw = bytearray(slab.tobytes())
            if done <= poff < done + len(raw):
                raw[poff - done:poff - done + len(PATCH)] = PATCH
            digest.update(raw)
            done += n * 8
            progress(f"  appended {done >> 20:5d} / {nbytes >> 20} MiB")
        dt = time.monotonic() - t0
        progress(f"built {nbytes >> 20} MiB in {dt:.2f} s ({nbytes / dt / 1e6:.0f} MB/s)")

        # A small in-place change in the middle: the auto format stores it as ZBlk1.
        zf = A.zfile
        blk, inblk = divmod(poff, zf.blksize)
        block = bytearray(zf.loadblk(blk))
        block[inblk:inblk + len(PATCH)] = PATCH
        zf.storeblk(blk, block)
        transaction.commit()
        progress(f"changed {len(PATCH)} bytes of block #{blk} in place")
        conn.close()
    finally:
        db.close()
    return digest.hexdigest()


def verify(path: str, nbytes: int, expect_sha1: str) -> None:
    db = ZODB.DB(FileStorage(path, read_only=True))
    try:
        conn = db.open()
        A = conn.root()["A"]
        zf = A.zfile
        formats = collections.Counter(type(z).__name__ for z in zf.blktab.values())
        digest = hashlib.sha1()
        t0 = time.monotonic()
        nblk = (A.nbytes + zf.blksize - 1) // zf.blksize
        remaining = A.nbytes
        for blk in range(nblk):
            data = zf.loadblk(blk)
            digest.update(memoryview(data)[:min(remaining, zf.blksize)])
            remaining -= zf.blksize
        dt = time.monotonic() - t0
        if digest.hexdigest() != expect_sha1:
            raise SystemExit("verification FAILED: content differs from what was written")
        progress(f"read back {A.nbytes >> 20} MiB in {dt:.2f} s ({A.nbytes / dt / 1e6:.0f} MB/s), "
                 f"shape {A.shape}, content verified; blocks by format: {dict(formats)}")
        conn.close()
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zbigarray.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="directory for the database (default: a temporary one)")
    p.add_argument("--mib", type=int, default=256, help="array size in MiB (default 256)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="zbigarray-demo-") as tmp:
        dirpath = args.dir or tmp
        os.makedirs(dirpath, exist_ok=True)
        path = os.path.join(dirpath, "Data.fs")
        if os.path.exists(path):
            sys.exit(f"{path} exists; choose an empty --dir")
        nbytes = args.mib << 20
        progress(f"database: {path}")
        sha = build(path, nbytes, step=32 << 20)
        verify(path, nbytes, sha)
        progress(f"database size on disk: {os.path.getsize(path) >> 20} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
