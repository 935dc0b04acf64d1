// A lock-free single-producer / single-consumer ring (after rigtorp's SPSCQueue and folly's
// ProducerConsumerQueue).
//
// Contract: exactly one thread calls the producer methods (try_push*, wake_consumer) and
// exactly one thread calls the consumer methods (front, try_pop, pop_many, pop_wait) at any
// time; statistics() and size() may be called from anywhere. A full ring is reported to the
// producer (try_push returns false and counts a rejection); nothing is ever overwritten.
//
// Indices are free-running 64-bit counters (they never wrap in practice), so size is
// write - read and "elements ever pushed" is the write index itself.
//
// A producer that knows when its next push will come (the pacer knows each deadline) can
// announce it: a blocked consumer is woken at once and spins for that push, so the hand-over
// costs a cache-line transfer instead of a futex wake-up, which on a busy machine comes tens to
// hundreds of microseconds late even for a real-time thread (docs/embedding.md).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "clock.hpp"
#include "futex.hpp"

namespace pydisco {

inline constexpr std::size_t kCacheLine = 64;

struct RingStatistics {
  std::size_t capacity = 0;
  std::size_t size = 0;         // elements in the ring now
  std::uint64_t pushed = 0;     // elements ever accepted
  std::uint64_t popped = 0;     // elements ever taken out
  std::uint64_t rejected = 0;   // pushes refused because the ring was full
  std::size_t high_water = 0;   // largest size seen right after a push
};

template <typename T>
class SpscRing {
  static_assert(std::is_nothrow_copy_assignable_v<T> || std::is_nothrow_move_assignable_v<T>,
                "ring elements must be assignable without throwing");

 public:
  // `capacity` is rounded up to a power of two (at least 2).
  explicit SpscRing(std::size_t capacity)
      : capacity_(round_up_pow2(capacity)), mask_(capacity_ - 1),
        slots_(std::make_unique<T[]>(capacity_)) {}

  SpscRing(const SpscRing&) = delete;
  SpscRing& operator=(const SpscRing&) = delete;

  std::size_t capacity() const noexcept { return capacity_; }

  // ---- producer side ----

  [[nodiscard]] bool try_push(const T& value) noexcept {
    const std::uint64_t w = write_.load(std::memory_order_relaxed);
    if (w - read_cache_ == capacity_) {
      read_cache_ = read_.load(std::memory_order_acquire);
      if (w - read_cache_ == capacity_) {
        rejected_.store(rejected_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
        return false;
      }
    }
    slots_[w & mask_] = value;
    write_.store(w + 1, std::memory_order_release);
    note_size(w + 1);
    return true;
  }

  // try_push, then wakes a consumer blocked in pop_wait / wait_nonempty. The fence makes the
  // pair (publish, check waiter) race-free against the consumer's (announce, re-check).
  [[nodiscard]] bool try_push_notify(const T& value) noexcept {
    if (!try_push(value)) return false;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (consumer_waiting_.load(std::memory_order_relaxed) != 0) ring_doorbell();
    return true;
  }

  // Says that the next push is expected at `at_ns` (CLOCK_MONOTONIC) and wakes a blocked
  // consumer now, so it is running when the push lands (see the file comment).
  void announce_push(std::int64_t at_ns) noexcept {
    announced_ns_.store(at_ns, std::memory_order_relaxed);
    announced_index_.store(write_.load(std::memory_order_relaxed), std::memory_order_release);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (consumer_waiting_.load(std::memory_order_relaxed) != 0) ring_doorbell();
  }

  // Wakes a blocked consumer whether or not anything was pushed (used to deliver a stop):
  // its wait returns, empty-handed if nothing is there.
  void wake_consumer() noexcept {
    wake_calls_.fetch_add(1, std::memory_order_release);
    ring_doorbell();
  }

  // ---- consumer side ----

  // The oldest element, or nullptr when empty. Valid until the next pop.
  T* front() noexcept {
    const std::uint64_t r = read_.load(std::memory_order_relaxed);
    if (r == write_cache_) {
      write_cache_ = write_.load(std::memory_order_acquire);
      if (r == write_cache_) return nullptr;
    }
    return &slots_[r & mask_];
  }

  // Drops the element front() returned. Precondition: front() != nullptr.
  void pop_front() noexcept {
    read_.store(read_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  }

  [[nodiscard]] bool try_pop(T& out) noexcept {
    T* head = front();
    if (head == nullptr) return false;
    out = std::move(*head);
    pop_front();
    return true;
  }

  // Takes up to `max` elements, passing each to `sink` in order; one index update for all.
  template <typename Sink>
  std::size_t pop_many(std::size_t max, Sink&& sink) {
    const std::uint64_t r = read_.load(std::memory_order_relaxed);
    if (write_cache_ - r < max) write_cache_ = write_.load(std::memory_order_acquire);
    std::uint64_t available = write_cache_ - r;
    const std::size_t n = available < max ? static_cast<std::size_t>(available) : max;
    for (std::size_t i = 0; i < n; ++i) sink(slots_[(r + i) & mask_]);
    if (n != 0) read_.store(r + n, std::memory_order_release);
    return n;
  }

  // When the next element to read was announced (announce_push) and is not here yet: the time
  // it is expected, else -1.
  std::int64_t announced_next_ns() noexcept {
    const std::uint64_t index = announced_index_.load(std::memory_order_acquire);
    if (index != read_.load(std::memory_order_relaxed) || front() != nullptr) return -1;
    return announced_ns_.load(std::memory_order_relaxed);
  }

  // Spins (no syscall) while the next element is announced and not here, until it lands, the
  // announced time plus kAnnouncedSlackNs passes, `deadline_ns` passes (< 0: none) or
  // wake_consumer() is called. Returns whether the ring is non-empty.
  bool spin_for_announced(std::int64_t deadline_ns) noexcept {
    return spin_for_announced(deadline_ns, wake_calls_.load(std::memory_order_acquire));
  }

  // The count of wake_consumer() calls so far. A consumer that checks a stop flag of its own
  // takes this before the check and waits with it: a wake_consumer() after the ticket ends
  // the wait, even one that came before the wait began (else a stop between the check and
  // the wait would be missed, and the wait would never end).
  std::uint32_t wake_ticket() const noexcept { return wake_calls_.load(std::memory_order_acquire); }

  // Blocks until the ring is non-empty, the deadline passes (deadline_ns < 0: no deadline) or
  // wake_consumer() is called (after `ticket`; by default, after this call began). Returns
  // whether the ring is non-empty. An announced push is waited for spinning
  // (spin_for_announced), not sleeping.
  bool wait_nonempty(std::int64_t deadline_ns) noexcept { return wait_nonempty(deadline_ns, wake_ticket()); }
  bool wait_nonempty(std::int64_t deadline_ns, std::uint32_t ticket) noexcept {
    for (;;) {
      if (front() != nullptr) return true;
      if (announcement_pending() && spin_for_announced(deadline_ns, ticket)) return true;
      // The bell before the wake-up check (and off the path above, which takes a token): a
      // wake_consumer() after this has changed it, so the futex below returns at once.
      const std::uint32_t bell = doorbell_.load(std::memory_order_acquire);
      if (wake_calls_.load(std::memory_order_acquire) != ticket) return false;
      if (deadline_ns >= 0 && now_ns() >= deadline_ns) return false;
      consumer_waiting_.store(1, std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      // Re-check after announcing the wait: a push or an announcement in between rang no bell.
      if (front() != nullptr || announcement_pending()) {
        consumer_waiting_.store(0, std::memory_order_relaxed);
        continue;
      }
      futex_wait_until(doorbell_, bell, deadline_ns);
      consumer_waiting_.store(0, std::memory_order_relaxed);
      // Woken by a push, an announcement, wake_consumer() or the deadline; or spuriously.
      // The loop tells them apart.
    }
  }

  // Blocking pop for a C++ control loop: false on timeout or wake-up with nothing to take.
  [[nodiscard]] bool pop_wait(T& out, std::int64_t deadline_ns) noexcept {
    return wait_nonempty(deadline_ns) && try_pop(out);
  }
  [[nodiscard]] bool pop_wait(T& out, std::int64_t deadline_ns, std::uint32_t ticket) noexcept {
    return wait_nonempty(deadline_ns, ticket) && try_pop(out);
  }

  // ---- anyone ----

  std::size_t size() const noexcept {
    const std::uint64_t r = read_.load(std::memory_order_acquire);
    const std::uint64_t w = write_.load(std::memory_order_acquire);
    return static_cast<std::size_t>(w - r);
  }

  bool empty() const noexcept { return size() == 0; }

  std::uint64_t pushed() const noexcept { return write_.load(std::memory_order_acquire); }
  std::uint64_t popped() const noexcept { return read_.load(std::memory_order_acquire); }

  RingStatistics statistics() const noexcept {
    RingStatistics s;
    s.capacity = capacity_;
    s.popped = read_.load(std::memory_order_acquire);
    s.pushed = write_.load(std::memory_order_acquire);
    s.size = static_cast<std::size_t>(s.pushed - s.popped);
    s.rejected = rejected_.load(std::memory_order_relaxed);
    s.high_water = high_water_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  // The next element is announced, not here, and not yet overdue by more than the slack.
  bool announcement_pending() noexcept {
    const std::int64_t at = announced_next_ns();
    return at >= 0 && now_ns() < at + kAnnouncedSlackNs;
  }

  bool spin_for_announced(std::int64_t deadline_ns, std::uint32_t wakes) noexcept {
    const std::int64_t at = announced_next_ns();
    if (at < 0) return front() != nullptr;
    std::int64_t until = at + kAnnouncedSlackNs;
    if (deadline_ns >= 0 && deadline_ns < until) until = deadline_ns;
    return spin_until([&] { return front() != nullptr; },
                      [&] { return wake_calls_.load(std::memory_order_acquire) != wakes; }, until);
  }

  void ring_doorbell() noexcept {
    doorbell_.fetch_add(1, std::memory_order_release);
    futex_wake_all(doorbell_);
  }

  static std::size_t round_up_pow2(std::size_t n) {
    if (n > (std::size_t{1} << 40)) throw std::length_error("ring capacity too large");
    std::size_t c = 2;
    while (c < n) c <<= 1;
    return c;
  }

  // Exact high-water mark: one relaxed load of the consumer's index per push. The consumer
  // writes that index once per pop_many batch, so the line rarely moves.
  void note_size(std::uint64_t w) noexcept {
    const auto size = static_cast<std::size_t>(w - read_.load(std::memory_order_relaxed));
    if (size > high_water_.load(std::memory_order_relaxed))
      high_water_.store(size, std::memory_order_relaxed);
  }

  const std::size_t capacity_;
  const std::uint64_t mask_;
  std::unique_ptr<T[]> slots_;

  // Producer's line: its index, its cached view of the consumer's, its counters.
  alignas(kCacheLine) std::atomic<std::uint64_t> write_{0};
  std::uint64_t read_cache_ = 0;
  std::atomic<std::uint64_t> rejected_{0};
  std::atomic<std::size_t> high_water_{0};

  // Consumer's line.
  alignas(kCacheLine) std::atomic<std::uint64_t> read_{0};
  std::uint64_t write_cache_ = 0;
  std::atomic<std::uint32_t> consumer_waiting_{0};

  alignas(kCacheLine) std::atomic<std::uint32_t> doorbell_{0};
  std::atomic<std::uint32_t> wake_calls_{0};  // wake_consumer() calls: ends a wait empty-handed
  // The producer's announcement of its next push: the write index it will fill, and when.
  // Before any announcement the index is ~0, which no read index reaches.
  std::atomic<std::uint64_t> announced_index_{~std::uint64_t{0}};
  std::atomic<std::int64_t> announced_ns_{0};
  char pad_[kCacheLine - 3 * sizeof(std::uint64_t)] = {};  // the doorbell's line alone
};

}  // namespace pydisco
