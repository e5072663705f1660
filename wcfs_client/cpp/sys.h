// sys.h -- the system layer of the client core: errors, owned file
// descriptors, memory-mapping primitives and fork safety.
//
// Errors.  Every failing operation throws wcfs::Error (a std::runtime_error)
// whose message carries the whole context, e.g.
// "wcfs /dev/shm/wcfs/<x>: conn7 @0285cbac258bf266: open f<000000000000000a>:
// open head/bigfile/000000000000000a: No such file or directory".  Callers
// add their own prefix when they rethrow.
//
// Fork safety (WCFS.md §4.3, §4.2).  After fork() the child has copies of our
// mappings (which would keep showing the parent's isolated view, one that the
// child's nonexistent pinner can no longer maintain), our file descriptors
// (among them the parent's watch links) and our objects, some of whose locks
// may be held by threads that do not exist in the child.  A process-wide
// registry, filled as resources are created, is therefore kept consistent
// across fork: pthread_atfork's prepare handler takes its mutex, and the
// child handler -- which runs before anything else in the child -- without
// taking any other lock
//   * turns every registered mapping into PROT_NONE memory (access -> SIGSEGV);
//   * closes every registered file descriptor (so the child never talks on
//     the parent's watch links and never holds them open);
//   * makes every registered object (Conn, WatchLink) immortal in the child:
//     their condition variables may have waiters that vanished with the fork,
//     and destroying such a condition variable can block forever in glibc;
//   * bumps the fork generation.  Objects remember the generation they were
//     created in; one from an older generation is "detached": its methods fail
//     ("connection closed" / "link is down") or do nothing, without taking
//     locks and without talking to the server.
// Resources created in the child belong to the new generation and work.
//
// Windows: an fd is registered right after open(2) and deregistered right
// before close(2) (never across a FUSE round trip under the registry mutex,
// which would make fork() wait for the server).  A fork landing exactly in
// such a window leaves that one descriptor open, unused, in the child.
// Mappings are created and destroyed under the registry mutex (no FUSE round
// trip is involved), so the child sees exactly the live ones.
//
// Concurrency: the registry mutex is a leaf lock (nothing else is acquired
// while it is held).  All functions here are thread-safe and GIL-free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <sys/types.h>

namespace wcfs {

class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// errnoStr is strerror(err) (thread-safe).
std::string errnoStr(int err);

// sysError builds Error("<ctx>: <strerror(err)>").
Error sysError(const std::string& ctx, int err);

int64_t monotonicNs();

namespace fork {

// generation is incremented in every forked child (see the header comment).
uint64_t generation();

// Registry lock: hold it to create/destroy a registered mapping atomically
// with respect to fork.
std::unique_lock<std::mutex> lock();

void addMappingLocked(void* addr, std::size_t len);
void removeMappingLocked(void* addr);

void addFd(int fd);
void removeFd(int fd);

// keepalive registers obj (by key) to be made immortal in a forked child.
void addKeepalive(const void* key, std::weak_ptr<void> obj);
void removeKeepalive(const void* key);

}  // namespace fork

// ForkBound remembers the generation an object was created in.
class ForkBound {
public:
    bool detached() const { return gen_ != fork::generation(); }

private:
    uint64_t gen_ = fork::generation();
};

// AutoFd owns one registered file descriptor (opened O_CLOEXEC).
class AutoFd {
public:
    AutoFd() noexcept = default;
    AutoFd(const AutoFd&) = delete;
    AutoFd& operator=(const AutoFd&) = delete;
    AutoFd(AutoFd&& o) noexcept;
    AutoFd& operator=(AutoFd&& o) noexcept;
    ~AutoFd() { close(); }

    // open opens path; throws Error("open <what>: <strerror>").
    static AutoFd open(const std::string& path, int flags, const std::string& what);

    int get() const noexcept { return fd_; }
    explicit operator bool() const noexcept { return fd_ >= 0; }

    // close closes the descriptor (idempotent) and returns 0 or the errno of
    // close(2).  In a forked child a descriptor inherited from the parent was
    // already closed by the fork handler: it is only forgotten (its number may
    // belong to a new file by now).
    int close() noexcept;

private:
    explicit AutoFd(int fd) noexcept;
    int fd_ = -1;
    uint64_t gen_ = 0;
};

// Memory primitives over [addr, addr+len) (page aligned); they throw Error.
//   mapFile:  MAP_SHARED|MAP_FIXED, PROT_READ view of fd at off
//   mapZeros: read-only zero memory (private anonymous, no reserve: the
//             shared zero page backs reads; equivalent to /dev/zero)
//   mapFault: PROT_NONE memory: any access raises SIGSEGV ("efault")
void mapFile(void* addr, std::size_t len, int fd, off_t off);
void mapZeros(void* addr, std::size_t len);
void mapFault(void* addr, std::size_t len);

}  // namespace wcfs
