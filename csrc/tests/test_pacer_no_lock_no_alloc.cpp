// The pacer's real-time thread takes no lock and allocates nothing per token: while a running
// pacer releases an answer into a ring the main thread drains with pop_wait, no operator new
// and no pthread_mutex_lock happens anywhere in the process.
//
// This binary replaces the global operator new and interposes pthread_mutex_lock (forwarding
// to libc's through dlsym), so it is built only without sanitizers, whose runtimes own both.
#include <dlfcn.h>
#include <pthread.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "check.hpp"
#include "pydisco/pacer.hpp"

using namespace pydisco;

namespace {

std::atomic<std::uint64_t> g_allocations{0};
std::atomic<std::uint64_t> g_mutex_locks{0};

using LockFn = int (*)(pthread_mutex_t*);
std::atomic<LockFn> g_real_lock{nullptr};  // constant-initialised: usable before main

void* counted_alloc(std::size_t size, std::size_t alignment) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (size == 0) size = 1;
  void* p = alignment <= alignof(std::max_align_t)
                ? std::malloc(size)
                : std::aligned_alloc(alignment, (size + alignment - 1) / alignment * alignment);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

}  // namespace

void* operator new(std::size_t size) { return counted_alloc(size, 0); }
void* operator new[](std::size_t size) { return counted_alloc(size, 0); }
void* operator new(std::size_t size, std::align_val_t al) {
  return counted_alloc(size, static_cast<std::size_t>(al));
}
void* operator new[](std::size_t size, std::align_val_t al) {
  return counted_alloc(size, static_cast<std::size_t>(al));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

extern "C" int pthread_mutex_lock(pthread_mutex_t* mutex) {
  LockFn real = g_real_lock.load(std::memory_order_acquire);
  if (real == nullptr) {
    real = reinterpret_cast<LockFn>(::dlsym(RTLD_NEXT, "pthread_mutex_lock"));
    g_real_lock.store(real, std::memory_order_release);
  }
  g_mutex_locks.fetch_add(1, std::memory_order_relaxed);
  return real(mutex);
}

struct Counts {
  std::uint64_t allocations;
  std::uint64_t mutex_locks;
};

static Counts snapshot() {
  return {g_allocations.load(std::memory_order_relaxed),
          g_mutex_locks.load(std::memory_order_relaxed)};
}

// The counters see what they must, or a zero below would prove nothing.
static void the_counters_count() {
  const Counts before = snapshot();
  auto* boxed = new int(7);
  delete boxed;
  std::mutex mutex;
  { std::lock_guard<std::mutex> lock(mutex); }
  const Counts after = snapshot();
  CHECK(after.allocations == before.allocations + 1);
  CHECK(after.mutex_locks == before.mutex_locks + 1);
}

static void a_running_pacer_releases_without_locks_or_allocations() {
  constexpr std::size_t kWarmup = 16;
  constexpr std::size_t kTokens = 300;  // then an end record
  auto in = std::make_shared<TokenRing>(512);
  auto out = std::make_shared<TokenRing>(512);
  // 100 us apart with 20 us of spin: the thread sleeps on its futex, spins and releases for
  // every token. The release log holds fewer than that, so its full path runs too.
  Pacer pacer(in, out,
              PacerOptions{.interval_ns = 100'000, .spin_ns = 20'000, .log_capacity = 64});
  std::vector<TokenRecord> records(kWarmup + kTokens + 1);
  for (std::size_t i = 0; i < records.size(); ++i) records[i].position = i;
  records.back() = TokenRecord::end_of_answer(kWarmup + kTokens, FinishReason::kStop, 1, 0);

  pacer.start(/*realtime=*/false);
  TokenRecord got;
  for (std::size_t i = 0; i < kWarmup; ++i) {
    records[i].arrived_ns = now_ns();
    CHECK(in->try_push_notify(records[i]));
  }
  for (std::size_t i = 0; i < kWarmup; ++i) CHECK(out->pop_wait(got, now_ns() + 10'000'000'000));

  const Counts before = snapshot();
  for (std::size_t i = kWarmup; i < records.size(); ++i) {
    records[i].arrived_ns = now_ns();
    CHECK(in->try_push_notify(records[i]));
  }
  for (std::size_t i = kWarmup; i < records.size(); ++i) {
    CHECK(out->pop_wait(got, now_ns() + 10'000'000'000));
    CHECK(got.position == i);
  }
  CHECK(got.is_end());
  const Counts after = snapshot();
  pacer.stop();

  CHECK(after.allocations == before.allocations);
  CHECK(after.mutex_locks == before.mutex_locks);
  const PacerStatistics s = pacer.statistics();
  CHECK(s.released == kWarmup + kTokens);
  CHECK(s.lateness_samples_dropped > 0);
}

int main() {
  the_counters_count();
  a_running_pacer_releases_without_locks_or_allocations();
  return 0;
}
