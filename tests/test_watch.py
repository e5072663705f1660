"""WCFS server II: the isolation protocol on head/watch (WCFS.md §2).

The watcher in most tests is this test process through a raw client that
always acks.  Faulty clients run in child processes: the server kills them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import functools

import wcfs_env
from wcfs_env import WcfsProc, WriterDB, wait_until
from wlink import RawWatchLink

BS = 64 * 1024
TESTS = os.path.dirname(os.path.abspath(__file__))


# Exactly the blocks a test reads are tracked: no kernel readahead beyond them.
read_file = functools.partial(wcfs_env.read_file, readahead=False)


def content(seed: int, n: int = BS) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()


def drop_cache(path: str) -> None:
    """Evict a file's pages so that the next read goes to the server again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def env(tmp_path):
    db = WriterDB.filestorage(str(tmp_path / "Data.fs"))
    procs: list = []

    class Env:
        pass
    e = Env()
    e.db = db

    def start(*opts):
        srv = WcfsProc(db.zurl, str(tmp_path / "mnt"), *opts)
        procs.append(srv)
        e.srv = srv
        return srv
    e.start = start
    e.links = []

    def link():
        wl = RawWatchLink(e.srv.mnt)
        e.links.append(wl)
        return wl
    e.link = link

    def commit():
        tid = db.commit()
        e.srv.wait_head(tid)
        return tid
    e.commit = commit
    e.path = lambda zf, rev=None: e.srv.path("head" if rev is None else f"@{rev:016x}", "bigfile",
                                             zf._p_oid.hex())
    yield e
    for wl in e.links:
        wl.bye()
        wl.close()
    for p in procs:
        p.stop()
    db.close()


def setup_file(e, nblk=6):
    """A file with blocks 0..nblk-1 written at t0; returns (zf, foid, t0)."""
    zf = e.db.new_file("zf", BS)
    for k in range(nblk):
        zf.storeblk(k, content(k))
    t0 = e.db.commit()
    return zf, int.from_bytes(zf._p_oid, "big"), t0


def pins_of(pins) -> dict[int, int | None]:
    return {p.blk: p.at for p in pins}


# --- watch setup ---------------------------------------------------------------------

def test_initial_pins_rewatch_unwatch(env):
    zf, foid, t0 = setup_file(env)
    srv = env.start()
    p = env.path(zf)
    read_file(p, 0, 3 * BS)                    # blocks 0, 1, 2 read through head: tracked
    zf.storeblk(1, content(11))
    zf.storeblk(2, content(12))
    zf.storeblk(3, content(13))                # never read through head: not pinned
    t1 = env.commit()
    zf.storeblk(2, content(22))
    t2 = env.commit()

    wl = env.link()
    reply, pins = wl.watch(foid, t0)
    assert reply == "ok"
    assert pins_of(pins) == {1: t0, 2: t0}
    assert srv.stats()["Watch"] == 1 and srv.stats()["PinnedBlk"] == 2

    # Moving forward: only changed pins and unpins are sent.
    reply, pins = wl.watch(foid, t1)
    assert reply == "ok"
    assert pins_of(pins) == {1: None, 2: t1}
    # Same at again: nothing to send.
    reply, pins = wl.watch(foid, t1)
    assert (reply, pins) == ("ok", [])
    reply, pins = wl.watch(foid, t2)
    assert pins_of(pins) == {2: None}
    assert srv.stats()["PinnedBlk"] == 0

    # A fresh watch at t1 ends in the state the moved watch had at t1.
    wl2 = env.link()
    reply, fresh = wl2.watch(foid, t1)
    assert reply == "ok" and pins_of(fresh) == {2: t1}

    reply, pins = wl.watch(foid, None)          # unwatch
    assert (reply, pins) == ("ok", [])
    assert srv.stats()["Watch"] == 1           # wl2's watch remains
    assert srv.stats()["WatchLink"] == 2


def test_fresh_watch_equals_moved_watch(env):
    zf, foid, t0 = setup_file(env)
    env.start()
    read_file(env.path(zf))
    revs = [t0]
    for i in range(4):
        zf.storeblk(i % 3, content(100 + i))
        zf.storeblk(4, content(200 + i))
        revs.append(env.commit())
    moved = env.link()
    state: dict[int, int] = {}
    for at in revs:
        reply, pins = moved.watch(foid, at)
        assert reply == "ok"
        for pn in pins:
            if pn.at is None:
                state.pop(pn.blk, None)
            else:
                state[pn.blk] = pn.at
        fresh = env.link()
        reply, fpins = fresh.watch(foid, at)
        assert reply == "ok"
        assert pins_of(fpins) == state, at
        fresh.bye()


def test_two_files_one_link_and_two_links(env):
    zf, foid, t0 = setup_file(env, 2)
    zg = env.db.new_file("zg", BS)
    zg.storeblk(0, content(50))
    tg = env.db.commit()
    env.start()
    read_file(env.path(zf))
    read_file(env.path(zg))
    zf.storeblk(0, content(60))
    zg.storeblk(0, content(61))
    env.commit()
    wl = env.link()
    r1 = wl.send_async(f"watch {foid:016x} @{tg:016x}")
    r2 = wl.send_async(f"watch {int.from_bytes(zg._p_oid, 'big'):016x} @{tg:016x}")
    pins = []
    while not (r1.done() and r2.done()):
        try:
            req = wl.recv_req(timeout=0.1)
        except Exception:
            continue
        pins.append(req)
        wl.reply(req)
    assert r1.result() == r2.result() == "ok"
    assert sorted((pn.foid, pn.blk, pn.at) for pn in pins) == sorted(
        [(foid, 0, tg), (int.from_bytes(zg._p_oid, "big"), 0, tg)])
    wl2 = env.link()
    assert pins_of(wl2.watch(foid, tg)[1]) == {0: tg}


def test_setup_errors(env):
    zf, foid, t0 = setup_file(env, 2)
    srv = env.start()
    wl = env.link()
    # File not looked up yet.
    assert wl.send_req(f"watch {foid:016x} @{t0:016x}") == \
        f"error setup watch f<{foid:016x}> @{t0:016x}: file not yet known to wcfs or is not a ZBigFile"
    read_file(env.path(zf), 0, 1)
    # Older than the history tail (the server's start).
    old = t0 - 10**9
    r = wl.send_req(f"watch {foid:016x} @{old:016x}")
    assert r.startswith(f"error setup watch f<{foid:016x}> @{old:016x}: too far away back from head/at (@{t0:016x}); δt = ")
    # Going back in history.
    zf.storeblk(0, content(9))
    t1 = env.commit()
    assert wl.watch(foid, t1)[0] == "ok"
    assert wl.send_req(f"watch {foid:016x} @{t0:016x}") == \
        f"error setup watch f<{foid:016x}> @{t0:016x}: going back in history is forbidden"
    assert wl.watch(foid, t1)[0] == "ok"            # the link and the watch stay
    # Parse errors.
    assert wl.send_req("hello") == 'error bad watch: not a watch request: "hello"'
    assert wl.send_req("watch 1") == "error bad watch: expected 2 arguments, got 1"
    assert wl.send_req(f"watch {foid:016x} @{t1:016x} x") == "error bad watch: expected 2 arguments, got 3"
    assert wl.send_req(f"watch 123 @{t1:016x}") == "error bad watch: invalid oid"
    assert wl.send_req(f"watch {foid:016x} {t1:016x}") == "error bad watch: invalid at"
    assert wl.send_req(f"watch {foid:016x} @xyz") == "error bad watch: invalid at"
    # File epoch: a file created after the server started, watched before it existed.
    zh = env.db.new_file("zh", BS)
    th = env.db.head
    srv.wait_head(th)
    read_file(env.path(zh))
    hoid = int.from_bytes(zh._p_oid, "big")
    assert wl.send_req(f"watch {hoid:016x} @{t1:016x}") == \
        f"error setup watch f<{hoid:016x}> @{t1:016x}: file epoch detected @{th:016x} in between (at,head=@{th:016x}]"
    assert not wl.eof.is_set()


def test_watch_waits_for_head(env):
    zf, foid, t0 = setup_file(env, 1)
    env.start()
    read_file(env.path(zf))
    wl = env.link()
    future_at = t0 + 1
    res = {}
    th = threading.Thread(target=lambda: res.update(r=wl.watch(foid, future_at)), daemon=True)
    th.start()
    time.sleep(0.3)
    assert th.is_alive()                               # waiting for head >= at
    zf.storeblk(0, content(5))
    env.commit()
    th.join(10)
    reply, pins = res["r"]
    assert reply == "ok" and pins_of(pins) == {0: t0}


# --- pins on read -------------------------------------------------------------------

def test_pin_on_read_blocks_reader_until_ack(env):
    zf, foid, t0 = setup_file(env, 3)
    srv = env.start()
    p = env.path(zf)
    read_file(p, 0, 1)                               # look the file up
    wl = env.link()
    assert wl.watch(foid, t0) == ("ok", [])
    zf.storeblk(2, content(42))
    t1 = env.commit()
    code = ("import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); "
            "d=os.pread(fd, 16, 2*%d); print(d.hex(), flush=True)" % BS)
    reader = subprocess.Popen([sys.executable, "-c", code, p], stdout=subprocess.PIPE)
    try:
        req = wl.recv_req(timeout=10)
        assert (req.foid, req.blk, req.at) == (foid, 2, t0)
        time.sleep(0.5)
        assert reader.poll() is None                # still waiting for our ack
        wl.reply(req)
        out, _ = reader.communicate(timeout=10)
        assert bytes.fromhex(out.decode().strip()) == content(42)[:16]
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait(10)
    # No second pin for the same block/rev, even after the block is evicted and re-read.
    drop_cache(p)
    assert read_file(p, 2 * BS, BS) == content(42)
    with pytest.raises(Exception):
        wl.recv_req(timeout=0.5)
    assert srv.stats()["pin"] == 1
    # A watcher already at the new revision gets no pin.
    zf.storeblk(1, content(43))
    env.commit()
    wl2 = env.link()
    assert wl2.watch(foid, env.db.head) == ("ok", [])
    # Read from another thread: this thread must be free to ack (we are the watcher).
    th = threading.Thread(target=read_file, args=(p, BS, BS), daemon=True)
    th.start()
    req = wl.recv_req(timeout=10)                   # only the old watcher
    assert (req.blk, req.at) == (1, t0)
    wl.reply(req)
    th.join(10)
    assert not th.is_alive()
    with pytest.raises(Exception):
        wl2.recv_req(timeout=0.5)
    _ = t1


def test_pins_use_exact_block_revision(env):
    zf, foid, t0 = setup_file(env, 3)
    env.start()
    p = env.path(zf)
    read_file(p, 0, 1)
    zf.storeblk(0, content(70))
    t1 = env.commit()                                # block 2 unchanged at t1
    wl = env.link()
    assert wl.watch(foid, t1)[0] == "ok"
    zf.storeblk(2, content(71))
    env.commit()
    th = threading.Thread(target=read_file, args=(p, 2 * BS, 1), daemon=True)
    th.start()
    req = wl.recv_req(timeout=10)
    # block 2 last changed at t0 <= t1: the pin names t0, not the watch's at.
    assert (req.blk, req.at) == (2, t0)
    wl.reply(req)
    th.join(10)
    assert not th.is_alive()


# --- framing and protocol errors -------------------------------------------------------

@pytest.mark.parametrize("raw,expect", [
    (b"hello\n", '0 error: invalid frame: "hello" (invalid stream)'),
    (b"x1 watch\n", '0 error: invalid frame: "x1 watch" (invalid stream)'),
    (b"2 ack\n", "0 error: 2: unexpected reply (no such server request)"),
    (b"1 " + b"a" * 5000 + b"\n", "0 error: line too long"),
])
def test_invalid_frames_close_the_link(env, raw, expect):
    env.start()
    wl = env.link()
    wl.write_raw(raw)
    assert wl.eof.wait(10)
    assert wl.control and ("0 " + wl.control[0]).startswith(expect)
    wait_until(lambda: env.srv.stats()["WatchLink"] == 1, 5, "link still open until closed")
    wl.close()
    wait_until(lambda: env.srv.stats()["WatchLink"] == 0, 5, "link released")


def test_too_many_requests_in_flight(env):
    zf, foid, t0 = setup_file(env, 1)
    env.start()
    read_file(env.path(zf))
    wl = env.link()
    far = t0 + 2**40                                 # each request waits for head to reach it
    wl.write_raw(b"".join(f"{2 * i + 1} watch {foid:016x} @{far:016x}\n".encode() for i in range(80)))
    assert wl.eof.wait(10)
    assert any("too many requests" in c for c in wl.control)


def test_read_of_watch_is_interruptible(env):
    env.start()
    code = ("import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); print('ready', flush=True); os.read(fd, 100)")
    pr = subprocess.Popen([sys.executable, "-c", code, env.srv.path("head/watch")], stdout=subprocess.PIPE)
    try:
        assert pr.stdout.readline().strip() == b"ready"
        time.sleep(0.3)
        pr.send_signal(signal.SIGKILL)
        pr.wait(timeout=10)
    finally:
        if pr.poll() is None:
            pr.kill()
            pr.wait(10)
    wait_until(lambda: env.srv.stats()["WatchLink"] == 0, 10, "link released")


def test_concurrent_read_and_write_on_one_link(env):
    """FOPEN_STREAM: a thread blocked in read() does not block write() on the same fd."""
    zf, foid, t0 = setup_file(env, 1)
    env.start()
    read_file(env.path(zf))
    wl = env.link()                                   # its receiver thread is blocked in read()
    time.sleep(0.2)
    t = time.monotonic()
    assert wl.send_req(f"watch {foid:016x} @{t0:016x}", timeout=5) == "ok"
    assert time.monotonic() - t < 5


# --- faulty clients ---------------------------------------------------------------------

def start_child(env, mode: str, foid: int, at: int) -> subprocess.Popen:
    pr = subprocess.Popen([sys.executable, os.path.join(TESTS, "wlink.py"), env.srv.mnt, mode,
                           f"{foid:016x}", f"{at:016x}"], stdout=subprocess.PIPE, text=True)
    line = pr.stdout.readline()
    assert line.startswith("ready ok"), line
    return pr


def read_in_child(path: str, off: int) -> subprocess.Popen:
    code = "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.pread(fd, 16, int(sys.argv[2])); print('done', flush=True)"
    return subprocess.Popen([sys.executable, "-c", code, path, str(off)], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("mode", ["noack", "nak"])
def test_faulty_client_is_killed(env, mode):
    pin_timeout = 2.0
    zf, foid, t0 = setup_file(env, 2)
    srv = env.start("--pin-timeout", str(pin_timeout))
    p = env.path(zf)
    read_file(p, 0, 1)
    child = start_child(env, mode, foid, t0)
    good = env.link()
    assert good.watch(foid, t0) == ("ok", [])
    try:
        zf.storeblk(1, content(90))
        env.commit()
        start = time.monotonic()
        reader = read_in_child(p, BS)
        # The well-behaved watcher gets its pin and acks at once.
        req = good.recv_req(timeout=10)
        assert req.blk == 1
        good.reply(req)
        assert reader.stdout.readline().strip() == "done"
        assert time.monotonic() - start < 2 * pin_timeout + 1
        child.wait(timeout=2 * pin_timeout + 5)
        assert child.returncode in (-signal.SIGBUS, -signal.SIGKILL)
        assert srv.stats()["pinkill"] == 1
        reader.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_close_without_bye_and_no_pending_pin_is_not_killed(env):
    zf, foid, t0 = setup_file(env, 1)
    srv = env.start()
    read_file(env.path(zf))
    # Synchronous client (no reader thread): a close() with a read in flight on the
    # same fd would not release the file until that read returns.
    code = ("import os,sys,time; fd=os.open(os.path.join(sys.argv[1], 'head/watch'), os.O_RDWR); "
            "os.write(fd, b'1 watch %016x @%016x\\n'); print(os.read(fd, 100).decode().strip(), flush=True); "
            "os.close(fd); print('closed', flush=True); time.sleep(3600)" % (foid, t0))
    pr = subprocess.Popen([sys.executable, "-c", code, srv.mnt, TESTS], stdout=subprocess.PIPE, text=True)
    try:
        assert pr.stdout.readline().strip() == "1 ok"
        assert pr.stdout.readline().strip() == "closed"
        wait_until(lambda: srv.stats()["WatchLink"] == 0, 10, "link released")
        assert srv.stats()["Watch"] == 0
        time.sleep(0.5)
        assert pr.poll() is None and srv.stats()["pinkill"] == 0
    finally:
        pr.kill()
        pr.wait(10)


def test_client_exiting_with_pending_pin_is_not_counted_as_kill(env):
    zf, foid, t0 = setup_file(env, 2)
    srv = env.start("--pin-timeout", "5")
    p = env.path(zf)
    read_file(p, 0, 1)
    child = start_child(env, "closenoack", foid, t0)
    zf.storeblk(1, content(91))
    env.commit()
    assert read_file(p, BS, 16) == content(91)[:16]
    assert child.wait(10) == 0
    assert srv.stats()["pinkill"] == 0


def test_bye_is_graceful(env):
    zf, foid, t0 = setup_file(env, 1)
    srv = env.start()
    read_file(env.path(zf))
    wl = env.link()
    assert wl.watch(foid, t0)[0] == "ok"
    wl.bye()
    assert wl.eof.wait(10)
    assert wl.control == []
    wait_until(lambda: srv.stats()["Watch"] == 0, 5, "watch removed")


# --- stress ---------------------------------------------------------------------------

def test_mixed_stress_no_deadlock(env):
    """Commits, reads from several processes and watch setups at once finish within a bound."""
    nblk = 8
    zf, foid, t0 = setup_file(env, nblk)
    srv = env.start()
    p = env.path(zf)
    read_file(p)
    stop = threading.Event()
    errors: list = []
    watchers = [env.link() for _ in range(3)]

    def watcher(wl):
        try:
            at = t0
            while not stop.is_set():
                fut = wl.send_async(f"watch {foid:016x} @{at:016x}")
                while not fut.done():
                    try:
                        req = wl.recv_req(timeout=0.05)
                    except Exception:
                        continue
                    if req is None:
                        return
                    wl.reply(req)
                r = fut.result()
                assert r == "ok", r
                at = max(at, srv.head_at())
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=watcher, args=(wl,), daemon=True) for wl in watchers]
    for t in threads:
        t.start()
    code = ("import os,sys,time; fd=os.open(sys.argv[1], os.O_RDONLY); end=time.time()+float(sys.argv[2]);\n"
            "n=0\nwhile time.time()<end:\n  os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED); os.pread(fd, 1<<20, 0); n+=1\n"
            "print(n, flush=True)")
    readers = [subprocess.Popen([sys.executable, "-c", code, p, "4"], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    rng = np.random.default_rng(1)
    deadline = time.monotonic() + 4
    ncommits = 0
    try:
        while time.monotonic() < deadline:
            k = int(rng.integers(0, nblk))
            zf.storeblk(k, content(1000 + ncommits))
            env.commit()
            ncommits += 1
        for r in readers:
            out, _ = r.communicate(timeout=60)
            assert int(out) > 0
    finally:
        stop.set()
        for r in readers:
            if r.poll() is None:
                r.kill()
                r.wait(10)
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "watch setup stuck"
    assert not errors, errors
    assert ncommits > 3
    assert srv.stats()["pinkill"] == 0


# --- more processes, interrupted readers, unkillable clients ----------------------------

def test_two_processes_at_different_at(env):
    zf, foid, t0 = setup_file(env, 2)
    srv = env.start()
    p = env.path(zf)
    read_file(p, 0, 1)
    zf.storeblk(1, content(31))
    t1 = env.commit()
    a = start_child(env, "ack", foid, t0)
    b = start_child(env, "ack", foid, t1)
    try:
        zf.storeblk(1, content(32))
        env.commit()
        assert read_file(p, BS, 16) == content(32)[:16]       # completes: both acked
        pa = a.stdout.readline().split()
        pb = b.stdout.readline().split()
        # Each gets the block's revision as of its own at.
        assert pa[:4] == ["pin", "pin", f"{foid:016x}", "#1"] and pa[4] == f"@{t0:016x}"
        assert pb[:4] == ["pin", "pin", f"{foid:016x}", "#1"] and pb[4] == f"@{t1:016x}"
        assert srv.stats()["PinnedBlk"] == 2 and srv.stats()["pinkill"] == 0
    finally:
        for c in (a, b):
            c.kill()
            c.wait(10)


def test_pin_not_cancelled_by_interrupted_read(env):
    """The reader dies while its read waits for a pin: the pin still completes."""
    zf, foid, t0 = setup_file(env, 2)
    srv = env.start()
    p = env.path(zf)
    read_file(p, 0, 1)
    wl = env.link()
    assert wl.watch(foid, t0) == ("ok", [])
    zf.storeblk(1, content(40))
    env.commit()
    reader = read_in_child(p, BS)
    req = wl.recv_req(timeout=10)
    reader.kill()                                      # interrupts its pending READ
    reader.wait(10)
    time.sleep(0.2)
    wl.reply(req)                                      # the pin is still awaited and recorded
    wait_until(lambda: srv.stats()["PinnedBlk"] == 1, 5, "pin recorded")
    assert srv.stats()["pinkill"] == 0
    # The block is served to the next reader without a second pin.
    assert read_file(p, BS, 16) == content(40)[:16]
    with pytest.raises(Exception):
        wl.recv_req(timeout=0.3)
