// wire.cpp -- see wire.h.
#include "wire.h"

#include <stdexcept>

namespace wcfs {

namespace {

std::invalid_argument bad(const char* what, std::string_view s) {
    return std::invalid_argument(std::string(what) + ": \"" + std::string(s) + "\"");
}

int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// parse_u64 parses a non-empty decimal number that fits in 64 bits.
uint64_t parse_u64(std::string_view s, const char* what) {
    if (s.empty()) throw bad(what, s);
    uint64_t v = 0;
    for (char c : s) {
        if (c < '0' || c > '9') throw bad(what, s);
        uint64_t d = uint64_t(c - '0');
        if (v > (UINT64_MAX - d) / 10) throw bad(what, s);
        v = v * 10 + d;
    }
    return v;
}

}  // namespace

std::string hex16(uint64_t v) {
    static const char digits[] = "0123456789abcdef";
    std::string out(16, '0');
    for (int i = 15; i >= 0; --i, v >>= 4) out[std::size_t(i)] = digits[v & 0xf];
    return out;
}

uint64_t parse_hex16(std::string_view s) {
    if (s.size() != 16) throw bad("invalid hex16", s);
    uint64_t v = 0;
    for (char c : s) {
        int d = hexval(c);
        if (d < 0) throw bad("invalid hex16", s);
        v = (v << 4) | uint64_t(d);
    }
    return v;
}

Frame parse_frame(std::string_view line) {
    auto sp = line.find(' ');
    if (sp == std::string_view::npos) throw bad("invalid frame", line);
    Frame f;
    f.stream = parse_u64(line.substr(0, sp), "invalid frame: invalid stream");
    f.payload = std::string(line.substr(sp + 1));
    if (f.payload.size() > kMaxPayload) throw bad("invalid frame: payload too long", line);
    return f;
}

PinReq parse_pin(uint64_t stream, std::string_view payload) {
    // pin <foid> #<blk> @<rev|head>
    PinReq r;
    r.stream = stream;
    r.msg = std::string(payload);
    std::string_view p = payload;
    constexpr std::string_view kPin = "pin ";
    if (p.substr(0, kPin.size()) != kPin) throw bad("not a pin request", payload);
    p.remove_prefix(kPin.size());

    auto sp1 = p.find(' ');
    if (sp1 == std::string_view::npos) throw bad("pin: expected 3 arguments", payload);
    r.foid = parse_hex16(p.substr(0, sp1));
    p.remove_prefix(sp1 + 1);

    auto sp2 = p.find(' ');
    if (sp2 == std::string_view::npos || p.empty() || p[0] != '#')
        throw bad("pin: invalid blk", payload);
    uint64_t blk = parse_u64(p.substr(1, sp2 - 1), "pin: invalid blk");
    if (blk > uint64_t(INT64_MAX)) throw bad("pin: invalid blk", payload);
    r.blk = int64_t(blk);
    p.remove_prefix(sp2 + 1);

    if (p.empty() || p[0] != '@') throw bad("pin: invalid at", payload);
    p.remove_prefix(1);
    r.at = (p == "head") ? TidHead : parse_hex16(p);
    return r;
}

}  // namespace wcfs
