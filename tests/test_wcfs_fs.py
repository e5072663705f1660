"""WCFS server I end to end: a real server process following a FileStorage written by the test.

Scenarios of WCFS.md §1 and §3: layout and errors, reads and holes, @rev
views, page cache kept across commits for unchanged blocks and dropped for
changed ones, old data preserved into @rev caches, BTree splits and merges,
attributes after growth, EIO mode, interruptible reads.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from wcfs_env import WcfsProc, WriterDB, block_resident, block_uncached, read_file, wait_until

BS = 64 * 1024          # blksize used by most tests (a multiple of the page size)


def content(seed: int, n: int = BS) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def fsdb(tmp_path):
    w = WriterDB.filestorage(str(tmp_path / "Data.fs"))
    yield w
    w.close()


@pytest.fixture
def wcfs(fsdb, tmp_path):
    """A server over fsdb; created lazily so tests can populate the database first."""
    procs = []

    def start(*options: str, env: dict | None = None) -> WcfsProc:
        p = WcfsProc(fsdb.zurl, str(tmp_path / "mnt"), *options, env=env)
        procs.append(p)
        return p
    yield start
    for p in procs:
        p.stop()


def commit_and_wait(db: WriterDB, srv: WcfsProc) -> int:
    tid = db.commit()
    srv.wait_head(tid)
    return tid


def fpath(srv: WcfsProc, zf, rev: int | None = None) -> str:
    view = "head" if rev is None else f"@{rev:016x}"
    return srv.path(view, "bigfile", zf._p_oid.hex())


# --- layout ---------------------------------------------------------------------

def test_layout_and_small_files(fsdb, wcfs):
    srv = wcfs()
    assert sorted(os.listdir(srv.mnt)) == [".wcfs", "head"]
    assert sorted(os.listdir(srv.path("head"))) == ["at", "bigfile", "watch"]
    assert sorted(os.listdir(srv.path(".wcfs"))) == ["debug", "pintimeout", "stats", "zurl"]
    assert read_file(srv.path(".wcfs/zurl")).decode() == fsdb.zurl
    assert read_file(srv.path(".wcfs/pintimeout")) == b"30.0"
    at = read_file(srv.path("head/at"))
    assert len(at) == 16 and int(at, 16) == fsdb.head            # no trailing newline
    st = srv.stats()
    assert list(st) == ["BigFile", "RevHead", "ZHeadLink", "WatchLink", "Watch", "PinnedBlk", "pin", "pinkill"]
    assert st["BigFile"] == 0
    assert os.stat(srv.path("head")).st_mode & 0o7777 == 0o1555
    os.statvfs(srv.mnt)                                            # df works


def test_pintimeout_option(fsdb, wcfs):
    srv = wcfs("--pin-timeout", "7")
    assert read_file(srv.path(".wcfs/pintimeout")) == b"7.0"


def test_lookup_errors(fsdb, wcfs):
    zf = fsdb.new_file("zf", BS)
    fsdb.root["notfile"] = fsdb.root.__class__()     # a PersistentMapping
    fsdb.commit()
    srv = wcfs()
    cases = [srv.path("nosuch"), srv.path("@0123"), srv.path("@zzzzzzzzzzzzzzzz"),
             srv.path("head/bigfile/xyz"), srv.path("head/bigfile/00000000000000ff00"),
             srv.path("head/bigfile", "%016x" % 0xdead),            # missing object
             srv.path("head/bigfile", fsdb.root["notfile"]._p_oid.hex())]
    for p in cases:
        with pytest.raises(OSError) as e:
            os.stat(p)
        assert e.value.errno == errno.EINVAL, p
    assert "is not a ZBigFile" in srv.log()
    os.stat(fpath(srv, zf))                                       # the server is fine


# --- reads ------------------------------------------------------------------------

def test_reads_holes_short_blocks_eof(fsdb, wcfs):
    zf = fsdb.new_file("zf", BS)
    zf.storeblk(0, content(0))
    zf.storeblk(2, content(2, 1000))            # short block
    zf.storeblk(4, b"")                        # stored empty
    fsdb.commit()
    srv = wcfs()
    p = fpath(srv, zf)
    st = os.stat(p)
    assert st.st_size == 5 * BS and st.st_blksize == BS and st.st_mode & 0o777 == 0o444
    assert sorted(os.listdir(srv.path("head/bigfile"))) == [zf._p_oid.hex()]
    data = read_file(p)
    assert len(data) == 5 * BS
    assert data[:BS] == content(0)
    assert data[BS:2 * BS] == bytes(BS)                          # hole
    assert data[2 * BS:3 * BS] == content(2, 1000) + bytes(BS - 1000)
    assert data[3 * BS:] == bytes(2 * BS)
    # Unaligned and cross-block reads; reads at/after EOF return 0 bytes.
    assert read_file(p, BS - 10, 20) == content(0)[-10:] + bytes(10)
    assert read_file(p, 2 * BS + 990, 20) == content(2, 1000)[-10:] + bytes(10)
    assert read_file(p, 5 * BS, 100) == b""
    assert read_file(p, 9 * BS, 100) == b""
    assert srv.stats()["BigFile"] == 1


def test_big_blocks_and_concurrent_readers(fsdb, wcfs):
    """2 MiB blocks, several processes reading the same blocks at once."""
    bs = 2 << 20
    zf = fsdb.new_file("zf", bs)
    for k in range(4):
        zf.storeblk(k, content(k, bs))
    fsdb.commit()
    srv = wcfs()
    p = fpath(srv, zf)
    code = ("import sys, hashlib; d=open(sys.argv[1],'rb').read(); "
            "print(hashlib.sha1(d).hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", code, p], stdout=subprocess.PIPE) for _ in range(4)]
    import hashlib
    want = hashlib.sha1(b"".join(content(k, bs) for k in range(4))).hexdigest()
    for pr in procs:
        out, _ = pr.communicate(timeout=60)
        assert out.decode().strip() == want


def test_rev_views(fsdb, wcfs):
    zf = fsdb.new_file("zf", BS)
    zf.storeblk(0, content(1))
    t1 = fsdb.commit()
    srv = wcfs()
    zf.storeblk(0, content(2))
    zf.storeblk(1, content(3))
    t2 = commit_and_wait(fsdb, srv)
    assert read_file(fpath(srv, zf, t1)) == content(1)
    assert os.stat(fpath(srv, zf, t1)).st_size == BS
    assert read_file(fpath(srv, zf, t2)) == content(2) + content(3)
    assert read_file(fpath(srv, zf)) == content(2) + content(3)
    # Any syntactically valid rev works, not only actual transactions.
    assert read_file(fpath(srv, zf, t2 - 1)) == content(1)
    assert sorted(os.listdir(srv.path(f"@{t1:016x}"))) == ["bigfile"]
    # A rev before the file existed: EINVAL; a rev in the future: EINVAL.
    with pytest.raises(OSError) as e:
        os.stat(srv.path(f"@{t1 - 10**6:016x}", "bigfile", zf._p_oid.hex()))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.stat(srv.path(f"@{t2 + 10**9:016x}"))
    assert e.value.errno == errno.EINVAL
    assert srv.stats()["RevHead"] >= 2


def test_idle_rev_views_are_forgotten(fsdb, wcfs):
    zf = fsdb.new_file("zf", BS)
    zf.storeblk(0, content(1))
    t1 = fsdb.commit()
    srv = wcfs(env={"WCFS_REV_IDLE": "1"})
    zf.storeblk(0, content(2))
    t2 = commit_and_wait(fsdb, srv)
    assert read_file(fpath(srv, zf, t1)) == content(1)          # @t1 used, then closed
    fd = os.open(fpath(srv, zf, t2), os.O_RDONLY)               # @t2 kept open
    try:
        assert srv.stats()["RevHead"] == 2
        wait_until(lambda: srv.stats()["RevHead"] == 1, 10, "idle @rev forgotten")
        assert os.pread(fd, BS, 0) == content(2)                # the open one still works
        # A forgotten @rev comes back on demand.
        assert read_file(fpath(srv, zf, t1)) == content(1)
    finally:
        os.close(fd)


# --- page cache following commits ----------------------------------------------------

def test_page_cache_follows_commits(fsdb, wcfs):
    zf = fsdb.new_file("zf", BS)
    for k in range(8):
        zf.storeblk(k, content(k))
    t1 = fsdb.commit()
    srv = wcfs()
    p = fpath(srv, zf)
    assert read_file(p) == b"".join(content(k) for k in range(8))
    wait_until(lambda: all(block_resident(p, k, BS) for k in range(8)), 5, "blocks uploaded to page cache")

    zf.storeblk(3, content(33))
    t2 = commit_and_wait(fsdb, srv)
    # Right after the commit (the reclaim daemon may evict idle pages within seconds).
    resident = [block_resident(p, k, BS) for k in range(8)]
    assert block_uncached(p, 3, BS)
    assert resident == [True, True, True, False, True, True, True, True]
    # Old content of block 3 was preserved in the @rev cache: it is there without any read.
    rp = fpath(srv, zf, t1)
    assert block_resident(rp, 3, BS)
    assert read_file(rp, 3 * BS, BS) == content(3)
    # Head shows the new data.
    assert read_file(p, 3 * BS, BS) == content(33)
    assert read_file(p) == b"".join(content(33 if k == 3 else k) for k in range(8))
    assert t2 > t1


def test_growth_and_attributes(fsdb, wcfs):
    zf = fsdb.new_file("zf", BS)
    zf.storeblk(0, content(0))
    fsdb.commit()
    srv = wcfs()
    p = fpath(srv, zf)
    assert os.stat(p).st_size == BS
    mtime1 = os.stat(p).st_mtime
    read_file(p)
    zf.storeblk(5, content(5))
    commit_and_wait(fsdb, srv)
    st = os.stat(p)
    assert st.st_size == 6 * BS
    assert st.st_mtime >= mtime1
    assert read_file(p) == content(0) + bytes(4 * BS) + content(5)
    # Shrinking (the max key removed).
    del zf.blktab[5]
    commit_and_wait(fsdb, srv)
    assert os.stat(p).st_size == BS
    assert read_file(p) == content(0)


def test_btree_splits_and_merges(fsdb, wcfs):
    """Many blocks: splits, merges and deletions, with every block checked after each commit."""
    bs = 4096
    zf = fsdb.new_file("zf", bs)
    expect: dict[int, bytes] = {}
    for k in range(0, 300, 3):
        expect[k] = content(k, 100)
        zf.storeblk(k, expect[k])
    fsdb.commit()
    srv = wcfs()
    p = fpath(srv, zf)
    rng = np.random.default_rng(7)

    def check():
        size = (max(expect) + 1) * bs if expect else 0
        data = read_file(p)
        assert len(data) == size
        for k in range(size // bs):
            want = expect.get(k, b"").ljust(bs, b"\0")
            assert data[k * bs:(k + 1) * bs] == want, f"block {k}"

    check()
    for round_ in range(6):
        if round_ % 2 == 0:                      # fill holes: splits
            for k in rng.choice(400, 120, replace=False):
                expect[int(k)] = content(1000 * round_ + int(k), 100)
                zf.storeblk(int(k), expect[int(k)])
        else:                                     # delete many: merges
            for k in rng.choice(sorted(expect), min(100, len(expect)), replace=False):
                del zf.blktab[int(k)]
                del expect[int(k)]
        commit_and_wait(fsdb, srv)
        check()


def test_zblk1_blocks(fsdb, wcfs, monkeypatch):
    monkeypatch.setenv("ZBIGARRAY_ZBLK_FMT", "ZBlk1")
    zf = fsdb.new_file("zf", BS)
    data = bytearray(content(9))
    zf.storeblk(0, data)
    fsdb.commit()
    srv = wcfs()
    p = fpath(srv, zf)
    assert read_file(p) == bytes(data)
    data[5000] ^= 0xFF                            # one chunk changes: ZBlk1 re-stored
    zf.storeblk(0, data)
    commit_and_wait(fsdb, srv)
    assert read_file(p) == bytes(data)


# --- failures --------------------------------------------------------------------

def test_corrupt_block_is_eio_and_server_survives(fsdb, wcfs, monkeypatch):
    monkeypatch.setenv("ZBIGARRAY_ZBLK_FMT", "ZBlk0")
    zf = fsdb.new_file("zf", BS)
    zf.storeblk(0, content(0))
    zf.storeblk(1, content(1))
    fsdb.commit()
    zf.blktab[1]._data = b"x" * (BS + 1)          # longer than blksize: a data error
    zf.blktab[1]._p_changed = True
    fsdb.commit()
    srv = wcfs()
    p = fpath(srv, zf)
    with pytest.raises(OSError) as e:
        read_file(p, BS, BS)
    assert e.value.errno == errno.EIO
    assert read_file(p, 0, BS) == content(0)      # still serving
    assert "bytes > blksize" in srv.log()


def test_zbigfile_change_switches_to_eio_mode(fsdb, wcfs):
    zf = fsdb.new_file("zf", BS)
    zf.storeblk(0, content(0))
    fsdb.commit()
    srv = wcfs()
    p = fpath(srv, zf)
    assert read_file(p) == content(0)
    zf.blksize = 2 * BS                           # an epoch: not supported, must not serve stale data
    zf._p_changed = True
    tid = fsdb.commit()
    wait_until(lambda: "EIO mode" in srv.log(), 10, "EIO mode")
    with pytest.raises(OSError) as e:
        read_file(p)
    assert e.value.errno == errno.EIO
    assert f"changed @{tid:016x}" in srv.log()


def test_blocked_read_is_interruptible(fsdb, wcfs):
    """A reader blocked in the server (zhead waits for the next commit) can be killed."""
    srv = wcfs()
    code = "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); print('ready', flush=True); os.read(fd, 100)"
    pr = subprocess.Popen([sys.executable, "-c", code, srv.path(".wcfs/debug/zhead")],
                          stdout=subprocess.PIPE)
    try:
        assert pr.stdout.readline().strip() == b"ready"
        time.sleep(0.3)                            # let it block in read()
        assert pr.poll() is None
        pr.send_signal(signal.SIGKILL)
        pr.wait(timeout=10)                       # would hang forever without FUSE_INTERRUPT handling
    finally:
        if pr.poll() is None:
            pr.kill()
            pr.wait(timeout=10)
    wait_until(lambda: srv.stats()["ZHeadLink"] == 0, 10, "zhead handle released")
    assert srv.proc.poll() is None


def test_zhead_stream(fsdb, wcfs):
    zf = fsdb.new_file("zf", BS)
    srv = wcfs()
    fd = os.open(srv.path(".wcfs/debug/zhead"), os.O_RDONLY)
    try:
        tids = []
        for k in range(3):
            zf.storeblk(k, content(k))
            tids.append(fsdb.commit())
            assert os.read(fd, 100) == f"{tids[-1]:016x}\n".encode()
        assert srv.stats()["ZHeadLink"] == 1
    finally:
        os.close(fd)


def test_clean_stop_on_sigterm(fsdb, wcfs):
    srv = wcfs()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=20) == 0
    wait_until(lambda: not os.path.ismount(srv.mnt), 10, "unmount")
