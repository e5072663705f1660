// wlink.h -- WatchLink: the client end of one head/watch channel (WCFS.md §2, §4.2).
//
// What it guarantees.
//   * Framing of WCFS.md §2.2: the client's requests go on odd stream ids
//     1, 3, 5, ...; server requests (even ids) are queued for recv_req and
//     remembered as "accepted, not yet replied" until reply_req; stream 0
//     (the server's last words) is logged and recorded.
//   * Bounded input: a line longer than kMaxLine without LF, a malformed
//     frame, a reply on a stream with no outstanding request or a server
//     request on an id already outstanding takes the link down.
//   * send_req returns the reply to exactly its request (replies may arrive in
//     any order); when the link goes down every waiter fails with
//     "... recvReply: link is down (<why>)".
//   * recv_req returns the next server request, nothing at a clean EOF (the
//     server closed its side), or fails with "link is down" after an error.
//   * close_write sends `bye` once; close() sends it (ignoring errors), waits
//     (bounded, kCloseWait) for the server to close its side and closes the
//     descriptor.  If the server never answers, the receiver is left to
//     finish on its own and owns the descriptor until then: close never hangs
//     and never closes a descriptor another thread still reads.
//   * After fork the child only closes the descriptor (sys.h fork registry);
//     every method of a link inherited from the parent then fails with
//     "link is down (forked)" or does nothing.  It never writes to the
//     server from the child.
//
// Concurrency model.  One receiver thread per link reads the descriptor (the
// server opens head/watch with FOPEN_STREAM, so its blocking read does not
// serialise our concurrent writes).  Any thread may send; whole lines are
// written under `txMu_` so that they never interleave.  The receiver thread
// holds a reference to the link until it ends, so a link stays valid while
// its descriptor may still be read.
//
// Locks (never held together; no other lock is taken under them):
//   mu_    -- protects the link state: down_/why, waiting_, rxq_, accepted_,
//             control_, nextReqId_, byeSent_, closed_, rxDone_.
//   txMu_  -- serialises writes to fd_ and its closing.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "sys.h"
#include "wire.h"

namespace wcfs {

// LinkDown is thrown when an operation fails because the link is down
// (closed, server gone, protocol error, or inherited through fork).
class LinkDown : public Error {
public:
    using Error::Error;
};

class WatchLink : public std::enable_shared_from_this<WatchLink>, public ForkBound {
public:
    // How long close() waits for the server to close its side after `bye`.
    static constexpr double kCloseWait = 10.0;

    // open opens <mountpoint>/head/watch read-write and starts the receiver.
    static std::shared_ptr<WatchLink> open(const std::string& mountpoint);
    ~WatchLink();

    WatchLink(const WatchLink&) = delete;
    WatchLink& operator=(const WatchLink&) = delete;

    int fd() const { return fdnum_; }
    const std::string& mountpoint() const { return mnt_; }

    // send_req sends "<id> <req>" on a fresh odd stream and waits for the reply
    // payload.  req must not contain LF (std::invalid_argument).
    std::string send_req(const std::string& req);

    // recv_req waits for the next server request; nullopt at a clean EOF.
    // A request that does not parse is returned with .err set: it must still
    // be answered.
    std::optional<PinReq> recv_req();

    // reply_req answers an accepted server request (std::logic_error if the
    // request was not accepted or was already answered).
    void reply_req(const PinReq& req, const std::string& reply);

    // close_write sends `bye` (once).
    void close_write();

    // close: close_write (errors ignored; skipped with bye=false), wait for
    // the server to close its side, close the descriptor.  Idempotent.
    // bye=false is for a client that failed: without `bye` the server treats
    // the close as abrupt and deals with the client's outstanding pins.
    void close(bool bye = true);

    // --- test hooks (WCFS.md §4.1) ---
    std::vector<std::string> control_msgs();         // stream-0 payloads received
    bool wait_server_closed(double timeout_s);       // the receiver saw EOF / an error
    void write_raw(const std::string& data);         // bytes to the link, unframed

private:
    struct Waiter {
        bool done = false;
        std::string reply;
    };

    WatchLink(std::string mnt, AutoFd fd);
    void recvLoop();
    // dispatch handles one received line; returns a protocol-error text or "".
    std::string dispatch(const std::string& line, int64_t rxNs);
    void markDown(const std::string& why, bool eof);
    void writeLine(const std::string& line);
    // Errors carry "wlink<fd>: " (callers such as Conn add "wcfs <mnt>: ...");
    // log lines stand alone and carry the mountpoint too.
    std::string pfx() const { return "wlink" + std::to_string(fdnum_) + ": "; }
    std::string logPfx() const { return "wcfs " + mnt_ + ": " + pfx(); }

    const std::string mnt_;
    const int fdnum_;

    std::mutex txMu_;
    AutoFd fd_;                                   // writes and close under txMu_; read by the receiver

    std::mutex mu_;
    std::condition_variable cv_;                  // any change of the state below
    bool down_ = false;                           // the receiver ended
    bool eof_ = false;                            // ... because the server closed its side
    std::string why_;                             // why the link is down
    uint64_t nextReqId_ = 1;
    std::map<uint64_t, std::shared_ptr<Waiter>> waiting_;   // our outstanding requests
    std::deque<PinReq> rxq_;                      // server requests not yet taken
    std::set<uint64_t> accepted_;                 // server requests not yet answered
    std::vector<std::string> control_;            // stream-0 payloads
    bool byeSent_ = false;
    bool closed_ = false;
    bool rxDone_ = false;

    std::thread rx_;                              // the receiver
};

}  // namespace wcfs
