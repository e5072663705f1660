// wlink.cpp -- see wlink.h.
#include "wlink.h"

#include <cerrno>
#include <chrono>
#include <fcntl.h>
#include <stdexcept>
#include <unistd.h>

#include "log.h"

namespace wcfs {

WatchLink::WatchLink(std::string mnt, AutoFd fd)
    : mnt_(std::move(mnt)), fdnum_(fd.get()), fd_(std::move(fd)) {}

std::shared_ptr<WatchLink> WatchLink::open(const std::string& mountpoint) {
    AutoFd fd = AutoFd::open(mountpoint + "/head/watch", O_RDWR, "head/watch");
    std::shared_ptr<WatchLink> wl(new WatchLink(mountpoint, std::move(fd)));
    fork::addKeepalive(wl.get(), wl);
    try {
        wl->rx_ = std::thread([self = wl] { self->recvLoop(); });
    } catch (const std::system_error& e) {
        throw Error(wl->pfx() + "start receiver: " + e.what());
    }
    return wl;
}

WatchLink::~WatchLink() {
    if (detached()) return;     // not reached: links are immortal in a forked child
    close();
    if (rx_.joinable()) {
        if (rx_.get_id() == std::this_thread::get_id())
            rx_.detach();       // the receiver dropped the last reference on its way out
        else
            rx_.join();
    }
    fork::removeKeepalive(this);
}

// --- receiver ------------------------------------------------------------------------

void WatchLink::recvLoop() {
    std::string acc;            // bytes received, not yet split into lines
    char buf[4096];
    for (;;) {
        ssize_t n = ::read(fd_.get(), buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR) continue;
            markDown("read: " + errnoStr(errno), false);
            return;
        }
        if (n == 0) {
            markDown("EOF", true);
            return;
        }
        int64_t rxNs = monotonicNs();
        acc.append(buf, std::size_t(n));
        std::size_t start = 0;
        for (;;) {
            std::size_t nl = acc.find('\n', start);
            if (nl == std::string::npos) break;
            std::string err = dispatch(acc.substr(start, nl - start), rxNs);
            if (!err.empty()) {
                WCFS_LOG(Error, logPfx() + "protocol error: " + err);
                markDown("protocol error: " + err, false);
                return;
            }
            start = nl + 1;
        }
        acc.erase(0, start);
        if (acc.size() > kMaxLine) {
            std::string err = "line too long (> " + std::to_string(kMaxLine) + " bytes without LF)";
            WCFS_LOG(Error, logPfx() + "protocol error: " + err);
            markDown("protocol error: " + err, false);
            return;
        }
    }
}

std::string WatchLink::dispatch(const std::string& line, int64_t rxNs) {
    if (line.size() > kMaxLine) return "line too long (" + std::to_string(line.size()) + " bytes)";
    Frame f;
    try {
        f = parse_frame(line);
    } catch (const std::invalid_argument& e) {
        return e.what();
    }
    if (f.stream == 0) {
        WCFS_LOG(Warning, logPfx() + "server: " + f.payload);
        std::lock_guard<std::mutex> lk(mu_);
        control_.push_back(f.payload);
        return "";
    }
    if (f.stream % 2 == 1) {
        std::lock_guard<std::mutex> lk(mu_);
        auto it = waiting_.find(f.stream);
        if (it == waiting_.end())
            return "reply on stream " + std::to_string(f.stream) + " with no outstanding request";
        it->second->done = true;
        it->second->reply = std::move(f.payload);
        waiting_.erase(it);
        cv_.notify_all();
        return "";
    }
    PinReq req;
    try {
        req = parse_pin(f.stream, f.payload);
    } catch (const std::invalid_argument& e) {
        req = PinReq();
        req.stream = f.stream;
        req.msg = f.payload;
        req.err = e.what();
    }
    req.rx_ns = rxNs;
    std::lock_guard<std::mutex> lk(mu_);
    if (!accepted_.insert(f.stream).second)
        return "server request on stream " + std::to_string(f.stream) + " which is still outstanding";
    rxq_.push_back(std::move(req));
    cv_.notify_all();
    return "";
}

void WatchLink::markDown(const std::string& why, bool eof) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!down_) {
        down_ = true;
        eof_ = eof;
        why_ = why;
    }
    rxDone_ = true;
    cv_.notify_all();
}

// --- client side ---------------------------------------------------------------------

void WatchLink::writeLine(const std::string& line) {
    std::lock_guard<std::mutex> lk(txMu_);
    if (!fd_) throw LinkDown(pfx() + "write: link is down (closed)");
    const char* p = line.data();
    std::size_t left = line.size();
    while (left > 0) {
        ssize_t n = ::write(fd_.get(), p, left);
        if (n < 0) {
            if (errno == EINTR) continue;
            throw LinkDown(pfx() + "write: " + errnoStr(errno) + " (link is down)");
        }
        p += n;
        left -= std::size_t(n);
    }
}

std::string WatchLink::send_req(const std::string& req) {
    if (req.find('\n') != std::string::npos)
        throw std::invalid_argument(pfx() + "send_req: request must not contain LF");
    if (detached()) throw LinkDown(pfx() + req + ": link is down (forked)");
    auto w = std::make_shared<Waiter>();
    uint64_t id;
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (down_ || closed_)
            throw LinkDown(pfx() + req + ": link is down (" + (closed_ ? std::string("closed") : why_) + ")");
        id = nextReqId_;
        nextReqId_ += 2;
        waiting_[id] = w;
    }
    try {
        writeLine(std::to_string(id) + " " + req + "\n");
    } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        waiting_.erase(id);
        throw;
    }
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return w->done || down_; });
    if (w->done) return w->reply;
    waiting_.erase(id);
    throw LinkDown(pfx() + req + ": recvReply: link is down (" + why_ + ")");
}

std::optional<PinReq> WatchLink::recv_req() {
    if (detached()) throw LinkDown(pfx() + "recvReq: link is down (forked)");
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return !rxq_.empty() || down_; });
    if (!rxq_.empty()) {
        PinReq r = std::move(rxq_.front());
        rxq_.pop_front();
        return r;
    }
    if (eof_) return std::nullopt;
    throw LinkDown(pfx() + "recvReq: link is down (" + why_ + ")");
}

void WatchLink::reply_req(const PinReq& req, const std::string& reply) {
    if (reply.find('\n') != std::string::npos)
        throw std::invalid_argument(pfx() + "reply_req: reply must not contain LF");
    if (detached()) throw LinkDown(pfx() + "reply: link is down (forked)");
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (accepted_.erase(req.stream) == 0)
            throw std::logic_error(pfx() + "reply_req: stream " + std::to_string(req.stream) +
                                   " is not an accepted, unanswered server request");
        if (down_) throw LinkDown(pfx() + "reply " + std::to_string(req.stream) + ": link is down (" + why_ + ")");
    }
    writeLine(std::to_string(req.stream) + " " + reply + "\n");
}

void WatchLink::close_write() {
    if (detached()) return;
    uint64_t id;
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (byeSent_) return;
        byeSent_ = true;
        id = nextReqId_;
        nextReqId_ += 2;
    }
    writeLine(std::to_string(id) + " bye\n");
}

void WatchLink::close(bool bye) {
    if (detached()) return;
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (closed_) return;
        closed_ = true;
        cv_.notify_all();
    }
    try {
        if (bye) close_write();
    } catch (const std::exception& e) {
        WCFS_LOG(Debug, logPfx() + "close: bye: " + e.what());
    }
    bool done;
    {
        std::unique_lock<std::mutex> lk(mu_);
        done = cv_.wait_for(lk, std::chrono::duration<double>(kCloseWait), [&] { return rxDone_; });
    }
    if (!done) {
        // The receiver keeps the link (and so the descriptor) alive until its
        // read returns, which happens when the server dies or is aborted.
        WCFS_LOG(Warning, logPfx() + "close: server did not close its side within " +
                              std::to_string(int(kCloseWait)) + "s after bye; leaving it behind");
        if (rx_.joinable() && rx_.get_id() != std::this_thread::get_id()) rx_.detach();
        return;
    }
    if (rx_.joinable() && rx_.get_id() != std::this_thread::get_id()) rx_.join();
    std::lock_guard<std::mutex> lk(txMu_);
    int err = fd_.close();      // released even on error (e.g. ENOTCONN: server gone)
    if (err != 0) WCFS_LOG(Debug, logPfx() + "close: " + errnoStr(err));
}

// --- test hooks ----------------------------------------------------------------------

std::vector<std::string> WatchLink::control_msgs() {
    std::lock_guard<std::mutex> lk(mu_);
    return control_;
}

bool WatchLink::wait_server_closed(double timeout_s) {
    std::unique_lock<std::mutex> lk(mu_);
    return cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), [&] { return rxDone_; });
}

void WatchLink::write_raw(const std::string& data) {
    if (detached()) throw LinkDown(pfx() + "write: link is down (forked)");
    writeLine(data);
}

}  // namespace wcfs
