"""The C++ core's watch-link wire format parser (wcfs_client/cpp/wire.*)."""
import pytest

from wcfs_client import _wcfs


def test_tid_hex_roundtrip():
    assert _wcfs.tid_hex(0x0285CBAC258BF266) == "0285cbac258bf266"
    assert _wcfs.tid_hex(b"\x02\x85\xcb\xac\x25\x8b\xf2\x66") == "0285cbac258bf266"
    assert _wcfs.parse_tid("0285CBAC258BF266") == 0x0285CBAC258BF266
    for bad in ["", "123", "0285cbac258bf26", "0285cbac258bf2666", "0285cbac258bf26g"]:
        with pytest.raises(ValueError, match="hex16"):
            _wcfs.parse_tid(bad)


def test_frame():
    assert _wcfs.parse_frame_line("2 pin 000000000000000a #2 @0285cbac1b3c9e00") == \
        (2, "pin 000000000000000a #2 @0285cbac1b3c9e00")
    assert _wcfs.parse_frame_line("18446744073709551615 ok") == (2**64 - 1, "ok")
    for bad in ["nospace", " 1 ok", "x ok", "18446744073709551616 ok", "-1 ok"]:
        with pytest.raises(ValueError, match="invalid frame"):
            _wcfs.parse_frame_line(bad)
    with pytest.raises(ValueError, match="too long"):
        _wcfs.parse_frame_line("2 " + "x" * 247)


def test_pin():
    assert _wcfs.parse_pin_payload(2, "pin 000000000000000a #2 @0285cbac1b3c9e00") == \
        (10, 2, 0x0285CBAC1B3C9E00)
    assert _wcfs.parse_pin_payload(4, "pin 000000000000000a #5 @head") == (10, 5, None)
    for bad in ["pin", "pin 000000000000000a", "pin 000000000000000a #x @head",
                "pin 000000000000000a #1", "pin 000000000000000a #1 head",
                "pin 00000000000000a #1 @head", "pin 000000000000000a #1 @12",
                "pin 000000000000000a #99999999999999999999 @head", "ping 000000000000000a #1 @head"]:
        with pytest.raises(ValueError):
            _wcfs.parse_pin_payload(2, bad)
