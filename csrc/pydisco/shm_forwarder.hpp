// Delivers one answer into a shared-memory ring: the answer's pacer is redirected
// (Pacer::redirect) so that its own driver thread pushes each release into a ShmRingProducer,
// up to and including the end record. This is the runtime's side of a control loop in another
// process (shm_ring.hpp). No thread of its own: the token goes from the pacer's release
// straight to the other process, one hop, so a release costs one real-time thread (the
// pacer's), not two. The pacer's hand-off announcement is passed on to the shm ring, so the
// other process is awake and spinning when the token lands.
//
// Nothing is dropped silently. A full shm ring (the consumer is slow or not there) leaves the
// released tokens in the pacer's output ring, in order, and the pacer offers them again every
// 100 µs. stop() before the end (the answer was abandoned) ends the answer in the shm ring
// with FinishReason::kCancelled; records the pacer releases after that are dropped and counted
// in stranded(). An end record that does not fit is owed (ShmRingProducer::owe_end) and goes
// out before the next answer's first token.
//
// Read accounting: read() is how many of this answer's tokens the other process has taken
// (the shm ring's read index past this answer's first record), so the runtime counts what the
// control loop read, not what was handed to the ring.
#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <utility>

#include "clock.hpp"
#include "pacer.hpp"
#include "shm_ring.hpp"
#include "token.hpp"

namespace pydisco {

namespace shm_detail {

// The pacer's sink: called on the pacer's driver thread (take, announce) and, once, by the
// forwarder's owner (abandon). The mutex makes abandon exclusive with a take in progress, so
// after abandon returns this sink never touches the shm ring again; uncontended (one lock
// per token, no syscall) except at that one moment.
class ShmAnswerSink final : public ReleaseSink {
 public:
  explicit ShmAnswerSink(std::shared_ptr<ShmRingProducer> shm) : shm_(std::move(shm)) {
    event_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (event_fd_ < 0) throw std::system_error(errno, std::generic_category(), "eventfd");
  }
  ShmAnswerSink(const ShmAnswerSink&) = delete;
  ShmAnswerSink& operator=(const ShmAnswerSink&) = delete;
  ~ShmAnswerSink() override { ::close(event_fd_); }

  bool take(const TokenRecord& record) noexcept override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (finished_.load(std::memory_order_relaxed)) {  // after the end, or abandoned
      if (!record.is_end()) stranded_.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    if (!shm_->try_push(record)) return false;
    if (first_index_.load(std::memory_order_relaxed) == kNoIndex)
      first_index_.store(shm_->statistics().pushed - 1, std::memory_order_release);
    if (record.is_end()) {
      mark_finished();
    } else {
      next_position_ = record.position + 1;
      forwarded_.fetch_add(1, std::memory_order_release);
    }
    return true;
  }

  void announce(std::int64_t at_ns) noexcept override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!finished_.load(std::memory_order_relaxed)) shm_->announce_push(at_ns);
  }

  // Ends an unfinished answer in the shm ring (cancelled), or owes that end when it has no
  // room. Idempotent.
  void abandon() noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    if (finished_.load(std::memory_order_relaxed)) return;
    const TokenRecord end =
        TokenRecord::end_of_answer(next_position_, FinishReason::kCancelled, 0, now_ns());
    if (!shm_->try_push(end)) shm_->owe_end(end);
    mark_finished();
  }

  bool finished() const noexcept { return finished_.load(std::memory_order_acquire); }
  std::uint64_t forwarded() const noexcept { return forwarded_.load(std::memory_order_acquire); }
  std::uint64_t stranded() const noexcept { return stranded_.load(std::memory_order_relaxed); }
  int event_fd() const noexcept { return event_fd_; }

  std::uint64_t read() const noexcept {
    const std::uint64_t first = first_index_.load(std::memory_order_acquire);
    if (first == kNoIndex) return 0;
    const std::uint64_t tokens = forwarded();
    const std::uint64_t popped = shm_->statistics().popped;
    return popped > first ? std::min(popped - first, tokens) : 0;
  }

 private:
  void mark_finished() noexcept {
    finished_.store(true, std::memory_order_release);
    const std::uint64_t one = 1;
    [[maybe_unused]] const ssize_t rc = ::write(event_fd_, &one, sizeof one);
  }

  static constexpr std::uint64_t kNoIndex = ~std::uint64_t{0};

  std::shared_ptr<ShmRingProducer> shm_;
  int event_fd_ = -1;
  std::mutex mutex_;
  std::atomic<bool> finished_{false};
  std::atomic<std::uint64_t> forwarded_{0};
  std::atomic<std::uint64_t> stranded_{0};
  std::atomic<std::uint64_t> first_index_{kNoIndex};  // the shm index of this answer's first record
  std::uint64_t next_position_ = 0;                   // guarded by mutex_
};

}  // namespace shm_detail

class ShmForwarder {
 public:
  // Redirects `pacer` (see Pacer::redirect: nobody else may read its output ring from now
  // on) into `shm`. One forwarder writes to a producer at a time: a second one is refused
  // with std::logic_error. The pacer holds the sink for as long as it may call it, so the
  // forwarder needs no hold on the pacer.
  ShmForwarder(const std::shared_ptr<Pacer>& pacer, std::shared_ptr<ShmRingProducer> shm)
      : shm_(std::move(shm)) {
    if (!pacer || !shm_) throw std::invalid_argument("shm forwarder needs a pacer and a producer");
    if (!shm_->claim_writer())
      throw std::logic_error("shm ring '" + shm_->name() + "' already has a writer");
    try {
      sink_ = std::make_shared<shm_detail::ShmAnswerSink>(shm_);
      pacer->redirect(sink_);
    } catch (...) {
      shm_->release_writer();
      throw;
    }
  }

  ShmForwarder(const ShmForwarder&) = delete;
  ShmForwarder& operator=(const ShmForwarder&) = delete;
  ~ShmForwarder() { stop(); }

  // Ends forwarding: an unfinished answer is ended in the shm ring as cancelled (see the file
  // comment). Returns at once; the pacer then drops what it releases for this answer, and
  // the producer is free for the next answer's forwarder. Idempotent.
  void stop() {
    if (stopped_) return;
    stopped_ = true;
    sink_->abandon();
    shm_->release_writer();
  }

  // Whether the end record is in the shm ring (or owed to it).
  bool finished() const noexcept { return sink_->finished(); }
  // Tokens pushed into the shm ring (end records not counted).
  std::uint64_t forwarded() const noexcept { return sink_->forwarded(); }
  // Of those, how many the other process has read.
  std::uint64_t read() const noexcept { return sink_->read(); }
  // Tokens released after stop() (or after the end), dropped: the answer was abandoned.
  std::uint64_t stranded() const noexcept { return sink_->stranded(); }
  // Readable (an eventfd) once finished: for an event loop to await.
  int event_fd() const noexcept { return sink_->event_fd(); }

 private:
  std::shared_ptr<ShmRingProducer> shm_;
  std::shared_ptr<shm_detail::ShmAnswerSink> sink_;
  bool stopped_ = false;
};

}  // namespace pydisco
