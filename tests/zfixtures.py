"""Reusable pytest fixtures: real storages served by real processes.

* ``spawn_writer(kind, target)`` -- a child process (tests/zwriter.py) that
  commits on command to a FileStorage (it holds the lock), a ZEO server or a
  RelStorage database.
* ``zeo_server(path)`` -- ``runzeo`` serving a Data.fs on a free port;
  ``stop()`` / ``kill()`` / ``start()`` again on the same port.
* ``pg_cluster`` (session) -- a private PostgreSQL 15 cluster (initdb +
  postgres as user ``postgres`` when run as root) on a unix socket dir and a
  free 127.0.0.1 port; ``pg_db`` creates a fresh database and returns its
  ``postgres://`` URL.  Skipped only if the PostgreSQL binaries are absent.

Every wait is bounded; every process is stopped by pid in teardown, also on
failure.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable, Iterator

import pytest

__all__ = ["Writer", "ZEOServer", "PGCluster", "free_port", "wait_port", "stop_pid",
           "spawn_writer", "zeo_server", "pg_cluster", "pg_db"]

HERE = os.path.dirname(os.path.abspath(__file__))
WRITER = os.path.join(HERE, "zwriter.py")
PY = sys.executable
BINDIR = os.path.dirname(PY)
PGBIN = "/usr/lib/postgresql/15/bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int | str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until something accepts connections on 127.0.0.1:port (or the
    unix socket at path ``port``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if isinstance(port, str):
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(0.5)
                    s.connect(port)
            else:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    pass
            return
        except OSError:
            pass
        if not alive():
            raise RuntimeError(f"server for {port} exited while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {port} after {timeout}s")
        time.sleep(0.05)


def stop_pid(proc: subprocess.Popen, timeout: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Stop one process we started: signal, wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class Writer:
    """A zwriter.py child; ``cmd(op=…, …)`` sends a command and returns its answer."""

    def __init__(self, kind: str, target: str, timeout: float = 60.0):
        self._errf = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([PY, WRITER, kind, target], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._errf, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pumper = threading.Thread(target=self._pump, daemon=True)
        self._pumper.start()
        self.hello = self.read(timeout)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr(self) -> str:
        self._errf.seek(0)
        return self._errf.read()

    def read(self, timeout: float = 60.0) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"writer did not answer in {timeout}s; stderr:\n{self.stderr()}")
        if line is None:
            raise RuntimeError(f"writer exited ({self.proc.wait(5)}); stderr:\n{self.stderr()}")
        return json.loads(line)

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def cmd(self, timeout: float = 60.0, **cmd) -> dict:
        self.send(**cmd)
        answer = self.read(timeout)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.stdin.close()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop_pid(self.proc)
        self._pumper.join(5)             # EOF once the process is gone
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self._errf.close()


@pytest.fixture
def spawn_writer() -> Iterator[Callable[[str, str], Writer]]:
    writers: list[Writer] = []

    def spawn(kind: str, target: str) -> Writer:
        w = Writer(kind, target)
        writers.append(w)
        return w

    try:
        yield spawn
    finally:
        for w in writers:
            w.close()


class ZEOServer:
    """runzeo serving one FileStorage on a free TCP port or a unix socket
    (``sock``: its path); restartable on the same address."""

    def __init__(self, path: str, sock: str | None = None):
        self.path = path
        self.sock = sock
        self.port = None if sock else free_port()
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+")

    @property
    def addr(self) -> str:
        """``host:port``, or the socket path."""
        return self.sock or f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen([os.path.join(BINDIR, "runzeo"), "-a", self.addr,
                                      "-f", self.path], stdout=self._log, stderr=self._log)
        proc = self.proc
        wait_port(self.sock or self.port, timeout, alive=lambda: proc.poll() is None)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)

    def kill(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc, sig=signal.SIGKILL)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def close(self) -> None:
        self.stop()
        self._log.close()


@pytest.fixture
def zeo_server() -> Iterator[Callable[..., ZEOServer]]:
    servers: list[ZEOServer] = []

    def start(path: str, sock: str | None = None) -> ZEOServer:
        srv = ZEOServer(path, sock)
        servers.append(srv)
        srv.start()
        return srv

    try:
        yield start
    finally:
        for srv in servers:
            srv.close()


class PGCluster:
    """A private PostgreSQL cluster in a temporary directory."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="zstor-pg-")
        self.data = os.path.join(self.tmp, "data")
        self.sockdir = os.path.join(self.tmp, "sock")
        self.port = free_port()
        os.mkdir(self.sockdir)
        self._as: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root.
            shutil.chown(self.tmp, "postgres")
            shutil.chown(self.sockdir, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self.logfile = os.path.join(self.tmp, "postgres.log")

    def _run(self, *argv: str, timeout: float = 60.0) -> None:
        subprocess.run(self._as + list(argv), check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        self._run(f"{PGBIN}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        opts = (f"-k {self.sockdir} -p {self.port} -c listen_addresses=127.0.0.1 "
                f"-c fsync=off -c full_page_writes=off")
        self._run(f"{PGBIN}/pg_ctl", "-D", self.data, "-o", opts, "-l", self.logfile,
                  "-w", "-t", "30", "start")
        wait_port(self.port, 30)

    def postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the cluster (idempotent) and remove its directory."""
        pid = self.postmaster_pid()
        if pid is not None:
            try:
                self._run(f"{PGBIN}/pg_ctl", "-D", self.data, "-m", "immediate", "-w",
                          "-t", "15", "stop", timeout=30)
            except (subprocess.SubprocessError, OSError):
                # pg_ctl could not stop it: kill the postmaster by its pid.
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def connect(self, dbname: str = "postgres"):
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                dbname=dbname, connect_timeout=10)
        conn.autocommit = True
        return conn

    def createdb(self) -> str:
        name = "z" + uuid.uuid4().hex[:12]
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {name}")
        finally:
            conn.close()
        return name

    def uri(self, dbname: str, query: str = "") -> str:
        q = f"?{query}" if query else ""
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}{q}"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PGCluster]:
    if not os.path.exists(f"{PGBIN}/initdb") or not os.path.exists(f"{PGBIN}/pg_ctl"):
        pytest.skip(f"PostgreSQL binaries not found in {PGBIN}")
    cluster = PGCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_db(pg_cluster: PGCluster) -> str:
    """URL of a fresh, empty database in the session's cluster."""
    return pg_cluster.uri(pg_cluster.createdb())
