// sync.h -- a reader/writer mutex that can be downgraded atomically.
//
// Why not std::shared_mutex: Conn.resync (WCFS.md §4.3) changes the Conn's
// `at` under the exclusive lock and must then keep the lock *shared* while it
// re-watches files, without a window in which another writer could slip in
// (that would let a second resync interleave) and without re-acquiring in an
// order that inverts the lock hierarchy.  std::shared_mutex has no downgrade.
//
// Policy: readers are preferred -- lock_shared() waits only while a writer
// *holds* the lock, never for writers that merely wait.  This is required,
// not a tuning choice: the pinner thread takes Conn.atMu / Conn.filehMu
// shared while another thread holds them shared and waits for the server,
// and the server waits for the pinner's ack.  With writer preference, any
// writer queued in between (a second resync, an open inserting into the file
// table) would block the pinner and deadlock the whole chain until the
// server's pin timeout kills the process.  Writers can starve only while
// readers overlap continuously; readers here are short (pins, opens).
//
// Concurrency: all state is protected by the internal std::mutex `mu_`.
// Meets the Lockable/SharedLockable requirements, so std::unique_lock,
// std::shared_lock and std::condition_variable_any work with it.
#pragma once

#include <condition_variable>
#include <mutex>
#include <shared_mutex>

namespace wcfs {

class RWMutex {
public:
    RWMutex() = default;
    RWMutex(const RWMutex&) = delete;
    RWMutex& operator=(const RWMutex&) = delete;

    void lock();
    bool try_lock();
    void unlock();

    void lock_shared();
    bool try_lock_shared();
    void unlock_shared();

    // unlock_and_lock_shared turns the exclusive lock held by the caller into
    // a shared one atomically: no writer can acquire the lock in between.
    void unlock_and_lock_shared();

private:
    std::mutex mu_;
    std::condition_variable cv_;
    int readers_ = 0;       // number of shared holders
    bool writer_ = false;   // an exclusive holder exists
};

// downgrade converts an exclusive guard into a shared one (see
// RWMutex::unlock_and_lock_shared).
inline std::shared_lock<RWMutex> downgrade(std::unique_lock<RWMutex>&& wlk) {
    RWMutex* m = wlk.release();
    m->unlock_and_lock_shared();
    return std::shared_lock<RWMutex>(*m, std::adopt_lock);
}

}  // namespace wcfs
