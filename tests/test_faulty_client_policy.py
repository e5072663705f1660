"""The server's policy for faulty watch clients (WCFS.md §2.6), decided in-process.

A root server can kill any ordinary process, so "the client cannot be killed"
cannot be produced for real here; these tests drive the decision code with the
kill outcome and process liveness controlled, and check what the filesystem
does: EIO mode when a faulty client survives, nothing when it is already gone.
"""
from __future__ import annotations

import os
import time

import pytest

from wcfs import fs as wfs
from wcfs import watch as wwatch
from wcfs.watch import PinError


class _Zstor:
    head = (1).to_bytes(8, "big")

    def load_before(self, oid, before):
        raise AssertionError("not used")

    def close(self):
        pass


class _Session:
    def __init__(self):
        self.exited = False

    def notify_inval_inode(self, ino, off, length):
        pass

    def exit(self):
        self.exited = True


class _Link:
    def __init__(self, pid):
        self.pid = pid


@pytest.fixture
def fs():
    f = wfs.WCFS(_Zstor(), "file:///x", "/nonexistent", pin_timeout=0.6)
    f.session = _Session()
    yield f
    f.shutdown()


def test_unkillable_client_switches_to_eio_mode(fs, monkeypatch):
    monkeypatch.setattr(wfs, "kill_faulty", lambda pid, timeout, why: False)
    monkeypatch.setattr(wfs, "proc_alive", lambda pid: True)
    fs.deal_with_faulty_client(_Link(os.getpid()), PinError("timeout", "timeout"),
                               time.monotonic() + 1, 3, "0000000000000001")
    assert fs.eio_reason is not None and "could not kill" in fs.eio_reason
    with pytest.raises(wfs.FsError):
        fs._check_eio()


def test_killed_client_is_counted(fs, monkeypatch):
    monkeypatch.setattr(wfs, "kill_faulty", lambda pid, timeout, why: True)
    monkeypatch.setattr(wfs, "proc_alive", lambda pid: True)
    fs.deal_with_faulty_client(_Link(12345), PinError("reply", "expected ack"), time.monotonic() + 1,
                               3, "head")
    assert fs.stats["pinkill"] == 1 and fs.eio_reason is None


def test_gone_client_is_left_alone(fs, monkeypatch):
    calls = []
    monkeypatch.setattr(wfs, "kill_faulty", lambda *a: calls.append(a) or True)
    monkeypatch.setattr(wfs, "proc_alive", lambda pid: False)
    monkeypatch.setattr(wfs, "wait_gone", lambda pid, t: True)
    fs.deal_with_faulty_client(_Link(12345), PinError("timeout", "timeout"), time.monotonic() + 1, 3, "head")
    fs.deal_with_faulty_client(_Link(12345), PinError("io", "link is down"), time.monotonic() + 1, 3, "head")
    assert calls == [] and fs.stats["pinkill"] == 0 and fs.eio_reason is None


def test_kill_sequence_on_a_real_process():
    import subprocess
    import sys
    pr = subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGBUS, signal.SIG_IGN); time.sleep(60)"])
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        assert wwatch.kill_faulty(pr.pid, 1.2, "test")     # survives SIGBUS, dies by SIGKILL
        assert time.monotonic() - t0 < 1.2
        assert pr.wait(5) == -9
    finally:
        if pr.poll() is None:
            pr.kill()
            pr.wait(5)
