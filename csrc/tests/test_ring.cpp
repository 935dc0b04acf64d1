#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "check.hpp"
#include "pydisco/token.hpp"

using pydisco::SpscRing;
using pydisco::TokenRecord;
using pydisco::TokenRing;

static void capacity_rounds_up_to_power_of_two() {
  CHECK(SpscRing<int>(1).capacity() == 2);
  CHECK(SpscRing<int>(5).capacity() == 8);
  CHECK(SpscRing<int>(8).capacity() == 8);
}

static void full_ring_rejects_and_never_overwrites() {
  SpscRing<int> ring(4);
  for (int i = 0; i < 4; ++i) CHECK(ring.try_push(i));
  CHECK(!ring.try_push(99));
  CHECK(!ring.try_push(100));
  auto s = ring.statistics();
  CHECK(s.size == 4 && s.pushed == 4 && s.rejected == 2 && s.high_water == 4);
  int v = -1;
  for (int i = 0; i < 4; ++i) {
    CHECK(ring.try_pop(v));
    CHECK(v == i);
  }
  CHECK(!ring.try_pop(v));
  CHECK(ring.statistics().popped == 4);
}

static void wraps_around_many_times() {
  SpscRing<std::uint64_t> ring(4);
  std::uint64_t next_out = 0;
  for (std::uint64_t i = 0; i < 1000; ++i) {
    CHECK(ring.try_push(i));
    if (i % 3 == 2) {
      std::size_t n = ring.pop_many(8, [&](std::uint64_t v) { CHECK(v == next_out++); });
      CHECK(n == 3);
    }
  }
  CHECK(ring.statistics().high_water == 3);
}

static void pop_many_respects_max() {
  SpscRing<int> ring(16);
  for (int i = 0; i < 10; ++i) CHECK(ring.try_push(i));
  int seen = 0;
  CHECK(ring.pop_many(4, [&](int v) { CHECK(v == seen++); }) == 4);
  CHECK(ring.pop_many(100, [&](int v) { CHECK(v == seen++); }) == 6);
  CHECK(ring.pop_many(100, [&](int) { CHECK(false); }) == 0);
}

static void token_text_capacity_is_enforced() {
  TokenRecord r;
  CHECK(r.set_text("héllo"));
  CHECK(r.text_view() == "héllo");
  std::string long_text(TokenRecord::kTextCapacity + 1, 'x');
  CHECK(!r.set_text(long_text));
  CHECK(r.text_view() == "héllo");  // unchanged on refusal
}

static void two_threads_deliver_everything_in_order() {
  TokenRing ring(64);
  constexpr std::uint64_t kCount = 300'000;
  std::thread producer([&] {
    TokenRecord r;
    for (std::uint64_t i = 0; i < kCount; ++i) {
      r.position = i;
      r.token_id = static_cast<std::int32_t>(i & 0x7fff);
      // yield: on a loaded two-core machine a pure spin waits out whole time slices
      while (!ring.try_push(r)) std::this_thread::yield();
    }
  });
  std::uint64_t expected = 0;
  while (expected < kCount) {
    const std::size_t n = ring.pop_many(32, [&](const TokenRecord& r) {
      CHECK(r.position == expected);
      CHECK(r.token_id == static_cast<std::int32_t>(expected & 0x7fff));
      ++expected;
    });
    if (n == 0) std::this_thread::yield();
  }
  producer.join();
  auto s = ring.statistics();
  CHECK(s.pushed == kCount && s.popped == kCount && s.size == 0 && s.high_water <= 64);
}

static void blocking_pop_wakes_on_push_and_times_out() {
  TokenRing ring(8);
  TokenRecord out;
  const auto t0 = pydisco::now_ns();
  CHECK(!ring.pop_wait(out, t0 + 20'000'000));  // 20 ms, nothing pushed
  CHECK(pydisco::now_ns() - t0 >= 20'000'000);

  std::thread producer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    TokenRecord r;
    r.position = 7;
    CHECK(ring.try_push_notify(r));
  });
  CHECK(ring.pop_wait(out, -1));  // no deadline: only the push can end this
  CHECK(out.position == 7);
  producer.join();

  std::thread waker([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ring.wake_consumer();
  });
  CHECK(!ring.pop_wait(out, -1));  // woken with nothing to take
  waker.join();
}

// An announced push wakes the consumer before it lands, and the consumer takes it spinning: a
// plain try_push (which rings no doorbell) still reaches it.
static void an_announced_push_reaches_a_spinning_consumer() {
  TokenRing ring(8);
  const auto at = pydisco::now_ns() + 20'000'000;
  std::thread producer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // the consumer is asleep
    ring.announce_push(at);
    // Pushed 10 ms before the announced time, so a slow machine that runs this thread late
    // still pushes within the consumer's spin.
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    TokenRecord r;
    r.position = 3;
    CHECK(ring.try_push(r));  // no doorbell: only a spinning consumer sees it
  });
  TokenRecord out;
  CHECK(ring.pop_wait(out, pydisco::now_ns() + 10'000'000'000));
  CHECK(out.position == 3);
  CHECK(ring.announced_next_ns() < 0);  // taken: nothing announced is pending
  producer.join();
}

// An announcement that is not kept costs a bounded spin, then the consumer sleeps again; a
// wake-up ends the spin at once.
static void an_unkept_announcement_is_given_up() {
  TokenRing ring(8);
  TokenRecord out;
  ring.announce_push(pydisco::now_ns() + 1'000'000);
  CHECK(ring.announced_next_ns() >= 0);
  const auto t0 = pydisco::now_ns();
  CHECK(!ring.pop_wait(out, t0 + 30'000'000));  // spins ~1.2 ms, then sleeps to the deadline
  CHECK(pydisco::now_ns() - t0 >= 30'000'000);

  ring.announce_push(pydisco::now_ns() + 60'000'000'000);  // a minute away
  std::thread waker([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ring.wake_consumer();
  });
  const auto t1 = pydisco::now_ns();
  CHECK(!ring.spin_for_announced(-1));  // ended by the wake-up, not by the minute
  CHECK(pydisco::now_ns() - t1 < 30'000'000'000);
  waker.join();
}

// A consumer with a stop flag of its own takes a ticket, checks the flag, then waits: a
// wake_consumer() between the ticket and the wait still ends the wait (it would sleep forever
// on a wake-up that came before it began).
static void a_wake_after_the_ticket_ends_a_wait_not_yet_begun() {
  TokenRing ring(8);
  TokenRecord out;
  const std::uint32_t ticket = ring.wake_ticket();
  ring.wake_consumer();  // the stopper, before the consumer reached its wait
  CHECK(!ring.wait_nonempty(-1, ticket));
  CHECK(!ring.pop_wait(out, -1, ticket));
  // A ticket taken after the wake-up waits for the next one (or a push).
  std::thread producer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    TokenRecord r;
    r.position = 3;
    CHECK(ring.try_push_notify(r));
  });
  CHECK(ring.pop_wait(out, -1, ring.wake_ticket()) && out.position == 3);
  producer.join();
}

// Wake-ups racing a consumer's check-then-wait, many times over: each one ends its wait.
static void every_wake_up_racing_a_wait_ends_it() {
  TokenRing ring(8);
  for (int round = 0; round < 2000; ++round) {
    std::atomic<bool> stop{false};
    std::thread consumer([&] {
      TokenRecord out;
      for (;;) {
        const std::uint32_t ticket = ring.wake_ticket();
        if (stop.load(std::memory_order_acquire)) return;
        (void)ring.pop_wait(out, -1, ticket);
      }
    });
    if (round % 2 == 0) std::this_thread::yield();
    stop.store(true, std::memory_order_release);
    ring.wake_consumer();
    consumer.join();  // hangs if a wake-up is lost
  }
}

int main() {
  capacity_rounds_up_to_power_of_two();
  full_ring_rejects_and_never_overwrites();
  wraps_around_many_times();
  pop_many_respects_max();
  token_text_capacity_is_enforced();
  two_threads_deliver_everything_in_order();
  blocking_pop_wakes_on_push_and_times_out();
  an_announced_push_reaches_a_spinning_consumer();
  an_unkept_announcement_is_given_up();
  a_wake_after_the_ticket_ends_a_wait_not_yet_begun();
  every_wake_up_racing_a_wait_ends_it();
  return 0;
}
