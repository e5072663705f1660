"""Databases written by wendelin.core (py2 and py3 pickles) decode byte-exactly."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import ZODB

import zbigarray
from zbigarray import ZBigFile, ZBlk0, ZBlk1, open_filestorage
from conftest import TESTDATA

BLKSIZE = 2 * 1024 * 1024
KINDS = sorted(os.listdir(os.path.join(TESTDATA, "wendelin-zblk")))

HEAD = np.arange(32768, dtype=">u4").tobytes()                  # 128 KiB
EXPECT = {
    0: bytes(BLKSIZE),
    1: np.arange(4096, dtype=">u4").tobytes().ljust(BLKSIZE, b"\0"),
    2: bytes(BLKSIZE),
    3: HEAD + bytes(BLKSIZE - 2 * len(HEAD)) + HEAD[::-1],
}


def test_testdata_present():
    assert {"py2_pickle1", "py3_pickle3"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_decode(kind):
    zbigarray.install_wendelin_aliases()
    path = os.path.join(TESTDATA, "wendelin-zblk", kind, "zblk.fs")
    db = ZODB.DB(open_filestorage(path))
    try:
        conn = db.open()
        root = conn.root()
        zf = root["zbigf"]
        assert isinstance(zf, ZBigFile)
        assert isinstance(root["zblk0"], ZBlk0) and isinstance(root["zblk1"], ZBlk1)
        assert zf.blksize == BLKSIZE
        assert list(zf.blktab.keys()) == [1, 3]
        assert zf.size == 8 * 1024 * 1024
        for blk, want in EXPECT.items():
            assert zf.loadblk(blk) == want, blk
        # Raw (trailing zeros stripped) payloads.
        assert root["zblk0"].loaddata() == EXPECT[1].rstrip(b"\0")
        assert root["zblk1"].loaddata() == EXPECT[3].rstrip(b"\0")
        # Both ZBlk serials are the single commit's tid.
        assert root["zblk0"]._p_serial == root["zblk1"]._p_serial == db.lastTransaction()
        conn.close()
    finally:
        db.close()


def test_py2_filestorage_is_read_only(tmp_path):
    src = os.path.join(TESTDATA, "wendelin-zblk", "py2_pickle1", "zblk.fs")
    path = str(tmp_path / "py2.fs")
    shutil.copy(src, path)
    with pytest.raises(ValueError, match="read-only"):
        open_filestorage(path, read_only=False)
    stor = open_filestorage(path)
    assert stor.isReadOnly()
    stor.close()


def test_aliases_do_not_replace_real_modules(monkeypatch):
    zbigarray.install_wendelin_aliases()
    import sys
    mod = sys.modules["wendelin.bigfile.file_zodb"]
    assert mod.ZBlk is ZBlk0 and mod.ZBigFile is ZBigFile
    assert sys.modules["wendelin.bigarray.array_zodb"].ZBigArray is zbigarray.ZBigArray
    zbigarray.install_wendelin_aliases()          # idempotent
    assert sys.modules["wendelin.bigfile.file_zodb"] is mod
