#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "check.hpp"
#include "pydisco/pacer.hpp"

using namespace pydisco;

static TokenRecord token(std::uint64_t pos, std::int64_t arrived) {
  TokenRecord r;
  r.position = pos;
  r.arrived_ns = arrived;
  return r;
}

static void manual_driver_releases_on_deadlines() {
  auto in = std::make_shared<TokenRing>(16);
  auto out = std::make_shared<TokenRing>(16);
  Pacer pacer(in, out, PacerOptions{.interval_ns = 100});
  CHECK(!pacer.next_deadline().has_value());
  for (std::uint64_t i = 0; i < 4; ++i) CHECK(in->try_push(token(i, 1000)));
  CHECK(pacer.next_deadline() == 1000);
  CHECK(pacer.release_due(1000) == 1);
  CHECK(pacer.next_deadline() == 1100);
  CHECK(pacer.release_due(1099) == 0);
  CHECK(pacer.release_due(1150) == 1);  // 50 late; DELAY keeps the next at 1200
  CHECK(pacer.next_deadline() == 1200);
  CHECK(pacer.release_due(1300) == 2);  // 1200 and 1300 both due
  auto lateness = pacer.take_lateness();
  CHECK((lateness == std::vector<std::int64_t>{0, 50, 100, 0}));
  TokenRecord r;
  std::int64_t expected_release[] = {1000, 1150, 1300, 1300};
  for (std::uint64_t i = 0; i < 4; ++i) {
    CHECK(out->try_pop(r));
    CHECK(r.position == i && r.released_ns == expected_release[i]);
  }
}

static void full_output_holds_tokens_back() {
  auto in = std::make_shared<TokenRing>(8);
  auto out = std::make_shared<TokenRing>(2);
  Pacer pacer(in, out);
  for (std::uint64_t i = 0; i < 5; ++i) CHECK(in->try_push(token(i, 0)));
  CHECK(pacer.release_due(10) == 2);
  CHECK(in->size() == 3);
  TokenRecord r;
  CHECK(out->try_pop(r) && r.position == 0);
  CHECK(pacer.release_due(10) == 1);
  CHECK(out->try_pop(r) && r.position == 1);
}

static void thread_paces_at_the_interval() {
  auto in = std::make_shared<TokenRing>(64);
  auto out = std::make_shared<TokenRing>(64);
  constexpr std::int64_t kInterval = 2'000'000;  // 2 ms
  Pacer pacer(in, out, PacerOptions{.interval_ns = kInterval});
  pacer.start(/*realtime=*/false);
  CHECK_THROWS(pacer.release_due(0), std::logic_error);
  const std::int64_t t0 = now_ns();
  for (std::uint64_t i = 0; i < 20; ++i) CHECK(in->try_push_notify(token(i, t0)));
  TokenRecord r;
  for (std::uint64_t i = 0; i < 20; ++i) {
    CHECK(out->pop_wait(r, now_ns() + 5'000'000'000));
    CHECK(r.position == i);
    // Never early: all arrived at t0, so token i's deadline is t0 + i intervals.
    CHECK(r.released_ns >= t0 + static_cast<std::int64_t>(i) * kInterval);
  }
  pacer.stop();
  auto lateness = pacer.take_lateness();
  CHECK(lateness.size() == 20);
  for (auto l : lateness) CHECK(l >= 0);
}

static void rate_change_wakes_a_sleeping_pacer() {
  auto in = std::make_shared<TokenRing>(8);
  auto out = std::make_shared<TokenRing>(8);
  Pacer pacer(in, out, PacerOptions{.interval_ns = 10'000'000'000});  // 10 s
  pacer.start(false);
  const std::int64_t t0 = now_ns();
  CHECK(in->try_push_notify(token(0, t0)));
  CHECK(in->try_push_notify(token(1, t0)));
  TokenRecord r;
  CHECK(out->pop_wait(r, t0 + 5'000'000'000));  // first goes at once
  pacer.set_interval_ns(0);
  CHECK(out->pop_wait(r, t0 + 5'000'000'000));  // would otherwise wait 10 s
  CHECK(r.position == 1);
  pacer.stop();
}

static void stop_interrupts_an_idle_pacer_and_callbacks_work() {
  auto in = std::make_shared<TokenRing>(8);
  Pacer pacer(in, nullptr);
  std::atomic<int> seen{0};
  pacer.set_callback([&](const TokenRecord& r) { seen += static_cast<int>(r.position) + 1; });
  pacer.start(false);
  CHECK(in->try_push_notify(token(0, now_ns())));
  CHECK(in->try_push_notify(token(1, now_ns())));
  const std::int64_t deadline = now_ns() + 5'000'000'000;
  while (seen.load() != 3 && now_ns() < deadline) std::this_thread::yield();
  CHECK(seen.load() == 3);
  pacer.stop();  // blocked on an empty ring: must return
  CHECK(!pacer.running());
}

int main() {
  manual_driver_releases_on_deadlines();
  full_output_holds_tokens_back();
  thread_paces_at_the_interval();
  rate_change_wakes_a_sleeping_pacer();
  stop_interrupts_an_idle_pacer_and_callbacks_work();
  return 0;
}
