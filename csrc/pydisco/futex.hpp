// Minimal futex wrappers: sleep until a 32-bit word changes or an absolute CLOCK_MONOTONIC
// deadline passes. Used for the ring's blocking pop and the pacer's interruptible sleep,
// where a condition variable would need a mutex on the producer's hot path, and (shared) for
// the doorbell of a ring in shared memory.
#pragma once

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <ctime>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "clock.hpp"

namespace pydisco {

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t),
              "futex needs a plain 32-bit atomic");

// Who may wait on a word: threads of this process (the kernel then keys the futex by address,
// faster), or processes sharing the mapping, possibly at different addresses.
enum class FutexScope { process, shared };

constexpr int futex_op(int op, FutexScope scope) noexcept {
  return scope == FutexScope::process ? (op | FUTEX_PRIVATE_FLAG) : op;
}

// Sleeps while *word == expected, until woken or (deadline_ns >= 0) the deadline passes.
// Returns false on timeout. Spurious returns are possible: callers re-check their condition.
inline bool futex_wait_until(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                             std::int64_t deadline_ns,
                             FutexScope scope = FutexScope::process) noexcept {
  timespec ts{};
  timespec* timeout = nullptr;
  if (deadline_ns >= 0) {
    ts = to_timespec(deadline_ns);
    timeout = &ts;
  }
  // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline, so EINTR retries
  // cannot stretch the sleep.
  const long rc = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word),
                            futex_op(FUTEX_WAIT_BITSET, scope), expected, timeout, nullptr,
                            FUTEX_BITSET_MATCH_ANY);
  return !(rc == -1 && errno == ETIMEDOUT);
}

inline void futex_wake_all(std::atomic<std::uint32_t>& word,
                           FutexScope scope = FutexScope::process) noexcept {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), futex_op(FUTEX_WAKE, scope),
            INT_MAX, nullptr, nullptr, 0);
}

}  // namespace pydisco
