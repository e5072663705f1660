// log.cpp -- see log.h.
#include "log.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <unistd.h>

namespace wcfs {
namespace log {

namespace {

std::atomic<int> gLevel{static_cast<int>(Level::Info)};

const char* basename(const char* path) {
    const char* slash = std::strrchr(path, '/');
    return slash ? slash + 1 : path;
}

}  // namespace

void setLevel(Level l) { gLevel.store(static_cast<int>(l), std::memory_order_relaxed); }

Level level() { return static_cast<Level>(gLevel.load(std::memory_order_relaxed)); }

void emit(Level l, const char* file, int line, const std::string& msg) {
    static const char letters[] = "DIWEC";
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    localtime_r(&ts.tv_sec, &tm);
    char head[128];
    int n = std::snprintf(head, sizeof head, "%c%02d%02d %02d:%02d:%02d.%06ld %d %s:%d] ",
                          letters[static_cast<int>(l)], tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                          tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000, static_cast<int>(gettid()),
                          basename(file), line);
    if (n < 0) return;
    std::string rec(head, std::min<std::size_t>(std::size_t(n), sizeof head - 1));
    rec += msg;
    rec += '\n';
    const char* p = rec.data();
    std::size_t left = rec.size();
    int saved = errno;
    while (left > 0) {
        ssize_t w = ::write(STDERR_FILENO, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            break;      // nowhere to report a failure to log
        }
        p += w;
        left -= std::size_t(w);
    }
    errno = saved;
}

}  // namespace log
}  // namespace wcfs
