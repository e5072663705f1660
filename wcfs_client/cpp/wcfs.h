// wcfs.h -- the WCFS client core: isolated views of ZBigFiles over a shared
// page cache (WCFS.md §4).
//
// Objects.
//   WCFS     -- a mounted filesystem; connect(at) -> Conn.  Stateless, thread-safe.
//   Conn     -- a logical view of the database as of `at`: at(), open(foid),
//               resync(at), close().  Owns one WatchLink and one pinner thread.
//   FileH    -- the view of one ZBigFile under a Conn: blksize, pinned,
//               mmap(blk_start, blk_len) -> Mapping, close().  One FileH per
//               (Conn, foid), shared by all open()s of it (open counting).
//   Mapping  -- memory [mem_start, mem_stop) showing blocks
//               [blk_start, blk_stop) of the file as of Conn.at(): unmap(),
//               remmap_blk(blk) (entry point for the virtmem bridge).
//
// Memory layout of a Mapping (WCFS.md §4.4):
//   * base: MAP_SHARED|PROT_READ mapping of head/bigfile/<foid>;
//   * blocks at or beyond the head file size known to the Conn: read-only zeros
//     (a bigfile is conceptually infinite and zero-filled);
//   * every pinned block: MAP_FIXED overlay of @<rev>/bigfile/<foid> at the
//     block's offset, or zeros when that revision's file is shorter;
//   * after FileH.close / Conn.close / fork (in the child): PROT_NONE over the
//     whole range ("efaulted"): any access raises SIGSEGV, never stale data.
//
// Isolation.  The server sends `pin <foid> #<blk> @<rev>` before any change of
// a block under head/ becomes visible through a read of it, and waits for our
// ack (WCFS.md §2.5); the pinner thread re-maps the block in every Mapping of
// the file and only then acks.  The pinner never needs the Python GIL, so a
// Python thread that faults on a mapping (holding the GIL) while the server
// waits for that very pin is unblocked: the kernel lets us mmap(MAP_FIXED)
// over a page whose fault is waiting, and the fault completes with the @rev
// data (MEASURED.md).  @<rev> files are opened once per Conn and kept in a
// small LRU cache (kRevCacheSize): a pin costs one mmap(MAP_FIXED), not a
// FUSE lookup and open.
//
// Failure.  If a pin cannot be applied, the mappings covering the block are
// made PROT_NONE at once, the pinner logs CRITICAL, replies `nak: <why>` and
// closes the Conn asynchronously and *locally* (no `watch -`, no `bye`: a
// polite goodbye would let the server skip dealing with us); the server kills
// the process (SIGBUS).  A process is never left silently showing wrong data.
// A pin for a file this Conn has just unwatched is acked (the server may have
// decided on it before it processed the unwatch); a pin for a file never
// watched is refused ("unexpected pin").  If the server goes away (EOF, link
// error) the Conn is closed too: its memory faults instead of going stale.
//
// Threads.  Per Conn: the watch link's receiver (reads lines, delivers
// replies, queues pin requests) and the pinner (applies them).  They are
// separate so that replies keep flowing while a pin waits for a lock -- e.g.
// the virtmem bridge lock held by a thread waiting for the reply to its own
// request.  The hand-off costs one thread wake-up per pin.
//
// Locking model (WCFS.md §4.6).  Lock order, outermost first:
//
//     virtmemLock()  >  Conn.atMu  >  Conn.filehMu  >  FileH.mmapMu  >  Conn.revMu
//                                                     (fork registry mutex: leaf)
//
//   virtmemLock()  process-wide std::mutex reserved for the virtmem bridge
//                  (§4.8): held by the pinner for a whole pin and by resync
//                  while it re-maps grown file tails, so that "is this block
//                  dirty?" (FileH dirty hook) and the re-map are atomic with
//                  respect to the bridge.  Held across fork() too.
//   Conn.atMu      RWMutex (sync.h: reader-preferring, atomic downgrade).
//                  Protects Conn.at and FileH.headfsize.  Exclusive only in
//                  resync while `at` and the head sizes change; shared by
//                  open, close, mmap and the pinner, so pins are never applied
//                  against a half-changed view.
//   Conn.filehMu   RWMutex.  Protects the file table, FileH.state/nopen and
//                  the Conn's down state.  Exclusive for table changes; shared
//                  by the pinner (whole pin) and by resync while it re-watches.
//   FileH.mmapMu   std::mutex.  Protects FileH.pinned, FileH.mmaps and every
//                  Mapping's efaulted/unmapped state and memory layout.
//   Conn.revMu     std::mutex, leaf.  Protects the cache of open @rev files.
//
// Rules that keep this deadlock-free while the server waits for our pinner:
//   * Nothing talks to the server holding mmapMu or revMu, and nothing holds
//     filehMu exclusively or atMu exclusively while talking to the server.
//   * open/close send their `watch` requests holding atMu shared only; resync
//     sends them holding atMu and filehMu shared.  The pinner takes them shared
//     too, and RWMutex lets readers in while a writer waits.
//   * resync takes atMu exclusively *before* the virtmem lock (with try-lock
//     and back-off), because a thread holding atMu shared may be waiting for
//     the server, which waits for a pinner that needs the virtmem lock.
//   * Conn.close unwatches every file *before* it stops the pinner: pins for
//     still-watched files would otherwise go unanswered and get us killed.
//   * The pinner closes its Conn asynchronously on failure (a synchronous
//     close could wait for a resync that waits for the pinner).
//   * Never acquire the GIL under any of these locks (the bindings release it
//     around every blocking call and never call back into Python).
//
// Lifetime (RAII, shared ownership; no raw owning pointers).  A Conn is kept
// alive by its users, by its FileHs and by its pinner thread; it stays alive
// (and keeps answering pins) until close().  A FileH keeps its Conn, a
// Mapping its FileH.  FileH.mmaps holds non-owning pointers: a Mapping
// removes itself under mmapMu before it goes away.
//
// Fork (sys.h).  In a forked child every pre-fork mapping is PROT_NONE, every
// pre-fork descriptor (watch links, head files, @rev files) is closed, and
// every pre-fork Conn/FileH/Mapping is detached: operations fail with
// "connection closed" / "file already closed" or do nothing, without locks
// and without talking to the server.  The child may connect anew.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "sync.h"
#include "sys.h"
#include "wire.h"
#include "wlink.h"

namespace wcfs {

class Conn;
class FileH;
class Mapping;

// virtmemLock is the process-wide lock of the virtmem bridge (see above).
// It is held across fork() (atfork handlers), so a child never inherits it
// locked.
std::mutex& virtmemLock();

class WCFS : public std::enable_shared_from_this<WCFS> {
public:
    // How long connect/resync wait for head/at to reach the requested `at`.
    static constexpr double kHeadWait = 60.0;

    static std::shared_ptr<WCFS> make(const std::string& mountpoint);

    const std::string& mountpoint() const { return mnt_; }

    // connect waits until head/at >= at, opens a watch link and starts the
    // pinner of the new Conn.
    std::shared_ptr<Conn> connect(uint64_t at);

    // openLink opens a raw watch link (tests, tools).
    std::shared_ptr<WatchLink> openLink() { return WatchLink::open(mnt_); }

    // headAt reads head/at.
    uint64_t headAt();

    // waitHeadAt polls head/at every 1 ms until it is >= at (files are stat'ed
    // later, and their sizes only grow: WCFS.md §4.3).  Its errors carry no
    // "wcfs <mnt>" prefix: callers add their own context.
    void waitHeadAt(uint64_t at, double timeout_s = kHeadWait);

private:
    explicit WCFS(std::string mnt) : mnt_(std::move(mnt)) {}
    const std::string mnt_;
};

enum class FileState { Opening = 0, Opened = 1, Closing = 2, Closed = 3 };

class Conn : public std::enable_shared_from_this<Conn>, public ForkBound {
public:
    static constexpr std::size_t kRevCacheSize = 64;   // open @rev files kept per Conn
    static constexpr std::size_t kPinStatsSize = 4096;  // pin latencies remembered

    ~Conn();
    Conn(const Conn&) = delete;
    Conn& operator=(const Conn&) = delete;

    const std::shared_ptr<WCFS>& wc() const { return wc_; }
    int linkFd() const { return link_->fd(); }

    uint64_t at();

    // open returns the FileH of foid (shared; each call counts one open).
    std::shared_ptr<FileH> open(uint64_t foid);

    // resync moves the view to `at` (>= current at).  On any error the Conn is
    // closed and the error is thrown.
    void resync(uint64_t at);

    // close unwatches and closes every file (their mappings become SIGSEGV
    // memory), closes the watch link and stops the pinner.  Idempotent.
    void close();

    // PinTiming of one pin, measured from the moment the line arrived on the
    // watch link: `started` -- the pinner took it up (queueing behind earlier
    // pins included); `handled` -- the block is re-mapped and the reply is
    // ready; `replied` -- the write(2) of the reply returned (FUSE round trip
    // included).  Nanoseconds.
    struct PinTiming {
        int64_t started;
        int64_t handled;
        int64_t replied;
    };
    // pinLatencies: timings of the most recent pins, oldest first.
    std::vector<PinTiming> pinLatencies();
    uint64_t pinCount();

private:
    friend class WCFS;
    friend class FileH;
    friend class Mapping;

    struct RevFile {
        AutoFd fd;
        uint64_t size = 0;
        std::size_t blksize = 0;
    };
    using RevKey = std::pair<uint64_t, uint64_t>;   // (foid, rev)

    Conn(std::shared_ptr<WCFS> wc, std::shared_ptr<WatchLink> link, uint64_t at);

    std::string pfx(uint64_t at) const;
    void pinnerMain();
    std::string pin1(const PinReq& req);              // "" on success, else why
    // On a pinner failure: logFailure (CRITICAL when a pin was refused), then
    // closeAsync closes the Conn locally from another thread.
    void logFailure(const std::string& why, bool critical);
    void closeAsync(const std::string& why);
    // closeWith closes once (later calls return at once); reason goes into
    // the error later operations report.  polite=false (after a pinner
    // failure) closes locally only: files are not unwatched and no `bye` is
    // sent -- the server must still deal with us as with a faulty client.
    void closeWith(const std::string& reason, bool polite);
    void closeQuiet(const std::string& reason, bool polite) noexcept;
    std::shared_ptr<RevFile> revFile(uint64_t foid, uint64_t rev, std::size_t blksize);

    const std::shared_ptr<WCFS> wc_;
    const std::shared_ptr<WatchLink> link_;

    RWMutex atMu_;
    uint64_t at_;                                         // under atMu_

    RWMutex filehMu_;
    std::condition_variable_any filehCond_;               // FileH state changes (with filehMu_ exclusive)
    std::map<uint64_t, std::shared_ptr<FileH>> filehTab_; // under filehMu_
    std::string downErr_;                                 // under filehMu_: set -> Conn unusable
    std::set<uint64_t> unwatched_;                        // under filehMu_: foids we stopped watching

    std::mutex revMu_;
    std::list<std::pair<RevKey, std::shared_ptr<RevFile>>> revLRU_;  // under revMu_, most recent first

    std::mutex closeMu_;
    bool closed_ = false;                                 // under closeMu_
                                                          // (pinner_ is handed over under it too)
    std::atomic<bool> closing_{false};                    // EOF / link down is expected by the pinner

    std::thread pinner_;

    std::mutex statMu_;
    std::vector<PinTiming> pinNs_;                        // under statMu_: ring of timings
    uint64_t pinCount_ = 0;                               // under statMu_
};

class FileH : public std::enable_shared_from_this<FileH>, public ForkBound {
public:
    FileH(const FileH&) = delete;
    FileH& operator=(const FileH&) = delete;

    const std::shared_ptr<Conn>& conn() const { return conn_; }
    uint64_t foid() const { return foid_; }
    std::size_t blksize() const { return blksize_; }

    // pinned: pins in force {blk: rev} (for tests and diagnostics).
    std::map<int64_t, uint64_t> pinned();

    // mmap maps blocks [blk_start, blk_start+blk_len).  Errors: "file already
    // closed"; std::invalid_argument for negative/empty/overflowing ranges.
    std::shared_ptr<Mapping> mmap(int64_t blk_start, int64_t blk_len);

    // close drops one open; the last one unwatches the file, removes it from
    // the Conn and turns all its mappings into SIGSEGV memory.  Closing a
    // closed file succeeds.
    void close();

    // setDirtyHook installs the virtmem bridge's "is this block dirty?"
    // predicate (WCFS.md §4.8).  A dirty block is recorded in `pinned` but
    // not re-mapped by the pinner nor by resync.  Called with virtmemLock(),
    // Conn.atMu, Conn.filehMu (shared) and mmapMu held: it must not block.
    void setDirtyHook(std::function<bool(int64_t blk)> hook);

private:
    friend class Conn;
    friend class Mapping;

    FileH(std::shared_ptr<Conn> conn, uint64_t foid) : conn_(std::move(conn)), foid_(foid) {}
    // closeLocked: the caller holds conn.atMu shared.  polite=false: no unwatch.
    void closeLocked(bool force, bool polite = true);
    bool dirtyLocked(int64_t blk) const { return dirty_ && dirty_(blk); }
    std::string pfx() const;

    const std::shared_ptr<Conn> conn_;
    const uint64_t foid_;

    // Set once while Opening, under conn.filehMu exclusive; read-only after.
    std::size_t blksize_ = 0;
    AutoFd headf_;                        // closed under conn.filehMu exclusive

    uint64_t headfsize_ = 0;              // under conn.atMu

    FileState state_ = FileState::Opening;  // under conn.filehMu
    int nopen_ = 0;                         // under conn.filehMu
    std::string openErr_;                   // under conn.filehMu

    std::mutex mmapMu_;
    std::map<int64_t, uint64_t> pinned_;    // under mmapMu_
    std::vector<Mapping*> mmaps_;           // under mmapMu_; non-owning (see Lifetime)
    std::function<bool(int64_t)> dirty_;    // under mmapMu_
};

class Mapping : public ForkBound {
public:
    ~Mapping();
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;

    const std::shared_ptr<FileH>& fileh() const { return fileh_; }
    int64_t blk_start() const { return blkStart_; }
    int64_t blk_stop() const { return blkStop_; }
    uint8_t* mem_start() const { return mem_; }
    uint8_t* mem_stop() const { return mem_ + len_; }
    std::size_t size() const { return len_; }
    bool efaulted();

    // unmap releases the memory (idempotent).
    void unmap();

    // remmap_blk puts back the base layer of one block: its pin, or head
    // (virtmem bridge entry point: called after commit/abort with the virtmem
    // lock held).  An efaulted mapping gets the block efaulted again.
    void remmap_blk(int64_t blk);

private:
    friend class FileH;
    friend class Conn;

    Mapping(std::shared_ptr<FileH> f, int64_t blkStart, int64_t blkLen, uint8_t* mem, std::size_t len)
        : fileh_(std::move(f)), blkStart_(blkStart), blkStop_(blkStart + blkLen), mem_(mem), len_(len) {}

    // The caller holds conn.atMu (shared) and fileh.mmapMu.
    void remmapBlkLocked(int64_t blk, uint64_t rev);
    // growLocked re-maps file range [lo, hi) from zeros to head (clipped to
    // this mapping) and re-applies pins there; atMu (exclusive) + mmapMu held.
    void growLocked(uint64_t lo, uint64_t hi);
    void efaultLocked();                  // mmapMu held
    void unmapLocked();                   // mmapMu held
    std::string ctx() const;              // "wcfs <mnt>: conn<fd>: f<foid>: mapping #<blk>+<n>: "

    const std::shared_ptr<FileH> fileh_;
    const int64_t blkStart_, blkStop_;
    uint8_t* const mem_;
    const std::size_t len_;
    bool efaulted_ = false;               // under fileh.mmapMu
    bool unmapped_ = false;               // under fileh.mmapMu
};

}  // namespace wcfs
