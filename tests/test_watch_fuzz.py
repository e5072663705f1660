"""Fuzzing the server's watch-link input: it answers or closes, never crashes or leaks links.

Bounded (a fixed number of examples, each with a deadline) so it runs in the default suite.
No commit happens during the fuzzing, so no pin can ever be sent to this process.
"""
from __future__ import annotations

import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from wcfs_env import WcfsProc, WriterDB, read_file, wait_until

BS = 4096


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    db = WriterDB.filestorage(str(d / "Data.fs"))
    zf = db.new_file("zf", BS)
    zf.storeblk(0, b"x")
    db.commit()
    p = WcfsProc(db.zurl, str(d / "mnt"))
    p.foid = zf._p_oid.hex()
    p.at = f"{db.head:016x}"
    read_file(p.path("head/bigfile", p.foid))
    yield p
    p.stop()
    db.close()


def exchange(srv: WcfsProc, data: bytes, timeout: float = 10) -> tuple[bytes, bool]:
    """Write data on a fresh link, then ``bye``; return everything the server sent until EOF.

    FUSE ignores O_NONBLOCK here (the server parks reads), so the reading
    happens on a thread, and the link is always ended by ``bye`` (or by the
    server closing it on a protocol error): EOF must come within ``timeout``.
    """
    fd = os.open(srv.path("head/watch"), os.O_RDWR)
    got: list[bytes] = []
    done = threading.Event()

    def rx() -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
        except OSError:
            pass
        got.append(buf)
        done.set()

    t = threading.Thread(target=rx, daemon=True)
    t.start()
    try:
        for chunk in (data[i:i + 65536] for i in range(0, len(data), 65536)):
            os.write(fd, chunk)
        os.write(fd, b"\n18446744073709551615 bye\n")
    except OSError:
        pass                                       # EPIPE: the server closed the link already
    eof = done.wait(timeout)
    if eof:
        os.close(fd)                               # only now: no read is in flight on it
    return (got[0] if got else b""), eof


WORDS = ["watch", "bye", "ack", "nak", "pin", "-", "@", "#"]


def frames(foid: str, at: str):
    token = st.one_of(st.sampled_from(WORDS + [foid, "@" + at, at, "@head"]),
                      st.text(alphabet="0123456789abcdefxyz@#- ", max_size=20))
    line = st.builds(lambda stream, toks: f"{stream} " + " ".join(toks),
                     st.one_of(st.integers(0, 2**64 + 5).map(str), st.text(max_size=5)),
                     st.lists(token, max_size=5))
    return st.lists(st.one_of(line, st.binary(max_size=50).map(lambda b: b.decode("latin-1"))),
                    min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_frames(srv, data):
    lines = data.draw(frames(srv.foid, srv.at))
    out, eof = exchange(srv, ("\n".join(lines) + "\n").encode("utf-8"))
    assert eof, "the server did not close the link after bye"
    for line in out.decode("utf-8", "replace").split("\n")[:-1]:   # the protocol splits at LF only
        stream, _, payload = line.partition(" ")
        assert stream.isdigit(), line
        if stream == "0":
            assert payload.startswith(("error: ", "fatal: ")), line
        else:
            assert payload == "ok" or payload.startswith("error "), line
    assert srv.proc.poll() is None


def test_huge_line_and_binary(srv):
    out, eof = exchange(srv, b"1 " + b"w" * 1_000_000)        # no newline at all
    assert eof and b"line too long" in out
    out, eof = exchange(srv, bytes(range(256)) * 10 + b"\n")
    assert eof and out.startswith(b"0 error: invalid frame")


def test_no_leaks_after_fuzzing(srv):
    wait_until(lambda: srv.stats()["WatchLink"] == 0, 10, "every fuzz link released")
    assert srv.stats()["Watch"] == 0
    # Still serving, and the server process has not grown threads without bound.
    assert read_file(srv.path("head/bigfile", srv.foid), 0, 1) == b"x"
    nthreads = len(os.listdir(f"/proc/{srv.proc.pid}/task"))
    assert nthreads < 200, nthreads
