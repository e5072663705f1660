# cython: language_level=3
"""Cython bindings over the C++ client core (wcfs_client/cpp).

Every C++ call that may block releases the GIL; C++ exceptions surface as
Python exceptions carrying the C++ message (std::invalid_argument becomes
ValueError).
"""
from libc.stdint cimport uint64_t, int64_t
from libcpp.string cimport string


cdef extern from "wire.h" namespace "wcfs" nogil:
    const uint64_t TidHead
    string hex16(uint64_t v)
    uint64_t parse_hex16(string s) except +
    cppclass Frame:
        uint64_t stream
        string payload
    Frame parse_frame(string line) except +
    cppclass PinReq:
        uint64_t stream
        uint64_t foid
        int64_t blk
        uint64_t at
        string msg
    PinReq parse_pin(uint64_t stream, string payload) except +


TID_HEAD = TidHead


def tid_hex(v) -> str:
    """Format a tid/oid (int or 8-byte bytes) as 16 lowercase hex digits."""
    if isinstance(v, (bytes, bytearray)):
        v = int.from_bytes(v, "big")
    return hex16(<uint64_t>v).decode()


def parse_tid(s: str) -> int:
    """Parse exactly 16 hex digits."""
    return parse_hex16(s.encode())


def parse_frame_line(line: str) -> tuple:
    """Split a watch-link line (without LF) into (stream, payload)."""
    cdef Frame f = parse_frame(line.encode())
    return f.stream, f.payload.decode()


def parse_pin_payload(uint64_t stream, payload: str) -> tuple:
    """Parse a server pin request -> (foid, blk, at or None for @head)."""
    cdef PinReq r = parse_pin(stream, payload.encode())
    return r.foid, r.blk, (None if r.at == TidHead else r.at)
