// wcfs.cpp -- see wcfs.h for the design, the locking model and lifetimes.
#include "wcfs.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <fcntl.h>
#include <pthread.h>
#include <stdexcept>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

namespace wcfs {

namespace {

// The virtmem lock is immortal (pinner threads may still use it while static
// destructors run) and is held across fork(): otherwise a pinner of the
// parent holding it would leave it locked forever in the child, and the
// child's own Conns would hang on their first pin.  Its atfork handlers are
// registered after the fork registry's, so that prepare takes it first (it
// comes before the registry mutex in the lock order).
std::mutex& makeVirtmemLock() {
    static std::mutex& mu = *new std::mutex();
    fork::generation();     // registers the registry's atfork handlers first
    int err = pthread_atfork([] { mu.lock(); }, [] { mu.unlock(); }, [] { mu.unlock(); });
    if (err != 0) {
        WCFS_LOG(Critical, "wcfs: pthread_atfork: " + errnoStr(err));
        std::abort();
    }
    return mu;
}

}  // namespace

std::mutex& virtmemLock() {
    static std::mutex& mu = makeVirtmemLock();
    return mu;
}

namespace {

std::string foidStr(uint64_t foid) { return "f<" + hex16(foid) + ">"; }

std::string revStr(uint64_t rev) { return rev == TidHead ? std::string("@head") : "@" + hex16(rev); }

std::size_t pageSize() {
    static const std::size_t ps = std::size_t(sysconf(_SC_PAGESIZE));
    return ps;
}

struct stat fstatOrThrow(int fd, const std::string& what) {
    struct stat st;
    if (::fstat(fd, &st) != 0) throw sysError("stat " + what, errno);
    return st;
}

}  // namespace

// --- WCFS ----------------------------------------------------------------------------

std::shared_ptr<WCFS> WCFS::make(const std::string& mountpoint) {
    return std::shared_ptr<WCFS>(new WCFS(mountpoint));
}

uint64_t WCFS::headAt() {
    AutoFd fd = AutoFd::open(mnt_ + "/head/at", O_RDONLY, "wcfs " + mnt_ + ": head/at");
    char buf[64];
    ssize_t n;
    do {
        n = ::pread(fd.get(), buf, sizeof buf, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) throw sysError("wcfs " + mnt_ + ": read head/at", errno);
    try {
        return parse_hex16(std::string_view(buf, std::size_t(n)));
    } catch (const std::invalid_argument& e) {
        throw Error("wcfs " + mnt_ + ": head/at: " + e.what());
    }
}

void WCFS::waitHeadAt(uint64_t at, double timeout_s) {
    const std::string what = "wait head/at >= @" + hex16(at);
    AutoFd fd = AutoFd::open(mnt_ + "/head/at", O_RDONLY, what + ": head/at");
    const int64_t deadline = monotonicNs() + int64_t(timeout_s * 1e9);
    for (;;) {
        char buf[64];
        ssize_t n = ::pread(fd.get(), buf, sizeof buf, 0);   // DIRECT_IO: always the current value
        if (n < 0) {
            if (errno == EINTR) continue;
            throw sysError(what + ": read head/at", errno);
        }
        uint64_t head;
        try {
            head = parse_hex16(std::string_view(buf, std::size_t(n)));
        } catch (const std::invalid_argument& e) {
            throw Error(what + ": head/at: " + e.what());
        }
        if (head >= at) return;
        if (monotonicNs() > deadline)
            throw Error(what + ": timed out after " +
                        std::to_string(int(timeout_s)) + "s (head/at is @" + hex16(head) + ")");
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
}

std::shared_ptr<Conn> WCFS::connect(uint64_t at) {
    std::shared_ptr<WatchLink> link;
    try {
        waitHeadAt(at);
        link = WatchLink::open(mnt_);
    } catch (const Error& e) {
        throw Error("wcfs " + mnt_ + ": connect @" + hex16(at) + ": " + e.what());
    }
    std::shared_ptr<Conn> conn(new Conn(shared_from_this(), link, at));
    fork::addKeepalive(conn.get(), conn);
    try {
        std::lock_guard<std::mutex> lk(conn->closeMu_);     // a closer reads pinner_ under it
        conn->pinner_ = std::thread([c = conn] { c->pinnerMain(); });
    } catch (const std::system_error& e) {
        link->close();
        fork::removeKeepalive(conn.get());
        throw Error(conn->pfx(at) + "start pinner: " + e.what());
    }
    return conn;
}

// --- Conn ----------------------------------------------------------------------------

Conn::Conn(std::shared_ptr<WCFS> wc, std::shared_ptr<WatchLink> link, uint64_t at)
    : wc_(std::move(wc)), link_(std::move(link)), at_(at) {
    pinNs_.reserve(kPinStatsSize);
}

Conn::~Conn() {
    if (detached()) return;     // not reached: Conns are immortal in a forked child
    closeQuiet("", true);   // also stops the pinner
    fork::removeKeepalive(this);
}

std::string Conn::pfx(uint64_t at) const {
    return "wcfs " + wc_->mountpoint() + ": conn" + std::to_string(link_->fd()) + " @" + hex16(at) + ": ";
}

uint64_t Conn::at() {
    if (detached()) return at_;     // no other thread of the parent exists in the child
    std::shared_lock<RWMutex> lk(atMu_);
    return at_;
}

std::shared_ptr<FileH> Conn::open(uint64_t foid) {
    if (detached()) throw Error(pfx(at_) + "open " + foidStr(foid) + ": connection closed (forked)");
    std::shared_lock<RWMutex> atLk(atMu_);
    const std::string p = pfx(at_) + "open " + foidStr(foid) + ": ";

    std::unique_lock<RWMutex> flk(filehMu_);
    std::shared_ptr<FileH> f;
    for (;;) {
        if (!downErr_.empty()) throw Error(p + downErr_);
        auto it = filehTab_.find(foid);
        if (it == filehTab_.end()) break;
        std::shared_ptr<FileH> cur = it->second;
        if (cur->state_ <= FileState::Opened) {
            cur->nopen_++;
            filehCond_.wait(flk, [&] { return cur->state_ != FileState::Opening; });
            if (cur->state_ == FileState::Opened) return cur;
            if (!cur->openErr_.empty()) throw Error(p + cur->openErr_);
            continue;       // closed meanwhile: look again
        }
        // Closing: wait until it left the table, then open anew.
        filehCond_.wait(flk, [&] {
            auto i = filehTab_.find(foid);
            return i == filehTab_.end() || i->second != cur;
        });
    }
    f.reset(new FileH(shared_from_this(), foid));
    f->nopen_ = 1;
    filehTab_[foid] = f;
    flk.unlock();

    std::string err;
    try {
        const std::string name = "head/bigfile/" + hex16(foid);
        AutoFd fd = AutoFd::open(wc_->mountpoint() + "/" + name, O_RDONLY, name);
        struct stat st = fstatOrThrow(fd.get(), name);
        if (st.st_blksize <= 0 || std::size_t(st.st_blksize) % pageSize() != 0)
            throw Error("wcfs bug: " + name + ": blksize " + std::to_string(st.st_blksize) +
                        " is not a multiple of the page size");
        if (st.st_size % st.st_blksize != 0)
            throw Error("wcfs bug: " + name + ": size " + std::to_string(st.st_size) +
                        " is not a multiple of blksize " + std::to_string(st.st_blksize));
        flk.lock();
        f->headf_ = std::move(fd);
        f->blksize_ = std::size_t(st.st_blksize);
        f->headfsize_ = uint64_t(st.st_size);
        flk.unlock();

        std::string reply = link_->send_req("watch " + hex16(foid) + " @" + hex16(at_));
        if (reply != "ok") err = "watch: " + reply;
    } catch (const std::exception& e) {
        err = e.what();
    }

    flk.lock();
    if (!err.empty()) {
        auto it = filehTab_.find(foid);
        if (it != filehTab_.end() && it->second == f) filehTab_.erase(it);
        unwatched_.insert(foid);    // a pin racing with the failed setup is harmless
        f->state_ = FileState::Closed;
        f->openErr_ = err;
        f->headf_.close();
        filehCond_.notify_all();
        throw Error(p + err);
    }
    f->state_ = FileState::Opened;
    filehCond_.notify_all();
    return f;
}

void Conn::resync(uint64_t at) {
    if (detached()) throw Error(pfx(at_) + "resync " + revStr(at) + ": connection closed (forked)");
    uint64_t oldAt;
    {
        std::shared_lock<RWMutex> atLk(atMu_);
        oldAt = at_;
        std::shared_lock<RWMutex> flk(filehMu_);
        if (!downErr_.empty()) throw Error(pfx(at_) + "resync " + revStr(at) + ": " + downErr_);
    }

    std::string err;
    try {
        wc_->waitHeadAt(at);
    } catch (const std::exception& e) {
        err = pfx(oldAt) + "resync " + revStr(at) + ": " + e.what();
    }

    if (err.empty()) {
        // atMu exclusive first, then the virtmem lock without waiting for it
        // under atMu (see the lock rules in wcfs.h).
        std::unique_lock<RWMutex> wlk(atMu_, std::defer_lock);
        std::unique_lock<std::mutex> vlk(virtmemLock(), std::defer_lock);
        for (;;) {
            wlk.lock();
            if (vlk.try_lock()) break;
            wlk.unlock();
            vlk.lock();         // wait for the holder (a pinner) to finish
            vlk.unlock();
        }
        std::shared_lock<RWMutex> flk(filehMu_);
        const std::string p = pfx(at_) + "resync " + revStr(at) + ": ";
        if (!downErr_.empty()) {
            err = p + downErr_;
        } else if (at < at_) {
            err = p + "going back in history is forbidden";
        } else if (at == at_) {
            return;         // nothing changes: no re-watch needed
        } else {
            at_ = at;
            // Head files may have grown: memory that showed zeros beyond the
            // old size now shows the head file there (WCFS.md §4.3 step 3).
            try {
                for (auto& [foid, f] : filehTab_) {
                    if (f->state_ != FileState::Opened) continue;
                    const std::string name = "head/bigfile/" + hex16(foid);
                    struct stat st = fstatOrThrow(f->headf_.get(), name);
                    if (std::size_t(st.st_blksize) != f->blksize_)
                        throw Error("wcfs bug: " + name + ": blksize changed " + std::to_string(f->blksize_) +
                                    " -> " + std::to_string(st.st_blksize));
                    if (uint64_t(st.st_size) % f->blksize_ != 0)
                        throw Error("wcfs bug: " + name + ": size " + std::to_string(st.st_size) +
                                    " is not a multiple of blksize");
                    if (uint64_t(st.st_size) < f->headfsize_)
                        throw Error("wcfs bug: " + name + ": size went down " + std::to_string(f->headfsize_) +
                                    " -> " + std::to_string(st.st_size));
                    uint64_t oldSize = f->headfsize_, newSize = uint64_t(st.st_size);
                    if (newSize == oldSize) continue;
                    f->headfsize_ = newSize;
                    std::lock_guard<std::mutex> mlk(f->mmapMu_);
                    for (Mapping* m : f->mmaps_) {
                        try {
                            m->growLocked(oldSize, newSize);
                        } catch (...) {
                            m->efaultLocked();      // half-remapped: never show it
                            throw;
                        }
                    }
                }
            } catch (const std::exception& e) {
                err = p + e.what();
            }
        }
        vlk.unlock();
        if (err.empty()) {
            // Re-watch every opened file holding atMu shared: the pinner
            // applies the pins and unpins the server sends meanwhile.
            std::shared_lock<RWMutex> rlk = downgrade(std::move(wlk));
            for (auto& [foid, f] : filehTab_) {
                if (f->state_ != FileState::Opened) continue;     // their own open/close watches
                try {
                    std::string reply = link_->send_req("watch " + hex16(foid) + " @" + hex16(at));
                    if (reply != "ok") err = p + foidStr(foid) + ": watch: " + reply;
                } catch (const std::exception& e) {
                    err = p + foidStr(foid) + ": " + e.what();
                }
                if (!err.empty()) break;
            }
        }
    }
    if (!err.empty()) {
        closeQuiet("resync failed", true);
        throw Error(err);
    }
}

void Conn::close() {
    if (detached()) return;
    closeWith("", true);
}

void Conn::closeQuiet(const std::string& reason, bool polite) noexcept {
    try {
        closeWith(reason, polite);
    } catch (const std::exception& e) {
        WCFS_LOG(Warning, std::string("close: ") + e.what());
    }
}

void Conn::closeWith(const std::string& reason, bool polite) {
    {
        std::lock_guard<std::mutex> lk(closeMu_);
        if (closed_) return;
        closed_ = true;
    }
    closing_ = true;
    std::string firstErr;
    {
        std::shared_lock<RWMutex> atLk(atMu_);
        for (;;) {
            std::shared_ptr<FileH> f;
            {
                std::unique_lock<RWMutex> flk(filehMu_);
                if (downErr_.empty())
                    downErr_ = reason.empty() ? "connection closed" : "connection closed (" + reason + ")";
                if (filehTab_.empty()) break;
                f = filehTab_.begin()->second;
                if (f->state_ == FileState::Opening || f->state_ == FileState::Closing) {
                    // An open or close in progress finishes first (an open
                    // will fail/succeed and be force-closed next round).
                    filehCond_.wait(flk, [&] {
                        return f->state_ == FileState::Opened || f->state_ == FileState::Closed;
                    });
                    continue;
                }
            }
            try {
                f->closeLocked(true, polite);
            } catch (const std::exception& e) {
                if (firstErr.empty()) firstErr = e.what();
            }
        }
    }
    // Files are unwatched: now the pinner may stop (it ends at the link's EOF).
    link_->close(polite);
    std::thread pinner;
    {
        std::lock_guard<std::mutex> lk(closeMu_);
        pinner = std::move(pinner_);
    }
    if (pinner.joinable()) {
        if (pinner.get_id() == std::this_thread::get_id())
            pinner.detach();
        else
            pinner.join();
    }
    {
        std::lock_guard<std::mutex> lk(revMu_);
        revLRU_.clear();
    }
    if (!firstErr.empty()) throw Error(firstErr);
}

std::shared_ptr<Conn::RevFile> Conn::revFile(uint64_t foid, uint64_t rev, std::size_t blksize) {
    std::lock_guard<std::mutex> lk(revMu_);
    const RevKey key(foid, rev);
    for (auto it = revLRU_.begin(); it != revLRU_.end(); ++it) {
        if (it->first == key) {
            revLRU_.splice(revLRU_.begin(), revLRU_, it);
            return revLRU_.front().second;
        }
    }
    const std::string name = "@" + hex16(rev) + "/bigfile/" + hex16(foid);
    auto rf = std::make_shared<RevFile>();
    rf->fd = AutoFd::open(wc_->mountpoint() + "/" + name, O_RDONLY, name);
    struct stat st = fstatOrThrow(rf->fd.get(), name);
    rf->size = uint64_t(st.st_size);
    rf->blksize = std::size_t(st.st_blksize);
    if (rf->blksize != blksize)
        throw Error("wcfs bug: " + name + ": blksize " + std::to_string(rf->blksize) + " != head's " +
                    std::to_string(blksize));
    revLRU_.emplace_front(key, rf);
    if (revLRU_.size() > kRevCacheSize) revLRU_.pop_back();
    return rf;
}

// --- pinner --------------------------------------------------------------------------

void Conn::pinnerMain() {
    for (;;) {
        std::optional<PinReq> req;
        try {
            req = link_->recv_req();
        } catch (const std::exception& e) {
            if (!closing_) {
                logFailure(e.what(), false);
                closeAsync(e.what());
            }
            return;
        }
        if (!req) {
            if (!closing_) {
                logFailure("unexpected EOF from the server", false);
                closeAsync("unexpected EOF from the server");
            }
            return;
        }
        const int64_t started = monotonicNs() - req->rx_ns;
        std::string err = pin1(*req);
        const int64_t handled = monotonicNs() - req->rx_ns;
        // Log before the nak: the server kills us as soon as it reads it.
        if (!err.empty()) logFailure(err, true);
        try {
            link_->reply_req(*req, err.empty() ? std::string("ack") : "nak: " + err);
        } catch (const std::exception& e) {
            if (!closing_) {
                if (err.empty()) logFailure(std::string("reply: ") + e.what(), false);
                closeAsync(err.empty() ? std::string("reply: ") + e.what() : err);
            }
            return;
        }
        {
            std::lock_guard<std::mutex> lk(statMu_);
            PinTiming t{started, handled, monotonicNs() - req->rx_ns};
            if (pinNs_.size() < kPinStatsSize)
                pinNs_.push_back(t);
            else
                pinNs_[pinCount_ % kPinStatsSize] = t;
            pinCount_++;
        }
        if (!err.empty()) {
            closeAsync(err);
            return;
        }
    }
}

std::string Conn::pin1(const PinReq& req) {
    if (!req.err.empty()) return "invalid pin request \"" + req.msg + "\": " + req.err;
    const std::string what = "pin " + foidStr(req.foid) + " #" + std::to_string(req.blk) + " " + revStr(req.at);
    std::lock_guard<std::mutex> vlk(virtmemLock());
    std::shared_lock<RWMutex> atLk(atMu_);
    std::shared_lock<RWMutex> flk(filehMu_);
    auto it = filehTab_.find(req.foid);
    if (it == filehTab_.end()) {
        // A pin the server decided on before it processed our `watch - `
        // may arrive after the `ok`: nothing of that file is mapped any more.
        if (unwatched_.count(req.foid)) {
            WCFS_LOG(Debug, pfx(at_) + what + ": file no longer watched; ack");
            return "";
        }
        return what + ": unexpected pin: " + foidStr(req.foid) + " not watched";
    }
    FileH& f = *it->second;
    std::lock_guard<std::mutex> mlk(f.mmapMu_);
    if (req.blk > INT64_MAX / int64_t(std::max<std::size_t>(f.blksize_, 1)) - 1)
        return what + ": block out of range";
    auto covers = [&](const Mapping* m) { return req.blk >= m->blkStart_ && req.blk < m->blkStop_; };
    try {
        for (Mapping* m : f.mmaps_) {
            if (!covers(m) || m->efaulted_) continue;
            if (f.dirtyLocked(req.blk)) continue;   // the bridge re-maps it after commit/abort
            m->remmapBlkLocked(req.blk, req.at);
        }
    } catch (const std::exception& e) {
        // The block may still show head data, which is wrong for us: fault
        // instead, right now (the Conn is closed asynchronously after the nak).
        for (Mapping* m : f.mmaps_)
            if (covers(m)) m->efaultLocked();
        return what + ": " + e.what();
    }
    if (req.at == TidHead)
        f.pinned_.erase(req.blk);
    else
        f.pinned_[req.blk] = req.at;
    return "";
}

void Conn::logFailure(const std::string& why, bool critical) {
    uint64_t at;
    {
        std::shared_lock<RWMutex> lk(atMu_);
        at = at_;
    }
    if (critical) {
        WCFS_LOG(Critical, pfx(at) + "pinner: " + why);
        WCFS_LOG(Critical, pfx(at) + "wcfs server will likely kill us soon.");
    } else {
        WCFS_LOG(Error, pfx(at) + "pinner: " + why + "; closing the connection");
    }
}

void Conn::closeAsync(const std::string& why) {
    // Closing synchronously here could deadlock (a resync holding filehMu
    // may be waiting for the server, which waits for us): close from aside.
    std::shared_ptr<Conn> self = shared_from_this();
    const std::string reason = "pinner failed: " + why;
    try {
        std::thread([self, reason] { self->closeQuiet(reason, false); }).detach();
    } catch (const std::system_error& e) {
        WCFS_LOG(Critical, "wcfs " + wc_->mountpoint() + ": conn" + std::to_string(link_->fd()) +
                               ": cannot start the closer thread: " + e.what());
    }
}

std::vector<Conn::PinTiming> Conn::pinLatencies() {
    std::lock_guard<std::mutex> lk(statMu_);
    if (pinNs_.size() < kPinStatsSize) return pinNs_;
    std::vector<PinTiming> out;
    out.reserve(pinNs_.size());
    std::size_t start = pinCount_ % kPinStatsSize;
    for (std::size_t i = 0; i < pinNs_.size(); i++) out.push_back(pinNs_[(start + i) % kPinStatsSize]);
    return out;
}

uint64_t Conn::pinCount() {
    std::lock_guard<std::mutex> lk(statMu_);
    return pinCount_;
}

// --- FileH ---------------------------------------------------------------------------

std::string FileH::pfx() const {
    // Called with conn.atMu held (or in a detached child).
    return conn_->pfx(conn_->at_) + foidStr(foid_) + ": ";
}

std::map<int64_t, uint64_t> FileH::pinned() {
    if (detached()) return {};
    std::lock_guard<std::mutex> lk(mmapMu_);
    return pinned_;
}

void FileH::setDirtyHook(std::function<bool(int64_t blk)> hook) {
    std::lock_guard<std::mutex> lk(mmapMu_);
    dirty_ = std::move(hook);
}

void FileH::close() {
    if (detached()) return;
    std::shared_lock<RWMutex> atLk(conn_->atMu_);
    closeLocked(false);
}

void FileH::closeLocked(bool force, bool polite) {
    Conn& c = *conn_;
    std::unique_lock<RWMutex> flk(c.filehMu_);
    if (state_ >= FileState::Closing) return;
    if (nopen_ > 0) nopen_--;
    if (nopen_ > 0 && !force) return;
    state_ = FileState::Closing;
    flk.unlock();

    std::string err;
    if (polite) {
        try {
            std::string reply = c.link_->send_req("watch " + hex16(foid_) + " -");
            if (reply != "ok") err = "unwatch: " + reply;
        } catch (const LinkDown& e) {
            // The server dropped every watch of the link with it.
            WCFS_LOG(Debug, pfx() + "unwatch: " + e.what());
        } catch (const std::exception& e) {
            err = std::string("unwatch: ") + e.what();
        }
    }

    flk.lock();
    auto it = c.filehTab_.find(foid_);
    if (it != c.filehTab_.end() && it->second.get() == this) c.filehTab_.erase(it);
    c.unwatched_.insert(foid_);
    {
        std::lock_guard<std::mutex> mlk(mmapMu_);
        for (Mapping* m : mmaps_) m->efaultLocked();
    }
    // A read-only descriptor is released even when close(2) reports an error
    // (e.g. ENOTCONN from a dead server's flush): nothing to report.
    int cerr = headf_.close();
    if (cerr != 0) WCFS_LOG(Debug, pfx() + "close head/bigfile/" + hex16(foid_) + ": " + errnoStr(cerr));
    state_ = FileState::Closed;
    c.filehCond_.notify_all();
    if (!err.empty()) throw Error(pfx() + "close: " + err);
}

std::shared_ptr<Mapping> FileH::mmap(int64_t blk_start, int64_t blk_len) {
    if (blk_start < 0 || blk_len <= 0)
        throw std::invalid_argument("mmap: invalid block range #" + std::to_string(blk_start) + " +" +
                                    std::to_string(blk_len));
    if (detached()) throw Error("mmap " + foidStr(foid_) + ": file already closed (forked)");
    Conn& c = *conn_;
    std::shared_lock<RWMutex> atLk(c.atMu_);
    std::shared_lock<RWMutex> flk(c.filehMu_);
    const std::string what = "mmap #" + std::to_string(blk_start) + " +" + std::to_string(blk_len);
    if (state_ >= FileState::Closing) throw Error(pfx() + what + ": file already closed");
    const int64_t bs = int64_t(blksize_);
    if (blk_start > INT64_MAX - blk_len || blk_start + blk_len > INT64_MAX / bs ||
        uint64_t(blk_len) * uint64_t(bs) > SIZE_MAX)
        throw std::invalid_argument(pfx() + what + ": block range overflows");
    const std::size_t len = std::size_t(blk_len) * blksize_;
    const uint64_t off = uint64_t(blk_start) * blksize_;

    std::shared_ptr<Mapping> m;     // destroyed after mmapMu is released
    std::lock_guard<std::mutex> mlk(mmapMu_);
    {
        auto rlk = fork::lock();
        void* addr = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, headf_.get(), off_t(off));
        if (addr == MAP_FAILED) throw sysError(pfx() + what + ": mmap head/bigfile", errno);
        fork::addMappingLocked(addr, len);
        m.reset(new Mapping(shared_from_this(), blk_start, blk_len, static_cast<uint8_t*>(addr), len));
    }
    try {
        if (off + len > headfsize_) {
            uint64_t z = std::max(headfsize_, off);
            mapZeros(m->mem_ + (z - off), std::size_t(off + len - z));
        }
        for (auto it = pinned_.lower_bound(blk_start); it != pinned_.end() && it->first < m->blkStop_; ++it)
            m->remmapBlkLocked(it->first, it->second);
    } catch (const std::exception& e) {
        m->unmapLocked();
        throw Error(pfx() + what + ": " + e.what());
    }
    mmaps_.push_back(m.get());
    return m;
}

// --- Mapping -------------------------------------------------------------------------

std::string Mapping::ctx() const {
    const Conn& c = *fileh_->conn_;
    return "wcfs " + c.wc_->mountpoint() + ": conn" + std::to_string(c.link_->fd()) + ": " +
           foidStr(fileh_->foid_) + ": mapping #" + std::to_string(blkStart_) + "+" +
           std::to_string(blkStop_ - blkStart_) + ": ";
}

Mapping::~Mapping() {
    try {
        unmap();
    } catch (const std::exception& e) {
        WCFS_LOG(Error, ctx() + "unmap: " + e.what());
    }
}

bool Mapping::efaulted() {
    if (detached()) return true;
    std::lock_guard<std::mutex> lk(fileh_->mmapMu_);
    return efaulted_;
}

void Mapping::unmap() {
    if (detached()) {
        // The fork handler made the range PROT_NONE and forgot it; release it
        // without touching the FileH, whose locks the parent's threads may hold.
        if (!unmapped_) {
            ::munmap(mem_, len_);
            unmapped_ = true;
        }
        return;
    }
    std::lock_guard<std::mutex> lk(fileh_->mmapMu_);
    unmapLocked();
}

void Mapping::unmapLocked() {
    if (unmapped_) return;
    auto& v = fileh_->mmaps_;
    v.erase(std::remove(v.begin(), v.end(), this), v.end());
    auto rlk = fork::lock();
    if (::munmap(mem_, len_) != 0)
        WCFS_LOG(Critical, ctx() + "munmap: " + errnoStr(errno));
    fork::removeMappingLocked(mem_);
    unmapped_ = true;
}

void Mapping::efaultLocked() {
    if (unmapped_ || efaulted_) return;
    try {
        mapFault(mem_, len_);
    } catch (const std::exception& e) {
        // The memory would keep showing data nobody maintains any more.
        WCFS_LOG(Critical, ctx() + "efault: " + e.what() + "; aborting");
        std::abort();
    }
    efaulted_ = true;
}

void Mapping::remmapBlkLocked(int64_t blk, uint64_t rev) {
    FileH& f = *fileh_;
    const std::size_t bs = f.blksize_;
    uint8_t* addr = mem_ + std::size_t(blk - blkStart_) * bs;
    const uint64_t off = uint64_t(blk) * bs;
    if (rev == TidHead) {
        if (off + bs <= f.headfsize_)
            mapFile(addr, bs, f.headf_.get(), off_t(off));
        else
            mapZeros(addr, bs);
        return;
    }
    std::shared_ptr<Conn::RevFile> rf = f.conn_->revFile(f.foid_, rev, bs);
    if (off + bs > rf->size)
        mapZeros(addr, bs);     // the block is beyond that revision's file size
    else
        mapFile(addr, bs, rf->fd.get(), off_t(off));
}

void Mapping::growLocked(uint64_t lo, uint64_t hi) {
    if (unmapped_ || efaulted_) return;
    FileH& f = *fileh_;
    const std::size_t bs = f.blksize_;
    const uint64_t mlo = uint64_t(blkStart_) * bs, mhi = uint64_t(blkStop_) * bs;
    // Clip at both ends, and take the file offset from the clipped start.
    lo = std::max(lo, mlo);
    hi = std::min(hi, mhi);
    if (lo >= hi) return;
    const int64_t b0 = int64_t(lo / bs), b1 = int64_t(hi / bs);
    // Map contiguous runs of clean, unpinned blocks to head in one call each;
    // pinned blocks go straight to their revision (never showing head data).
    int64_t run = b0;
    for (int64_t b = b0; b <= b1; b++) {
        bool stop = b == b1 || f.dirtyLocked(b) || f.pinned_.count(b) != 0;
        if (!stop) continue;
        if (run < b)
            mapFile(mem_ + std::size_t(run - blkStart_) * bs, std::size_t(b - run) * bs, f.headf_.get(),
                    off_t(uint64_t(run) * bs));
        run = b + 1;
    }
    // The pins that fall into the range (the memory showed zeros there).
    for (auto it = f.pinned_.lower_bound(b0); it != f.pinned_.end() && it->first < b1; ++it) {
        if (f.dirtyLocked(it->first)) continue;
        remmapBlkLocked(it->first, it->second);
    }
}

void Mapping::remmap_blk(int64_t blk) {
    if (blk < blkStart_ || blk >= blkStop_)
        throw std::invalid_argument("remmap_blk: #" + std::to_string(blk) + " is outside the mapping [" +
                                    std::to_string(blkStart_) + ", " + std::to_string(blkStop_) + ")");
    if (detached()) return;
    FileH& f = *fileh_;
    std::shared_lock<RWMutex> atLk(f.conn_->atMu_);
    std::lock_guard<std::mutex> mlk(f.mmapMu_);
    if (unmapped_) throw Error(f.pfx() + "remmap_blk #" + std::to_string(blk) + ": mapping is unmapped");
    if (efaulted_) {
        WCFS_LOG(Warning, f.pfx() + "remmap_blk #" + std::to_string(blk) + ": mapping is efaulted");
        mapFault(mem_ + std::size_t(blk - blkStart_) * f.blksize_, f.blksize_);
        return;
    }
    auto it = f.pinned_.find(blk);
    remmapBlkLocked(blk, it == f.pinned_.end() ? TidHead : it->second);
}

}  // namespace wcfs
