// wire.h -- the watch-link wire format, shared by every part of the C++ client.
//
// What it guarantees: strict parsing of what the server sends, in the exact
// textual forms of WCFS.md §0 and §2.2-§2.3:
//   * tids and oids are exactly 16 hex digits (lowercase on output);
//   * a frame is "<stream> <payload>" with <stream> a decimal uint64;
//   * a server request is "pin <foid16> #<blk> @<rev16|head>".
// Every parser throws std::invalid_argument with a message that quotes the
// offending input, so that callers can report it verbatim in a `nak`.
//
// Concurrency: pure functions, no state; safe from any thread, never touches
// Python (the pinner thread runs GIL-free).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace wcfs {

// TidHead is the symbolic "@head" revision: all ones.
constexpr uint64_t TidHead = ~uint64_t(0);

// Longest payload the client accepts from the server (WCFS.md §2.2).
constexpr std::size_t kMaxPayload = 246;

// Longest line (without its LF) the client accepts: a 20-digit stream id, a
// space and the longest payload.  The receiver fails the link beyond it.
constexpr std::size_t kMaxLine = 20 + 1 + kMaxPayload;

// hex16 formats v as exactly 16 lowercase hex digits.
std::string hex16(uint64_t v);

// parse_hex16 parses exactly 16 hex digits (either case).
uint64_t parse_hex16(std::string_view s);

struct Frame {
    uint64_t stream;
    std::string payload;
};

// parse_frame splits one line (without its trailing LF) into stream and payload.
Frame parse_frame(std::string_view line);

struct PinReq {
    uint64_t stream = 0;
    uint64_t foid = 0;
    int64_t blk = 0;
    uint64_t at = TidHead;   // TidHead for "@head" (unpin)
    std::string msg;         // raw payload, for diagnostics
    std::string err;         // set by the watch link when msg is not a valid pin request
    int64_t rx_ns = 0;       // monotonic time the watch link received the line
};

// parse_pin parses the payload of a server request on an even stream.
PinReq parse_pin(uint64_t stream, std::string_view payload);

}  // namespace wcfs
