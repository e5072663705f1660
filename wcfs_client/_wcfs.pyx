# cython: language_level=3
"""Cython bindings over the C++ client core (wcfs_client/cpp).

Objects (names as in API.md §4): ``WCFS`` (base of ``wcfs_client.WCFS``),
``Conn``, ``FileH``, ``Mapping``, ``WatchLink`` and ``PinReq``.  Each Python
object holds a ``std::shared_ptr`` to its C++ counterpart; Python-level
references mirror the C++ ones (a Mapping keeps its FileH, a FileH its Conn,
a Conn its WCFS), so a Conn object goes away only when nothing of it is
used any more -- and then it is closed.

GIL: every C++ call that can block (on the server, on a lock the pinner may
hold, on a page fault) runs with the GIL released.  The C++ core never calls
back into Python, so its pinner thread can remap memory while a Python thread
that holds the GIL faults on that memory (WCFS.md §4.6).

Errors: C++ exceptions surface as Python exceptions carrying the C++ message
with its full context (wcfs::Error -> RuntimeError, std::invalid_argument ->
ValueError).  Tids and oids are accepted as ``int`` or 8-byte big-endian
``bytes`` and returned as 8-byte ``bytes``.

``Mapping.mem`` is a read-only memoryview exported straight from the mapped
memory (buffer protocol, no copy).  ``Mapping.unmap()`` refuses (BufferError)
while such views exist, like ``mmap.mmap.close``: unmapping under a live view
would turn a later access into a crash.
"""
from cpython.buffer cimport PyBuffer_FillInfo
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libcpp cimport bool as cbool
from libcpp.map cimport map as cmap
from libcpp.memory cimport shared_ptr
from libcpp.optional cimport optional
from libcpp.string cimport string
from libcpp.vector cimport vector

import operator
import os


cdef extern from "wire.h" namespace "wcfs" nogil:
    const uint64_t TidHead
    string hex16(uint64_t v)
    uint64_t parse_hex16(string s) except +
    cppclass Frame:
        uint64_t stream
        string payload
    Frame parse_frame(string line) except +
    cppclass CPinReq "wcfs::PinReq":
        uint64_t stream
        uint64_t foid
        int64_t blk
        uint64_t at
        string msg
        string err
        int64_t rx_ns
    CPinReq parse_pin(uint64_t stream, string payload) except +


cdef extern from "log.h" namespace "wcfs::log" nogil:
    cpdef enum class Level "wcfs::log::Level":
        Debug
        Info
        Warning
        Error
        Critical
    void setLevel(Level level)


cdef extern from "wcfs.h" nogil:
    cppclass CWatchLink "wcfs::WatchLink":
        int fd()
        string send_req(const string& req) except +
        optional[CPinReq] recv_req() except +
        void reply_req(const CPinReq& req, const string& reply) except +
        void close_write() except +
        void close(cbool bye) except +
        vector[string] control_msgs()
        cbool wait_server_closed(double timeout_s)
        void write_raw(const string& data) except +

    cppclass CMapping "wcfs::Mapping":
        int64_t blk_start()
        int64_t blk_stop()
        uint8_t* mem_start()
        size_t size()
        cbool efaulted()
        void unmap() except +

    cppclass CFileH "wcfs::FileH":
        uint64_t foid()
        size_t blksize()
        cmap[int64_t, uint64_t] pinned()
        shared_ptr[CMapping] mmap(int64_t blk_start, int64_t blk_len) except +
        void close() except +

    cppclass CPinTiming "wcfs::Conn::PinTiming":
        int64_t started
        int64_t handled
        int64_t replied

    cppclass CConn "wcfs::Conn":
        uint64_t at()
        shared_ptr[CFileH] open(uint64_t foid) except +
        void resync(uint64_t at) except +
        void close() except +
        vector[CPinTiming] pinLatencies()
        uint64_t pinCount()
        int linkFd()

    cppclass CWCFS "wcfs::WCFS":
        @staticmethod
        shared_ptr[CWCFS] make(const string& mountpoint)
        const string& mountpoint()
        shared_ptr[CConn] connect(uint64_t at) except +
        shared_ptr[CWatchLink] openLink() except +
        uint64_t headAt() except +


TID_HEAD = TidHead


# --- tid/oid conversion ---------------------------------------------------------------

cdef uint64_t _u64(v, str what) except? 0:
    """int or 8-byte big-endian bytes -> uint64."""
    if isinstance(v, (bytes, bytearray)):
        if len(v) != 8:
            raise ValueError(f"{what}: expected 8 bytes, got {len(v)}")
        return int.from_bytes(v, "big")
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{what}: expected int or 8-byte bytes, got {type(v).__name__}") from None
    if i < 0 or i >= 2**64:
        raise ValueError(f"{what}: {i} is out of the 64-bit range")
    return i


cdef bytes _p64(uint64_t v):
    return (<object>v).to_bytes(8, "big")


def tid_hex(v) -> str:
    """Format a tid/oid (int or 8-byte bytes) as 16 lowercase hex digits."""
    return hex16(_u64(v, "tid")).decode()


def parse_tid(s: str) -> int:
    """Parse exactly 16 hex digits."""
    return parse_hex16(s.encode())


def parse_frame_line(line: str) -> tuple:
    """Split a watch-link line (without LF) into (stream, payload)."""
    cdef Frame f = parse_frame(line.encode())
    return f.stream, f.payload.decode()


def parse_pin_payload(uint64_t stream, payload: str) -> tuple:
    """Parse a server pin request -> (foid, blk, at or None for @head)."""
    cdef CPinReq r = parse_pin(stream, payload.encode())
    return r.foid, r.blk, (None if r.at == TidHead else r.at)


_LEVELS = {"DEBUG": Level.Debug, "INFO": Level.Info, "WARNING": Level.Warning,
           "ERROR": Level.Error, "CRITICAL": Level.Critical}


def _set_log_level(name: str) -> None:
    """Lowest level the C++ core logs to stderr (default INFO)."""
    cdef Level lvl = _LEVELS[name.upper()]
    setLevel(lvl)


# --- WCFS -----------------------------------------------------------------------------

cdef class WCFS:
    """A mounted WCFS filesystem (the C++ ``WCFS``); see ``wcfs_client.join``."""

    cdef shared_ptr[CWCFS] _wc

    def __cinit__(self, mountpoint, *args, **kw):
        self._wc = CWCFS.make(os.fsencode(mountpoint))

    @property
    def mountpoint(self) -> str:
        return os.fsdecode(self._wc.get().mountpoint())

    def connect(self, at) -> Conn:
        """A Conn viewing the database as of `at` (waits until head/at >= at)."""
        cdef uint64_t a = _u64(at, "at")
        cdef shared_ptr[CConn] c
        with nogil:
            c = self._wc.get().connect(a)
        conn = Conn.__new__(Conn)
        (<Conn>conn)._c = c
        (<Conn>conn)._wc = self
        self._connected(conn)
        return conn

    def _connected(self, conn) -> None:
        """Hook for subclasses: called with every new Conn."""

    def _head_at(self) -> bytes:
        cdef uint64_t a
        with nogil:
            a = self._wc.get().headAt()
        return _p64(a)

    def _path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)


# --- Conn -----------------------------------------------------------------------------

cdef class Conn:
    """A logical view of the database as of ``at()`` (the C++ ``Conn``)."""

    cdef shared_ptr[CConn] _c
    cdef object _wc
    cdef object __weakref__

    cdef CConn* _get(self) except NULL:
        if self._c.get() == NULL:
            raise RuntimeError("uninitialized Conn")
        return self._c.get()

    def __init__(self, *args, **kw):
        raise TypeError("Conn objects are created by WCFS.connect")

    def __dealloc__(self):
        # Nothing (no FileH, no Mapping) uses this Conn any more: close it so
        # that its watch link and pinner thread go away.
        cdef CConn* c = self._c.get()
        if c != NULL:
            try:
                with nogil:
                    c.close()
            except Exception:
                pass
            with nogil:
                self._c.reset()

    @property
    def wc(self):
        return self._wc

    def at(self) -> bytes:
        cdef CConn* c = self._get()
        cdef uint64_t a
        with nogil:
            a = c.at()
        return _p64(a)

    def open(self, foid) -> FileH:
        """FileH of ZBigFile `foid` (shared per foid; each call is one open)."""
        cdef CConn* c = self._get()
        cdef uint64_t o = _u64(foid, "foid")
        cdef shared_ptr[CFileH] f
        with nogil:
            f = c.open(o)
        fh = FileH.__new__(FileH)
        (<FileH>fh)._f = f
        (<FileH>fh)._conn = self
        return fh

    def resync(self, at) -> None:
        """Move the view to a newer `at`; on any error the Conn is closed."""
        cdef CConn* c = self._get()
        cdef uint64_t a = _u64(at, "at")
        with nogil:
            c.resync(a)

    def close(self) -> None:
        cdef CConn* c = self._get()
        with nogil:
            c.close()

    def _pin_latencies(self) -> list:
        """Recent pins: [(started, handled, replied)] in seconds since the pin
        line arrived: taken up by the pinner / block re-mapped and reply ready /
        reply write returned."""
        cdef CConn* c = self._get()
        cdef vector[CPinTiming] v
        with nogil:
            v = c.pinLatencies()
        return [(t.started / 1e9, t.handled / 1e9, t.replied / 1e9) for t in v]

    def _pin_count(self) -> int:
        cdef CConn* c = self._get()
        cdef uint64_t n
        with nogil:
            n = c.pinCount()
        return n

    def _link_fd(self) -> int:
        return self._get().linkFd()

    def __repr__(self) -> str:
        if self._c.get() == NULL:
            return "<wcfs_client.Conn (uninitialized)>"
        return f"<wcfs_client.Conn conn{self._c.get().linkFd()} @{self.at().hex()}>"


# --- FileH ----------------------------------------------------------------------------

cdef class FileH:
    """Isolated view of one ZBigFile under a Conn (the C++ ``FileH``)."""

    cdef shared_ptr[CFileH] _f
    cdef object _conn

    cdef CFileH* _get(self) except NULL:
        if self._f.get() == NULL:
            raise RuntimeError("uninitialized FileH")
        return self._f.get()

    def __init__(self, *args, **kw):
        raise TypeError("FileH objects are created by Conn.open")

    def __dealloc__(self):
        with nogil:
            self._f.reset()

    @property
    def conn(self):
        return self._conn

    @property
    def foid(self) -> bytes:
        return _p64(self._get().foid())

    @property
    def blksize(self) -> int:
        return self._get().blksize()

    @property
    def pinned(self) -> dict:
        """Pins in force: {blk: rev bytes}."""
        cdef CFileH* f = self._get()
        cdef cmap[int64_t, uint64_t] p
        with nogil:
            p = f.pinned()
        return {blk: _p64(rev) for blk, rev in p}

    def mmap(self, blk_start, blk_len) -> Mapping:
        """Map blocks [blk_start, blk_start+blk_len) as of Conn.at()."""
        cdef CFileH* f = self._get()
        cdef int64_t start = blk_start, n = blk_len
        cdef shared_ptr[CMapping] m
        with nogil:
            m = f.mmap(start, n)
        mm = Mapping.__new__(Mapping)
        (<Mapping>mm)._m = m
        (<Mapping>mm)._fileh = self
        return mm

    def close(self) -> None:
        cdef CFileH* f = self._get()
        with nogil:
            f.close()


# --- Mapping --------------------------------------------------------------------------

cdef class Mapping:
    """Memory showing blocks [blk_start, blk_stop) of a file (the C++ ``Mapping``)."""

    cdef shared_ptr[CMapping] _m
    cdef object _fileh
    cdef Py_ssize_t _exports
    cdef bint _unmapped

    cdef CMapping* _get(self) except NULL:
        if self._m.get() == NULL:
            raise RuntimeError("uninitialized Mapping")
        return self._m.get()

    def __init__(self, *args, **kw):
        raise TypeError("Mapping objects are created by FileH.mmap")

    def __dealloc__(self):
        with nogil:
            self._m.reset()         # the C++ destructor unmaps

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        cdef CMapping* m = self._get()
        if self._unmapped:
            raise BufferError("wcfs mapping is unmapped")
        # readonly=1: a request for a writable buffer raises BufferError
        PyBuffer_FillInfo(buffer, self, <void*>m.mem_start(), <Py_ssize_t>m.size(), 1, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self._exports -= 1

    @property
    def fileh(self):
        return self._fileh

    @property
    def mem(self) -> memoryview:
        """Read-only memoryview over the mapping (no copy); data as of Conn.at()."""
        return memoryview(self)

    @property
    def blk_start(self) -> int:
        return self._get().blk_start()

    @property
    def blk_stop(self) -> int:
        return self._get().blk_stop()

    @property
    def efaulted(self) -> bool:
        cdef CMapping* m = self._get()
        cdef cbool e
        with nogil:
            e = m.efaulted()
        return e

    def unmap(self) -> None:
        """Release the memory (idempotent); BufferError while views of it exist."""
        cdef CMapping* m = self._get()
        if self._unmapped:
            return
        if self._exports > 0:
            raise BufferError(f"cannot unmap: {self._exports} exported view(s) of the mapping exist")
        with nogil:
            m.unmap()
        self._unmapped = True


# --- WatchLink ------------------------------------------------------------------------

class PinReq:
    """A server request received on a watch link.

    ``foid`` (bytes), ``blk`` (int), ``at`` (bytes, or None for @head), ``msg``
    (raw payload); ``error`` is set (and the other fields are None) when the
    payload is not a valid pin request -- it must be answered all the same.
    """

    __slots__ = ("stream", "foid", "blk", "at", "msg", "error")

    def __init__(self, stream, foid, blk, at, msg, error=None):
        self.stream = stream
        self.foid = foid
        self.blk = blk
        self.at = at
        self.msg = msg
        self.error = error

    def __repr__(self) -> str:
        return f"PinReq({self.stream} {self.msg!r})"


cdef class WatchLink:
    """Raw watch link (tests, tools): WatchLink(wc) opens ``head/watch``."""

    cdef shared_ptr[CWatchLink] _wl
    cdef object _wc

    cdef CWatchLink* _get(self) except NULL:
        if self._wl.get() == NULL:
            raise RuntimeError("uninitialized WatchLink")
        return self._wl.get()

    def __cinit__(self, WCFS wc not None):
        cdef CWCFS* w = wc._wc.get()
        with nogil:
            self._wl = w.openLink()
        self._wc = wc

    def __dealloc__(self):
        cdef CWatchLink* wl = self._wl.get()
        if wl != NULL:
            try:
                with nogil:
                    wl.close(True)
            except Exception:
                pass
            with nogil:
                self._wl.reset()

    def send_req(self, msg: str) -> str:
        """Send on a fresh odd stream; return the reply payload."""
        cdef CWatchLink* wl = self._get()
        cdef string req = msg.encode()
        cdef string reply
        with nogil:
            reply = wl.send_req(req)
        return reply.decode()

    def recv_req(self):
        """Next server request (PinReq), None at EOF."""
        cdef CWatchLink* wl = self._get()
        cdef optional[CPinReq] r
        with nogil:
            r = wl.recv_req()
        if not r.has_value():
            return None
        cdef CPinReq* p = &r.value()
        if p.err.size() != 0:
            return PinReq(p.stream, None, None, None, p.msg.decode(), p.err.decode())
        return PinReq(p.stream, _p64(p.foid), p.blk, None if p.at == TidHead else _p64(p.at),
                      p.msg.decode())

    def reply_req(self, req, msg: str) -> None:
        cdef CWatchLink* wl = self._get()
        cdef CPinReq r
        r.stream = req.stream
        cdef string reply = msg.encode()
        with nogil:
            wl.reply_req(r, reply)

    def close_write(self) -> None:
        cdef CWatchLink* wl = self._get()
        with nogil:
            wl.close_write()

    def close(self) -> None:
        cdef CWatchLink* wl = self._get()
        with nogil:
            wl.close(True)

    @property
    def fd(self) -> int:
        return self._get().fd()

    def _control(self) -> list:
        """Stream-0 payloads received from the server."""
        return [s.decode() for s in self._get().control_msgs()]

    def _wait_server_closed(self, timeout: float) -> bool:
        cdef CWatchLink* wl = self._get()
        cdef double t = timeout
        cdef cbool r
        with nogil:
            r = wl.wait_server_closed(t)
        return r

    def _write_raw(self, data: bytes) -> None:
        cdef CWatchLink* wl = self._get()
        cdef string s = data
        with nogil:
            wl.write_raw(s)
