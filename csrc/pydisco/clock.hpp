// The one clock of the native core: CLOCK_MONOTONIC in nanoseconds.
//
// Python's time.monotonic_ns() and time.perf_counter_ns() read the same clock on Linux, so
// timestamps stamped here and in Python compare directly. Trio's SystemClock is
// perf_counter() plus a per-run offset: convert with pydisco's clock helpers, never mix raw.
#pragma once

#include <cstdint>
#include <ctime>

namespace pydisco {

inline std::int64_t now_ns() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

inline timespec to_timespec(std::int64_t ns) noexcept {
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
  ts.tv_nsec = static_cast<long>(ns % 1'000'000'000);
  return ts;
}

// Pause hint for spin loops: lets the sibling hyperthread run and saves power.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Spins until ready() (true), or until `until_ns` passes or interrupted() (false): the
// consumer's side of an announced hand-over (SpscRing::announce_push, ShmRingView's).
template <typename Ready, typename Interrupted>
bool spin_until(Ready&& ready, Interrupted&& interrupted, std::int64_t until_ns) noexcept {
  while (!ready()) {
    if (now_ns() >= until_ns || interrupted()) return false;
    cpu_relax();
  }
  return true;
}

// How long past an announced time a consumer spins for the push before it sleeps again (the
// producer was held up, or the rate changed).
inline constexpr std::int64_t kAnnouncedSlackNs = 200'000;

}  // namespace pydisco
