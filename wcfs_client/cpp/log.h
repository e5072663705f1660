// log.h -- leveled logging of the C++ client core to stderr.
//
// Format (the same as the server's and the management code's, WCFS.md §6.7):
//
//     <L><mmdd hh:mm:ss.uuuuuu> <tid> <file>:<line>] <message>
//
// L is one of D I W E C, the time is local time with microseconds, tid the
// kernel thread id.  Each record is written with one write(2) so that lines
// of concurrent threads (and processes sharing stderr) do not interleave.
//
// Concurrency: the threshold is an atomic; emitting takes no lock and never
// touches Python, so the pinner thread may log while other threads hold the
// GIL, and a forked child may log without inheriting a held lock.
#pragma once

#include <string>

namespace wcfs {
namespace log {

enum class Level { Debug = 0, Info = 1, Warning = 2, Error = 3, Critical = 4 };

// setLevel sets the lowest level that is emitted (default Info).
void setLevel(Level level);
Level level();

inline bool enabled(Level l) { return static_cast<int>(l) >= static_cast<int>(level()); }

// emit writes one record; file is reduced to its basename.
void emit(Level l, const char* file, int line, const std::string& msg);

}  // namespace log
}  // namespace wcfs

#define WCFS_LOG(lvl, msg)                                                           \
    do {                                                                             \
        if (::wcfs::log::enabled(::wcfs::log::Level::lvl))                           \
            ::wcfs::log::emit(::wcfs::log::Level::lvl, __FILE__, __LINE__, (msg));   \
    } while (0)
