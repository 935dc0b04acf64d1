// Delivers one answer into a shared-memory ring: a thread blocked in pop_wait on the answer's
// released ring (the pacer's output, in this process) pushes each record into a
// ShmRingProducer, up to and including the end record, then ends. This is the runtime's side
// of a control loop in another process (shm_ring.hpp).
//
// Nothing is dropped silently. A full shm ring (the consumer is slow or not there) makes the
// forwarder wait — polling for room every 100 µs — and the pacer behind it then holds tokens
// back as it does for any slow reader. stop() before the end (the answer was abandoned)
// forwards what is in the released ring and has room, then the end record; when no end record
// came, one with FinishReason::kCancelled, so every answer in the shm ring is ended. An end
// record that does not fit is owed (ShmRingProducer::owe_end) and goes out before the next
// answer's first token; records that do not fit are counted in stranded().
#pragma once

#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <utility>

#include "clock.hpp"
#include "futex.hpp"
#include "shm_ring.hpp"
#include "token.hpp"

namespace pydisco {

class ShmForwarder {
 public:
  // `realtime_priority` > 0 asks SCHED_FIFO at that priority for the thread (keep it below the
  // pacer's 50); refused silently (realtime() says which it got). One forwarder writes to a
  // producer at a time: a second one is refused with std::logic_error.
  ShmForwarder(std::shared_ptr<TokenRing> released, std::shared_ptr<ShmRingProducer> shm,
               int realtime_priority = 0)
      : released_(std::move(released)), shm_(std::move(shm)) {
    if (!released_ || !shm_) throw std::invalid_argument("shm forwarder needs a ring and a producer");
    if (!shm_->claim_writer())
      throw std::logic_error("shm ring '" + shm_->name() + "' already has a writer");
    event_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (event_fd_ < 0) {
      shm_->release_writer();
      throw std::system_error(errno, std::generic_category(), "eventfd");
    }
    thread_ = std::thread([this, realtime_priority] { run(realtime_priority); });
  }

  ShmForwarder(const ShmForwarder&) = delete;
  ShmForwarder& operator=(const ShmForwarder&) = delete;

  ~ShmForwarder() {
    stop();
    ::close(event_fd_);
  }

  // Ends forwarding (see the file comment for what happens to an unfinished answer). Returns
  // once the thread has ended; the released ring's consumer is then free again.
  void stop() {
    if (!thread_.joinable()) return;
    stop_word_.store(1, std::memory_order_release);
    futex_wake_all(stop_word_);
    released_->wake_consumer();
    thread_.join();
    if (!finished()) finish_abandoned();
    shm_->release_writer();
  }

  // Whether the end record is in the shm ring (or owed to it).
  bool finished() const noexcept { return finished_.load(std::memory_order_acquire); }
  // Tokens pushed into the shm ring (end records not counted).
  std::uint64_t forwarded() const noexcept { return forwarded_.load(std::memory_order_acquire); }
  // Tokens left behind by stop() because the shm ring had no room.
  std::uint64_t stranded() const noexcept { return stranded_; }
  bool realtime() const noexcept { return realtime_.load(std::memory_order_acquire); }
  // Readable (an eventfd) once finished: for an event loop to await.
  int event_fd() const noexcept { return event_fd_; }

 private:
  void run(int realtime_priority) {
    if (realtime_priority > 0) {
      sched_param p{};
      p.sched_priority = realtime_priority;
      realtime_.store(::pthread_setschedparam(::pthread_self(), SCHED_FIFO, &p) == 0,
                      std::memory_order_release);
    }
    TokenRecord record;
    bool holding = false;
    while (stop_word_.load(std::memory_order_acquire) == 0) {
      if (!holding) {
        if (!released_->wait_nonempty_or_announced(-1)) {
          // The pacer announced the next release: pass it on, so the other process is awake
          // for it too, then spin for it here. Else woken: look at stop again.
          const std::int64_t at = released_->announced_next_ns();
          if (at < 0) continue;
          shm_->announce_push(at);
          if (!released_->wait_nonempty(-1)) continue;
        }
        if (!released_->try_pop(record)) continue;
        holding = true;
      }
      if (!shm_->try_push(record)) {  // full: the consumer is behind; wait for room
        futex_wait_until(stop_word_, 0, now_ns() + kFullRetryNs);
        continue;
      }
      holding = false;
      if (record.is_end()) {
        mark_finished();
        return;
      }
      next_position_ = record.position + 1;
      forwarded_.fetch_add(1, std::memory_order_release);
    }
    if (holding) held_ = record;
  }

  // After the thread ended without the end record: this thread is now the released ring's
  // consumer. Forward what is there, then make sure an end record follows.
  void finish_abandoned() {
    TokenRecord record;
    bool have = false;
    if (held_) {
      record = *held_;
      have = true;
    } else {
      have = released_->try_pop(record);
    }
    while (have) {
      if (!shm_->try_push(record)) break;
      if (record.is_end()) {
        mark_finished();
        return;
      }
      next_position_ = record.position + 1;
      forwarded_.fetch_add(1, std::memory_order_release);
      have = released_->try_pop(record);
    }
    TokenRecord end = TokenRecord::end_of_answer(next_position_, FinishReason::kCancelled, 0, now_ns());
    if (have) {
      if (record.is_end()) end = record;  // the real end did not fit: owe that one
      stranded_ = (record.is_end() ? 0 : 1) + count_rest();
    }
    if (!shm_->try_push(end)) shm_->owe_end(end);
    mark_finished();
  }

  std::uint64_t count_rest() {
    std::uint64_t n = 0;
    TokenRecord r;
    while (released_->try_pop(r))
      if (!r.is_end()) ++n;
    return n;
  }

  void mark_finished() {
    finished_.store(true, std::memory_order_release);
    const std::uint64_t one = 1;
    [[maybe_unused]] const ssize_t rc = ::write(event_fd_, &one, sizeof one);
  }

  static constexpr std::int64_t kFullRetryNs = 100'000;

  std::shared_ptr<TokenRing> released_;
  std::shared_ptr<ShmRingProducer> shm_;
  int event_fd_ = -1;
  std::atomic<std::uint32_t> stop_word_{0};
  std::atomic<bool> finished_{false};
  std::atomic<bool> realtime_{false};
  std::atomic<std::uint64_t> forwarded_{0};
  std::uint64_t next_position_ = 0;  // the thread's, then stop()'s after join
  std::uint64_t stranded_ = 0;
  std::optional<TokenRecord> held_;
  std::thread thread_;
};

}  // namespace pydisco
