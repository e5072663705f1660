"""Server management (wcfs.mgmt) and the ``wcfs`` command line.

Unit tests cover zurl normalization, mountpoint naming, mountinfo parsing,
command-line recognition and the CLI's usage handling.  End-to-end tests run
real FUSE servers as ``python -m wcfs serve ZURL MNT`` processes: the stand-in
of tests/mgmt_fakeserver.py (selected through $WCFS_SERVE_IMPL) for the
start/status/stop/crash scenarios, and the real server when it exists.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import select
import stat
import subprocess
import sys
import time

import pytest

from wcfs import mgmt
from wcfs.__main__ import main
from wcfs.log import WcfsFormatter, parse_level
from wcfs_env import wait_until

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------
# zurl normalization, mountpoint naming

@pytest.mark.parametrize("zurl", [
    "file:///tmp/Data.fs",
    "file:///tmp/a%20b/Data.fs?x=1",
    "zeo://localhost:8100",
    "zeo://localhost:8100?storage=2&cache_size=100",
    "demo:(file:///a.fs)/(file:///b.fs)",
    "postgres://u:p@host/db?b=1&a=2",
    "/plain/path/Data.fs",
])
def test_normalize_other_schemes_unchanged(zurl):
    assert mgmt.normalize_zurl(zurl) == zurl


@pytest.mark.parametrize("zurl, want", [
    ("neo://db@m2:1,m1:2", "neo://db@m1:2,m2:1"),
    ("neo://m2:1,m1:2", "neo://m1:2,m2:1"),
    # credentials dropped; any non-empty one forces neos
    ("neo://db@m1?ca=/a/ca.crt&cert=/a/c.crt&key=/a/k.key", "neos://db@m1"),
    ("neos://db@m1?ca=/x&cert=/y&key=/z", "neos://db@m1"),
    ("neo://db@m1?ca=&cert=&key=", "neo://db@m1"),
    ("neo://db@m1?key=k", "neos://db@m1"),
    # client-only options dropped, the rest sorted by key
    ("neo://db@m1?read-only=true&zz=1&compress=false&aa=2&logfile=/l&cache-size=1G",
     "neo://db@m1?aa=2&zz=1"),
    ("neo://db@b:2,a:1,c:3/path?y=2&x=1", "neo://db@a:1,b:2,c:3/path?x=1&y=2"),
])
def test_normalize_neo(zurl, want):
    assert mgmt.normalize_zurl(zurl) == want


def test_normalize_neo_equivalent_urls_share_mountpoint(tmp_path):
    a = "neos://cluster@10.0.0.2:2051,10.0.0.1:2051?ca=/home/u/ca&cert=/home/u/c&key=/home/u/k"
    b = "neo://cluster@10.0.0.1:2051,10.0.0.2:2051?ca=/etc/ca&cert=/etc/c&key=/etc/k&compress=1"
    root = str(tmp_path / "root")
    assert mgmt.mountpoint_for(a, root=root) == mgmt.mountpoint_for(b, root=root)


def test_mountpoint_naming_and_root_mode(tmp_path):
    root = str(tmp_path / "wcfs")
    zurl = "file:///some/Data.fs"
    old = os.umask(0o022)
    try:
        mnt = mgmt.mountpoint_for(zurl, create=False, root=root)
        assert mnt == os.path.join(root, hashlib.sha1(zurl.encode()).hexdigest())
        assert not os.path.exists(root)          # create=False touches nothing

        mnt2 = mgmt.mountpoint_for(zurl, root=root)
    finally:
        os.umask(old)
    assert mnt2 == mnt and os.path.isdir(mnt)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o1777

    # an existing root of ours with another mode is fixed; an existing mountpoint is fine
    os.chmod(root, 0o755)
    assert mgmt.mountpoint_for(zurl, root=root) == mnt
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o1777


def test_mountpoint_default_root():
    mnt = mgmt.mountpoint_for("file:///x/Data.fs", create=False)
    assert mnt == "/dev/shm/wcfs/" + hashlib.sha1(b"file:///x/Data.fs").hexdigest()


# ---------------------------------------------------------------------------
# mountinfo

MOUNTINFO = (
    b"22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    b"25 24 0:23 / /dev/shm rw,relatime shared:5 master:1 - tmpfs tmpfs rw,size=10k\n"
    b"90 25 0:51 / /dev/shm/wcfs/abc rw,nosuid,nodev,relatime - fuse.wcfs "
    b"file:///tmp/my\\040dir/Data.fs rw,user_id=1000,group_id=1000\n"
    b"91 25 0:52 / /mnt/with\\040space\\011tab\\134back rw - fuse.wcfs zeo://h:1 rw,user_id=0\n"
    b"garbage line\n"
    b"92 25 0:53 / /dev/shm/wcfs/abc rw - fuse.wcfs file:///other.fs rw,user_id=0,group_id=0\n"
)


def test_parse_mountinfo():
    entries = mgmt.parse_mountinfo(MOUNTINFO)
    assert [e.mount_id for e in entries] == [22, 25, 90, 91, 92]
    shm = entries[1]
    assert (shm.fstype, shm.source, shm.mountpoint) == ("tmpfs", "tmpfs", "/dev/shm")
    w = entries[2]
    assert w.fstype == "fuse.wcfs"
    assert w.source == "file:///tmp/my dir/Data.fs"
    assert (w.major, w.minor) == (0, 51)
    assert w.dev == os.makedev(0, 51)
    assert w.super_option("user_id") == "1000"
    assert w.super_option("nope") is None
    assert entries[3].mountpoint == "/mnt/with space\ttab\\back"


def test_find_mount_real():
    e = mgmt.find_mount("/proc")
    assert e is not None and e.fstype == "proc"
    assert mgmt.find_mount("/proc/") == e        # normalized
    assert mgmt.find_mount("/nonexistent/dir") is None


def test_fuse_abort_path():
    e = mgmt.parse_mountinfo(MOUNTINFO)[2]
    assert mgmt.fuse_abort_path(e) == "/sys/fs/fuse/connections/51/abort"
    assert mgmt.find_mount("/sys/fs/fuse/connections").fstype == "fusectl"
    with pytest.raises(ValueError):
        mgmt.fuse_abort_path(mgmt.parse_mountinfo(MOUNTINFO)[0])


# ---------------------------------------------------------------------------
# recognizing `wcfs serve` command lines

@pytest.mark.parametrize("argv, want", [
    (["/usr/bin/python3", "-m", "wcfs", "serve", "file:///a.fs"], ("file:///a.fs", None)),
    (["python", "-m", "wcfs", "serve", "--debug", "z", "/mnt"], ("z", "/mnt")),
    (["python", "-X", "dev", "-u", "-m", "wcfs", "serve", "--pin-timeout", "5", "z"], ("z", None)),
    (["python", "-mwcfs", "serve", "--log-level=DEBUG", "z", "m"], ("z", "m")),
    (["/venv/bin/python", "/venv/bin/wcfs", "serve", "z", "m"], ("z", "m")),
    (["/venv/bin/wcfs", "serve", "--pin-timeout=3", "z"], ("z", None)),
    (["python", "-m", "wcfs", "stop", "z"], None),
    (["python", "-m", "wcfs", "serve"], None),                    # no zurl
    (["python", "-m", "wcfs", "serve", "--bogus", "z"], None),
    (["python", "-m", "wcfsx", "serve", "z"], None),
    (["python", "script.py", "-m", "wcfs", "serve", "z"], None),
    (["python", "-c", "pass", "wcfs", "serve", "z"], None),
    (["bash", "-c", "wcfs serve z"], None),
    ([], None),
])
def test_parse_serve_cmdline(argv, want):
    assert mgmt._parse_serve_cmdline(argv) == want


# ---------------------------------------------------------------------------
# command line

def test_cli_usage_errors(capsys):
    assert main([]) == 2
    assert main(["bogus"]) == 2
    assert main(["serve"]) == 2
    assert main(["status"]) == 2
    assert main(["stop", "a", "b"]) == 2
    assert main(["serve", "--pin-timeout", "-1", "z"]) == 2
    assert main(["serve", "--pin-timeout", "x", "z"]) == 2
    assert main(["serve", "--log-level", "LOUD", "z"]) == 2
    err = capsys.readouterr().err
    assert "usage: wcfs" in err


def test_cli_help(capsys):
    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "status" in out and "stop" in out
    assert main(["serve", "-h"]) == 0
    out = capsys.readouterr().out
    for opt in ("--pin-timeout", "--debug", "--log-level", "ZURL", "MOUNTPOINT"):
        assert opt in out


def test_cli_python_m():
    r = subprocess.run([sys.executable, "-m", "wcfs", "-h"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "usage: wcfs" in r.stdout
    r = subprocess.run([sys.executable, "-m", "wcfs", "frobnicate"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_cli_status_not_mounted(capsys):
    zurl = "file:///nonexistent/wcfs-test-mgmt/Data.fs"
    assert main(["status", zurl]) == 1
    out = capsys.readouterr().out
    assert re.fullmatch(r"fail - mount entry /dev/shm/wcfs/[0-9a-f]{40}: not mounted\n", out)


def test_cli_serve_options_reach_impl(tmp_path, monkeypatch):
    """$WCFS_OPTIONS is prepended to serve's options; defaults; the implementation hook."""
    rec = tmp_path / "rec"
    monkeypatch.setenv("WCFS_SERVE_IMPL", "mgmt_fakeserver:record_serve")
    monkeypatch.setenv("MGMT_FAKESERVER_RECORD", str(rec))
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    monkeypatch.setenv("WCFS_OPTIONS", " --debug\t--pin-timeout 7 ")
    assert main(["serve", "--log-level", "warning", "file:///x.fs", str(mnt)]) == 0
    assert rec.read_text() == f"file:///x.fs {mnt} 7.0 True"

    monkeypatch.setenv("WCFS_OPTIONS", "--pin-timeout 7")
    assert main(["serve", "--pin-timeout", "9", "file:///x.fs", str(mnt)]) == 0
    assert rec.read_text() == f"file:///x.fs {mnt} 9.0 False"      # ours come last and win

    monkeypatch.delenv("WCFS_OPTIONS")
    assert main(["serve", "file:///x.fs", str(mnt)]) == 0
    assert rec.read_text() == f"file:///x.fs {mnt} 30.0 False"


def test_log_format():
    rec = logging.LogRecord("wcfs", logging.WARNING, "/a/b/mgmt.py", 42, "hello %s", ("x",), None)
    line = WcfsFormatter().format(rec)
    assert re.fullmatch(r"W\d{4} \d\d:\d\d:\d\d\.\d{6} \d+ mgmt\.py:42\] wcfs: hello x", line), line
    assert parse_level("debug") == logging.DEBUG
    assert parse_level("INFO") == logging.INFO
    with pytest.raises(ValueError):
        parse_level("chatty")


# ---------------------------------------------------------------------------
# end to end: real FUSE mounts served by `python -m wcfs serve` processes

class Reaper:
    """What a test started -- mounts and processes -- torn down even if the test failed.

    Connections are aborted first: that frees processes blocked on requests of
    a hung server, which nothing else can kill.  Processes go by pid.
    """

    def __init__(self) -> None:
        self.mounts: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def mount(self, mnt: str) -> str:
        self.mounts.append(mnt)
        return mnt

    def proc(self, p: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for mnt in self.mounts:
            e = mgmt.find_mount(mnt)
            if e is not None and e.fstype.startswith("fuse"):
                try:
                    with open(mgmt.fuse_abort_path(e), "w") as f:
                        f.write("1\n")
                except OSError:
                    pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for mnt in self.mounts:
            for cmd in (["fusermount3", "-u", mnt], ["umount", "-l", mnt]):
                if mgmt.find_mount(mnt) is None:
                    break
                subprocess.run(cmd, capture_output=True, timeout=10)
            try:
                os.rmdir(mnt)
            except OSError:
                pass


@pytest.fixture
def reaper():
    r = Reaper()
    try:
        yield r
    finally:
        r.cleanup()


@pytest.fixture
def fake(tmp_path, monkeypatch, reaper):
    """Environment making `python -m wcfs serve` run the stand-in FUSE server."""
    pytest.importorskip("wcfs._fuse").Session      # the binding must be built
    monkeypatch.setenv("WCFS_SERVE_IMPL", "mgmt_fakeserver:serve")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [TESTS_DIR] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.delenv("WCFS_OPTIONS", raising=False)
    for var in ("MGMT_FAKESERVER_HANG", "MGMT_FAKESERVER_STUBBORN", "MGMT_FAKESERVER_EXIT"):
        monkeypatch.delenv(var, raising=False)
    zurl = f"file://{tmp_path}/Data.fs"
    reaper.mount(mgmt.mountpoint_for(zurl, create=False))
    return zurl


def start(reaper: Reaper, zurl: str, **kw) -> mgmt.Server:
    srv = mgmt.start(zurl, **kw)
    reaper.proc(srv.popen)
    return srv


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wcfs", *args], capture_output=True,
                          text=True, timeout=timeout)


def status_lines(zurl: str, **kw) -> tuple[bool, list[str]]:
    out = io.StringIO()
    ok = mgmt.status(zurl, out=out, **kw)
    return ok, out.getvalue().splitlines()


def assert_gone(srv: mgmt.Server) -> None:
    assert mgmt.find_mount(srv.mountpoint) is None
    assert not os.path.exists(srv.mountpoint)
    assert srv.popen.poll() is not None


def read_zurl(mnt: str) -> str:
    with open(os.path.join(mnt, ".wcfs", "zurl")) as f:
        return f.read()


HEALTHY = ["ok - mount entry {mnt}", "ok - wcfs server pid{pid}", "ok - stat mountpoint",
           "ok - read .wcfs/zurl", "ok - read .wcfs/stats"]


@pytest.mark.timeout(120)
def test_start_status_stop(fake, reaper):
    zurl = fake
    srv = start(reaper, zurl)
    mnt = srv.mountpoint
    assert mnt == mgmt.mountpoint_for(zurl, create=False)
    e = mgmt.find_mount(mnt)
    assert (e.fstype, e.source) == ("fuse.wcfs", zurl)
    assert srv.entry == e
    assert read_zurl(mnt) == zurl
    assert mgmt.find_server_pid(zurl, mnt) == srv.pid
    assert mgmt.find_server_pid(zurl + "x", mnt) is None

    ok, lines = status_lines(zurl)
    assert ok, lines
    assert lines == [s.format(mnt=mnt, pid=srv.pid) for s in HEALTHY]
    r = cli("status", zurl)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == lines

    # a second server for the same zurl is refused, by start and by the command line
    with pytest.raises(RuntimeError, match="already running"):
        mgmt.start(zurl)
    r = cli("serve", zurl)
    assert r.returncode == 1 and "already running" in r.stderr

    srv.stop()
    assert_gone(srv)
    assert srv.popen.returncode == 0
    srv.stop()                       # runs once: a second call is a no-op
    ok, lines = status_lines(zurl)
    assert not ok and lines == [f"fail - mount entry {mnt}: not mounted"]


@pytest.mark.timeout(120)
def test_cli_stop(fake, reaper):
    zurl = fake
    srv = start(reaper, zurl)
    r = cli("stop", zurl)
    assert r.returncode == 0, r.stderr
    srv.popen.wait(timeout=10)
    assert_gone(srv)
    r = cli("stop", zurl)            # nothing to stop is fine
    assert r.returncode == 0 and "not mounted" in r.stderr


@pytest.mark.timeout(120)
def test_start_child_exits(fake, reaper, monkeypatch):
    monkeypatch.setenv("MGMT_FAKESERVER_EXIT", "3")
    with pytest.raises(RuntimeError, match="exited with 3"):
        mgmt.start(fake)
    assert mgmt.find_mount(mgmt.mountpoint_for(fake, create=False)) is None


@pytest.mark.timeout(120)
def test_status_hung_server_then_stop_aborts(fake, reaper, monkeypatch, tmp_path, caplog):
    zurl = fake
    flag = tmp_path / "hang"
    flag.touch()
    monkeypatch.setenv("MGMT_FAKESERVER_HANG", str(flag))
    srv = start(reaper, zurl)

    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="wcfs"):
        ok, lines = status_lines(zurl, probe_timeout=1.0)
    elapsed = time.monotonic() - t0
    assert not ok
    assert lines == [s.format(mnt=srv.mountpoint, pid=srv.pid) for s in HEALTHY[:4]] + [
        "fail - read .wcfs/stats: timed out (wcfs might be stuck)"]
    assert elapsed < 15, elapsed             # bounded although the reader is unkillable
    dump = caplog.text
    assert f"stuck dump: server pid{srv.pid}" in dump
    assert "stuck dump: client pid" in dump and ".wcfs/stats" in dump

    # the wedged server ignores SIGTERM, and the stuck probe keeps the mount busy:
    # only aborting the connection through fusectl ends it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wcfs"):
        srv.stop(timeout=2.5)
    assert "fusermount3 -u failed" in caplog.text
    assert "aborting the FUSE connection" in caplog.text
    assert "SIGKILL" not in caplog.text
    assert_gone(srv)


@pytest.mark.timeout(120)
def test_attach_to_hung_server_is_bounded(fake, reaper, monkeypatch, tmp_path):
    zurl = fake
    flag = tmp_path / "hang"
    monkeypatch.setenv("MGMT_FAKESERVER_HANG", str(flag))
    srv = start(reaper, zurl)
    flag.write_text("zurl")
    monkeypatch.setattr(mgmt, "ATTACH_TIMEOUT", 0.5)
    with pytest.raises(RuntimeError, match="does not answer"):
        mgmt.start(zurl)
    # the reader left behind is freed by the abort of the stop sequence
    srv.stop(timeout=2.5)
    assert_gone(srv)


@pytest.mark.timeout(120)
def test_stop_escalates_to_sigkill(fake, reaper, monkeypatch, caplog):
    monkeypatch.setenv("MGMT_FAKESERVER_STUBBORN", "1")
    srv = start(reaper, fake)
    with caplog.at_level(logging.INFO, logger="wcfs"):
        srv.stop(timeout=2.5)
    assert "sending SIGQUIT" in caplog.text and "sending SIGKILL" in caplog.text
    assert srv.popen.returncode == -9
    assert_gone(srv)


@pytest.mark.timeout(120)
def test_stop_stuck_in_kernel_is_bounded(fake, reaper, monkeypatch, tmp_path):
    """A process that survives SIGKILL is waited for only stuck_timeout seconds."""
    zurl = fake
    flag = tmp_path / "hang"
    flag.touch()
    monkeypatch.setenv("MGMT_FAKESERVER_HANG", str(flag))
    srv = start(reaper, zurl)
    # a reader of the parked .wcfs/stats: unkillable until the connection is aborted
    stuck = reaper.proc(subprocess.Popen(
        [sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()",
         os.path.join(srv.mountpoint, ".wcfs", "stats")]))
    wait_until(lambda: "request_wait_answer" in open(f"/proc/{stuck.pid}/stack").read(),
               30, "the reader to block in FUSE")

    fake_srv = mgmt.Server("file:///not/served.fs", str(tmp_path / "nomount"), stuck.pid)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="stuck in the kernel"):
        fake_srv.stop(timeout=1.0, stuck_timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert stuck.poll() is None                 # still there: SIGKILL cannot free it

    flag.unlink()
    srv.stop(timeout=2.5)                       # abort frees the reader, which then dies
    stuck.wait(timeout=10)
    assert stuck.returncode == -9
    assert_gone(srv)


@pytest.mark.timeout(120)
def test_crashed_server_is_cleaned_on_start(fake, reaper):
    zurl = fake
    srv = start(reaper, zurl)
    mnt = srv.mountpoint
    srv.popen.kill()
    srv.popen.wait(timeout=10)

    # the stale mount stays; operations on it fail with ENOTCONN
    assert mgmt.find_mount(mnt) is not None
    with pytest.raises(OSError) as exc:
        read_zurl(mnt)
    assert exc.value.errno == errno.ENOTCONN
    ok, lines = status_lines(zurl)
    assert not ok
    assert lines == [f"ok - mount entry {mnt}", "fail - wcfs server: process not found"]

    # start cleans it up and starts anew
    srv2 = start(reaper, zurl)
    assert read_zurl(mnt) == zurl
    assert status_lines(zurl)[0]
    srv2.popen.kill()
    srv2.popen.wait(timeout=10)

    # so does `wcfs serve` (here in the foreground, stopped with `wcfs stop`)
    p = reaper.proc(subprocess.Popen([sys.executable, "-m", "wcfs", "serve", zurl]))
    def served():
        assert p.poll() is None, f"wcfs serve exited with {p.returncode}"
        try:
            return read_zurl(mnt) == zurl
        except OSError:
            return False
    wait_until(served, 30, "wcfs serve to come up")
    assert mgmt.find_server_pid(zurl, mnt) == p.pid
    assert status_lines(zurl)[0]
    mgmt.stop_zurl(zurl)
    assert p.wait(timeout=10) == 0
    assert mgmt.find_mount(mnt) is None and not os.path.exists(mnt)


CLIENT = """\
import os, sys, time
mnt = sys.argv[1]
f = open(os.path.join(mnt, ".wcfs", "zurl"), "rb")
os.chdir(os.path.join(mnt, ".wcfs"))
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(120)
def test_stop_kills_clients(fake, reaper, caplog):
    zurl = fake
    srv = start(reaper, zurl)
    client = reaper.proc(subprocess.Popen([sys.executable, "-c", CLIENT, srv.mountpoint],
                                          stdout=subprocess.PIPE, text=True))
    wait_until(lambda: select.select([client.stdout], [], [], 0)[0], 30, "client ready")
    assert client.stdout.readline() == "ready\n"
    users = mgmt.mount_users(srv.mountpoint)
    assert client.pid in users and srv.pid not in users
    assert any(u.startswith("fd ") and u.endswith("/.wcfs/zurl") for u in users[client.pid])
    assert any(u.startswith("cwd ") for u in users[client.pid])

    # the stand-in, like the real server, detaches its mount on SIGTERM: the
    # client must be found through the connection, not the path
    with caplog.at_level(logging.INFO, logger="wcfs"):
        mgmt.stop_zurl(zurl, timeout=5)
    assert client.wait(timeout=10) in (-15, -9)
    assert f"pid{client.pid}" in caplog.text
    srv.popen.wait(timeout=10)
    assert_gone(srv)


# ---------------------------------------------------------------------------
# the real server

@pytest.mark.timeout(180)
def test_real_server_start_status_stop(tmp_path, reaper, monkeypatch):
    pytest.importorskip("wcfs.server")
    import ZODB
    from ZODB.FileStorage import FileStorage

    monkeypatch.delenv("WCFS_SERVE_IMPL", raising=False)
    monkeypatch.delenv("WCFS_OPTIONS", raising=False)
    path = str(tmp_path / "Data.fs")
    db = ZODB.DB(FileStorage(path))
    with db.transaction() as conn:
        conn.root()["x"] = 1
    db.close()
    zurl = f"file://{path}"
    reaper.mount(mgmt.mountpoint_for(zurl, create=False))

    srv = start(reaper, zurl, options=["--pin-timeout", "7"])
    mnt = srv.mountpoint
    assert read_zurl(mnt) == zurl
    with open(os.path.join(mnt, ".wcfs", "pintimeout")) as f:
        assert f.read().strip() == "7.0"
    ok, lines = status_lines(zurl)
    assert ok, lines
    assert lines == [s.format(mnt=mnt, pid=srv.pid) for s in HEALTHY]
    r = cli("status", zurl)
    assert r.returncode == 0, r.stdout + r.stderr

    r = cli("stop", zurl)
    assert r.returncode == 0, r.stderr
    assert srv.popen.wait(timeout=30) == 0
    assert_gone(srv)
