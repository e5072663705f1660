// sys.cpp -- see sys.h.
#include "sys.h"

#include <atomic>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <fcntl.h>
#include <map>
#include <pthread.h>
#include <set>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

#include "log.h"

namespace wcfs {

std::string errnoStr(int err) {
    char buf[256];
    // GNU strerror_r returns the message (possibly not in buf).
    return std::string(strerror_r(err, buf, sizeof buf));
}

Error sysError(const std::string& ctx, int err) { return Error(ctx + ": " + errnoStr(err)); }

int64_t monotonicNs() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

namespace fork {

namespace {

// Registry is immortal: it is allocated once and never destroyed, because
// threads of the client core (pinners, receivers) may still register or
// deregister while static destructors run at process exit.
struct Registry {
    std::mutex mu;                                      // protects everything below
    std::map<std::uintptr_t, std::size_t> mappings;     // addr -> len
    std::set<int> fds;
    std::map<const void*, std::weak_ptr<void>> objs;
    std::atomic<uint64_t> gen{0};

    Registry();
};

Registry& reg() {
    static Registry& r = *new Registry();
    return r;
}

// Objects kept alive in a forked child (see sys.h); immortal for the same
// reason as the registry.
std::vector<std::shared_ptr<void>>& childKeepalive() {
    static std::vector<std::shared_ptr<void>>& v = *new std::vector<std::shared_ptr<void>>();
    return v;
}

void atforkPrepare() { reg().mu.lock(); }

void atforkParent() { reg().mu.unlock(); }

void atforkChild() {
    Registry& r = reg();
    for (const auto& [addr, len] : r.mappings) {
        void* p = ::mmap(reinterpret_cast<void*>(addr), len, PROT_NONE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            // The child would keep a view that nobody maintains: never allow that.
            WCFS_LOG(Critical, "wcfs: after fork: cannot efault mapping [" +
                                   std::to_string(addr) + ", +" + std::to_string(len) +
                                   "): " + errnoStr(errno) + "; aborting the child");
            std::abort();
        }
    }
    r.mappings.clear();
    for (int fd : r.fds) ::close(fd);
    r.fds.clear();
    for (auto& [key, w] : r.objs) {
        if (auto sp = w.lock()) childKeepalive().push_back(std::move(sp));
    }
    r.objs.clear();
    r.gen.fetch_add(1);
    r.mu.unlock();
}

Registry::Registry() {
    int err = pthread_atfork(atforkPrepare, atforkParent, atforkChild);
    if (err != 0) {
        WCFS_LOG(Critical, "wcfs: pthread_atfork: " + errnoStr(err));
        std::abort();
    }
}

}  // namespace

uint64_t generation() { return reg().gen.load(std::memory_order_acquire); }

std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(reg().mu); }

void addMappingLocked(void* addr, std::size_t len) {
    reg().mappings[reinterpret_cast<std::uintptr_t>(addr)] = len;
}

void removeMappingLocked(void* addr) { reg().mappings.erase(reinterpret_cast<std::uintptr_t>(addr)); }

void addFd(int fd) {
    std::lock_guard<std::mutex> lk(reg().mu);
    reg().fds.insert(fd);
}

void removeFd(int fd) {
    std::lock_guard<std::mutex> lk(reg().mu);
    reg().fds.erase(fd);
}

void addKeepalive(const void* key, std::weak_ptr<void> obj) {
    std::lock_guard<std::mutex> lk(reg().mu);
    reg().objs[key] = std::move(obj);
}

void removeKeepalive(const void* key) {
    std::lock_guard<std::mutex> lk(reg().mu);
    reg().objs.erase(key);
}

}  // namespace fork

// --- AutoFd --------------------------------------------------------------------------

AutoFd::AutoFd(int fd) noexcept : fd_(fd), gen_(fork::generation()) { fork::addFd(fd); }

AutoFd::AutoFd(AutoFd&& o) noexcept : fd_(o.fd_), gen_(o.gen_) { o.fd_ = -1; }

AutoFd& AutoFd::operator=(AutoFd&& o) noexcept {
    if (this != &o) {
        close();
        fd_ = o.fd_;
        gen_ = o.gen_;
        o.fd_ = -1;
    }
    return *this;
}

AutoFd AutoFd::open(const std::string& path, int flags, const std::string& what) {
    int fd;
    do {
        fd = ::open(path.c_str(), flags | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) throw sysError("open " + what, errno);
    return AutoFd(fd);
}

int AutoFd::close() noexcept {
    if (fd_ < 0) return 0;
    int fd = fd_;
    fd_ = -1;
    if (gen_ != fork::generation()) return 0;   // closed by the fork handler already
    fork::removeFd(fd);
    // close(2) must not be retried on EINTR on Linux: the fd is gone either way.
    if (::close(fd) != 0 && errno != EINTR) return errno;
    return 0;
}

// --- memory --------------------------------------------------------------------------

namespace {

void remap(void* addr, std::size_t len, int prot, int flags, int fd, off_t off, const char* what) {
    void* p = ::mmap(addr, len, prot, flags | MAP_FIXED, fd, off);
    if (p == MAP_FAILED) {
        int e = errno;
        throw sysError(std::string("mmap ") + what + " [" + std::to_string(reinterpret_cast<std::uintptr_t>(addr)) +
                           ", +" + std::to_string(len) + ")",
                       e);
    }
}

}  // namespace

void mapFile(void* addr, std::size_t len, int fd, off_t off) {
    remap(addr, len, PROT_READ, MAP_SHARED, fd, off, "file");
}

void mapZeros(void* addr, std::size_t len) {
    remap(addr, len, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0, "zeros");
}

void mapFault(void* addr, std::size_t len) {
    remap(addr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0, "efault");
}

}  // namespace wcfs
