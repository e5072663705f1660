// sync.cpp -- see sync.h.
#include "sync.h"

namespace wcfs {

void RWMutex::lock() {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [this] { return !writer_ && readers_ == 0; });
    writer_ = true;
}

bool RWMutex::try_lock() {
    std::lock_guard<std::mutex> lk(mu_);
    if (writer_ || readers_ != 0) return false;
    writer_ = true;
    return true;
}

void RWMutex::unlock() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        writer_ = false;
    }
    cv_.notify_all();
}

void RWMutex::lock_shared() {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [this] { return !writer_; });
    ++readers_;
}

bool RWMutex::try_lock_shared() {
    std::lock_guard<std::mutex> lk(mu_);
    if (writer_) return false;
    ++readers_;
    return true;
}

void RWMutex::unlock_shared() {
    bool last;
    {
        std::lock_guard<std::mutex> lk(mu_);
        last = --readers_ == 0;
    }
    if (last) cv_.notify_all();
}

void RWMutex::unlock_and_lock_shared() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        writer_ = false;
        readers_ = 1;
    }
    cv_.notify_all();   // other readers may enter now
}

}  // namespace wcfs
