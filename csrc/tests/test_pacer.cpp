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

static TokenRecord end_record(std::uint64_t count, std::int64_t at) {
  return TokenRecord::end_of_answer(count, FinishReason::kStop, 1, at);
}

static std::vector<TokenRecord> drain(TokenRing& ring) {
  std::vector<TokenRecord> records;
  ring.pop_many(1 << 20, [&](const TokenRecord& r) { records.push_back(r); });
  return records;
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

// The end record follows the last token at once, never overtakes it, and neither moves the
// schedule nor counts as a release in the lateness statistics.
static void manual_driver_sends_the_end_right_after_the_last_token() {
  auto in = std::make_shared<TokenRing>(16);
  auto out = std::make_shared<TokenRing>(16);
  Pacer pacer(in, out, PacerOptions{.interval_ns = 100});
  for (std::uint64_t i = 0; i < 3; ++i) CHECK(in->try_push(token(i, 1000)));
  CHECK(in->try_push(end_record(3, 1000)));
  CHECK(pacer.release_due(1000) == 1);
  CHECK(pacer.release_due(1150) == 1);  // token 1 (due 1100); token 2 (1200) holds the end back
  CHECK(pacer.next_deadline() == 1200);
  CHECK(pacer.release_due(1200) == 2);  // token 2, and the end with it
  CHECK(!pacer.next_deadline().has_value());
  const std::vector<TokenRecord> released = drain(*out);
  CHECK(released.size() == 4 && released[3].is_end() && released[3].released_ns == 1200);
  for (std::uint64_t i = 0; i < 3; ++i) CHECK(!released[i].is_end() && released[i].position == i);
  // The schedule is where token 2 left it: the next token is due 100 after token 2's deadline.
  CHECK(in->try_push(token(4, 1200)));
  CHECK(pacer.next_deadline() == 1300);
  CHECK(pacer.statistics().released == 3);
  CHECK(pacer.statistics().max_lateness_ns == 50);
  const auto releases = pacer.take_releases();
  CHECK(releases.size() == 4);
  CHECK(releases[3].kind == RecordKind::kEnd && releases[3].position == 3);
  CHECK(releases[3].deadline_ns == 1000 && releases[3].released_ns == 1200);
  CHECK(releases[1].kind == RecordKind::kToken && releases[1].deadline_ns == 1100);
  CHECK(pacer.take_lateness().empty());  // one log: take_releases took it
}

static void an_end_record_alone_goes_out_when_committed() {
  auto in = std::make_shared<TokenRing>(8);
  auto out = std::make_shared<TokenRing>(8);
  Pacer pacer(in, out, PacerOptions{.interval_ns = 1'000'000'000});
  CHECK(in->try_push(token(0, 0)));
  CHECK(pacer.release_due(0) == 1);  // the schedule now waits a second for the next token
  CHECK(in->try_push(end_record(1, 5)));
  CHECK(pacer.next_deadline() == 5);
  CHECK(pacer.release_due(4) == 0);
  CHECK(pacer.release_due(5) == 1);
  CHECK(pacer.take_lateness() == std::vector<std::int64_t>{0});
}

static void release_all_delivers_everything_now() {
  auto in = std::make_shared<TokenRing>(8);
  auto out = std::make_shared<TokenRing>(4);
  Pacer pacer(in, out, PacerOptions{.interval_ns = 1'000'000});
  for (std::uint64_t i = 0; i < 5; ++i) CHECK(in->try_push(token(i, 100)));
  CHECK(in->try_push(end_record(5, 100)));
  CHECK(pacer.release_all(200) == 4);  // the output ring is full
  CHECK(in->size() == 2);
  std::vector<TokenRecord> released = drain(*out);
  CHECK(pacer.release_all(300) == 2);
  for (const TokenRecord& r : drain(*out)) released.push_back(r);
  CHECK(released.size() == 6 && released.back().is_end());
  for (std::uint64_t i = 0; i < 5; ++i) CHECK(released[i].position == i);
  CHECK(released[0].released_ns == 200 && released[5].released_ns == 300);
  // Released ahead of their deadlines (100, then every 1 ms): the lateness says so.
  const std::vector<std::int64_t> expected{100, 200 - 1'000'100, 200 - 2'000'100,
                                           200 - 3'000'100, 300 - 4'000'100};
  CHECK(pacer.take_lateness() == expected);
  pacer.start(false);
  CHECK_THROWS(pacer.release_all(0), std::logic_error);
  pacer.stop();
}

static void a_full_release_log_drops_and_counts() {
  auto in = std::make_shared<TokenRing>(16);
  auto out = std::make_shared<TokenRing>(16);
  Pacer pacer(in, out, PacerOptions{.log_capacity = 2});
  for (std::uint64_t i = 0; i < 5; ++i) CHECK(in->try_push(token(i, 10)));
  CHECK(pacer.release_due(10) == 5);
  PacerStatistics s = pacer.statistics();
  CHECK(s.released == 5 && s.lateness_samples_dropped == 3);
  const auto releases = pacer.take_releases();
  CHECK(releases.size() == 2 && releases[0].position == 0 && releases[1].position == 1);
  CHECK(in->try_push(token(5, 20)));
  CHECK(pacer.release_due(20) == 1);
  const auto again = pacer.take_releases();  // room again after the take
  CHECK(again.size() == 1 && again[0].position == 5 && again[0].released_ns == 20);
  CHECK(pacer.statistics().lateness_samples_dropped == 3);
}

static void the_release_log_holds_an_input_ring_by_default() {
  auto in = std::make_shared<TokenRing>(4);
  auto out = std::make_shared<TokenRing>(16);
  Pacer pacer(in, out);
  for (std::uint64_t round = 0; round < 2; ++round) {
    for (std::uint64_t i = 0; i < 4; ++i) CHECK(in->try_push(token(round * 4 + i, 0)));
    CHECK(pacer.release_due(0) == 4);
  }
  CHECK(pacer.statistics().lateness_samples_dropped == 4);
  CHECK(pacer.take_releases().size() == 4);
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

// The thread announces each release handoff_lead_ns before its deadline (so a consumer is
// awake when it lands), with the deadline it then keeps; with a lead of 0 it announces nothing.
static void thread_announces_each_release_ahead() {
  for (const std::int64_t lead : {std::int64_t{10'000'000}, std::int64_t{0}}) {
    // The poll below sees the announcement only if it runs within the lead's 10 ms: a busy
    // machine can deschedule it that long, so a few tries, of which one must see it.
    bool seen_once = false;
    for (int attempt = 0; attempt < 5 && !seen_once; ++attempt) {
      auto in = std::make_shared<TokenRing>(8);
      auto out = std::make_shared<TokenRing>(8);
      Pacer pacer(in, out, PacerOptions{.interval_ns = 50'000'000, .handoff_lead_ns = lead});
      pacer.start(false);
      const std::int64_t t0 = now_ns();
      CHECK(in->try_push_notify(token(0, t0)));
      CHECK(in->try_push_notify(token(1, t0)));
      TokenRecord r;
      CHECK(out->pop_wait(r, t0 + 5'000'000'000) && r.position == 0);
      std::int64_t announced = -1, seen_ns = 0;
      while (out->front() == nullptr) {  // poll; do not block, so the announcement is seen
        if (announced < 0 && (announced = out->announced_next_ns()) >= 0) seen_ns = now_ns();
      }
      CHECK(out->try_pop(r) && r.position == 1);
      pacer.stop();
      const auto releases = pacer.take_releases();
      CHECK(releases.size() == 2);
      if (lead == 0) {
        CHECK(announced < 0);  // never announced
        seen_once = true;      // nothing to see: one try says it
      } else if (announced >= 0) {
        CHECK(announced == releases[1].deadline_ns);
        CHECK(seen_ns < r.released_ns);
        seen_once = true;
      }
    }
    CHECK(seen_once);
  }
}

// At 10 s per token, an end record paced like a token would miss the 5 s wait below.
static void thread_sends_the_end_right_after_the_last_token() {
  auto in = std::make_shared<TokenRing>(8);
  auto out = std::make_shared<TokenRing>(8);
  Pacer pacer(in, out, PacerOptions{.interval_ns = 10'000'000'000});
  pacer.start(false);
  const std::int64_t t0 = now_ns();
  CHECK(in->try_push_notify(token(0, t0)));
  CHECK(in->try_push_notify(end_record(1, t0)));
  TokenRecord r;
  CHECK(out->pop_wait(r, t0 + 5'000'000'000) && r.position == 0 && !r.is_end());
  CHECK(out->pop_wait(r, t0 + 5'000'000'000) && r.is_end() && r.position == 1);
  CHECK(r.finish_reason() == FinishReason::kStop && r.released_ns >= t0);
  pacer.stop();
  CHECK(pacer.statistics().released == 1);
  const auto releases = pacer.take_releases();
  CHECK(releases.size() == 2 && releases[1].kind == RecordKind::kEnd);
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

// stop() racing the pacer thread's way into its idle wait, many times over: each returns (a
// stop between the thread's stop check and its wait was missed, and stop() joined forever).
static void stop_always_reaches_a_pacer_going_idle() {
  auto in = std::make_shared<TokenRing>(8);
  auto out = std::make_shared<TokenRing>(8);
  Pacer pacer(in, out);
  for (int round = 0; round < 1000; ++round) {
    pacer.start(false);
    if (round % 2 == 0) std::this_thread::yield();
    pacer.stop();
  }
  CHECK(!pacer.running());
}

int main() {
  manual_driver_releases_on_deadlines();
  full_output_holds_tokens_back();
  manual_driver_sends_the_end_right_after_the_last_token();
  an_end_record_alone_goes_out_when_committed();
  release_all_delivers_everything_now();
  a_full_release_log_drops_and_counts();
  the_release_log_holds_an_input_ring_by_default();
  thread_paces_at_the_interval();
  thread_sends_the_end_right_after_the_last_token();
  thread_announces_each_release_ahead();
  rate_change_wakes_a_sleeping_pacer();
  stop_interrupts_an_idle_pacer_and_callbacks_work();
  stop_always_reaches_a_pacer_going_idle();
  return 0;
}
