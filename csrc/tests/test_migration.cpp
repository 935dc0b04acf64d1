#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.hpp"
#include "pydisco/migration.hpp"

using namespace pydisco;
using S = MigrationState;
using R = OfferResult;
using F = FinishReason;
using Ev = MigrationEvent;

static constexpr EndpointId kCloud = 1;
static constexpr EndpointId kDevice = 2;

static std::vector<TokenRecord> drain(TokenRing& ring) {
  std::vector<TokenRecord> records;
  ring.pop_many(1 << 20, [&](const TokenRecord& r) { records.push_back(r); });
  return records;
}

static std::string text_of(const std::vector<TokenRecord>& records) {
  std::string s;
  for (const TokenRecord& r : records) s.append(r.text_view());
  return s;
}

static std::string drain_text(TokenRing& ring) { return text_of(drain(ring)); }

// The ring holds `tokens` tokens at positions 0.. and then exactly one end record.
static void check_tokens_then_end(const std::vector<TokenRecord>& records, std::uint64_t tokens,
                                  FinishReason reason, EndpointId source, std::int64_t at_ns) {
  CHECK(records.size() == tokens + 1);
  for (std::uint64_t i = 0; i < tokens; ++i) {
    CHECK(!records[i].is_end() && records[i].position == i);
    CHECK(records[i].finish_reason() == F::kNone);
  }
  const TokenRecord& end = records.back();
  CHECK(end.is_end() && end.finish_reason() == reason && end.position == tokens);
  CHECK(end.source == source && end.arrived_ns == at_ns && end.text_len == 0);
}

static void migration_cloud_to_device_has_no_gap_and_no_repeat() {
  auto ring = std::make_shared<TokenRing>(64);
  MigrationMachine m(ring);
  m.race({kCloud, kDevice}, 0);
  CHECK(m.offer(kCloud, 0, 10, "A", 0, 1) == R::kCommitted);  // cloud wins the race
  CHECK(m.state() == S::kStreaming && m.source() == kCloud);
  CHECK(m.offer(kDevice, 0, 10, "A", 0, 2) == R::kDuplicate);
  CHECK(m.offer(kCloud, 1, 11, "B", 0, 3) == R::kCommitted);
  m.prepare(kDevice, 4);
  CHECK(m.offer(kCloud, 2, 12, "C", 0, 5) == R::kCommitted);  // source keeps streaming
  CHECK(m.offer(kDevice, 3, 13, "D", 0, 5) == R::kNotActive);  // a preparing target can't commit
  CHECK(m.target_ready(6) == 3);
  CHECK(m.offer(kCloud, 3, 13, "D", 0, 7) == R::kNotActive);  // source stopped
  CHECK(m.offer(kDevice, 2, 12, "C", 0, 8) == R::kDuplicate);
  CHECK(m.offer(kDevice, 4, 14, "E", 0, 8) == R::kAhead);
  CHECK(m.offer(kDevice, 3, 13, "D", 0, 9) == R::kCommitted);
  CHECK(m.state() == S::kStreaming && m.source() == kDevice && m.migrations() == 1);
  CHECK(m.last_handover_gap_ns() == 3);
  CHECK(m.offer_end(kCloud, 4, 10) == R::kNotActive);  // a stale end from the old source
  CHECK(m.offer_end(kDevice, 4, 10) == R::kCommitted);
  CHECK(m.state() == S::kFinished);
  CHECK(m.offer(kDevice, 4, 14, "E", 0, 11) == R::kClosed);
  CHECK(m.finish_reason() == F::kStop);
  const std::vector<TokenRecord> records = drain(*ring);
  check_tokens_then_end(records, 4, F::kStop, kDevice, 10);
  CHECK(text_of(records) == "ABCD");
  CHECK((m.committed_token_ids() == std::vector<std::int32_t>{10, 11, 12, 13}));
  const EndpointCounters cloud = m.counters(kCloud);
  CHECK(cloud.offered == 4 && cloud.accepted == 3 && cloud.dropped == 1);
  const EndpointCounters device = m.counters(kDevice);
  CHECK(device.offered == 6 && device.accepted == 1 && device.dropped == 5 && device.duplicates == 2);
}

static void failover_resumes_from_the_committed_prefix() {
  auto ring = std::make_shared<TokenRing>(64);
  MigrationMachine m(ring);
  m.start(kCloud, 0);
  CHECK(m.offer(kCloud, 0, 1, "x", 0, 1) == R::kCommitted);
  m.endpoint_failed(kCloud, 2);
  CHECK(m.state() == S::kRecovering);
  CHECK(m.offer(kCloud, 1, 2, "y", 0, 3) == R::kNotActive);  // in flight from the dead link
  CHECK(m.resume(kDevice, 4) == 1);
  CHECK(m.offer(kDevice, 1, 2, "y", 0, 5) == R::kCommitted);
  CHECK(m.state() == S::kStreaming && m.source() == kDevice);
  CHECK(drain_text(*ring) == "xy");
}

static void failover_to_a_preparing_target() {
  auto ring = std::make_shared<TokenRing>(64);
  MigrationMachine m(ring);
  m.start(kCloud, 0);
  m.prepare(kDevice, 1);
  CHECK(m.offer(kCloud, 0, 1, "x", 0, 2) == R::kCommitted);
  m.endpoint_failed(kCloud, 3);
  CHECK(m.state() == S::kHandingOver && m.target() == kDevice);
  CHECK(m.offer(kDevice, 1, 2, "y", 0, 4) == R::kCommitted);
  CHECK(m.state() == S::kStreaming);
}

static void illegal_events_are_explicit_errors() {
  auto ring = std::make_shared<TokenRing>(8);
  MigrationMachine m(ring);
  CHECK_THROWS(m.target_ready(0), IllegalTransition);
  m.start(kCloud, 0);
  CHECK_THROWS(m.start(kDevice, 0), IllegalTransition);
  CHECK_THROWS(m.prepare(kCloud, 0), IllegalTransition);  // the source as its own target
  try {
    m.resume(kDevice, 0);
    CHECK(false);
  } catch (const IllegalTransition& e) {
    CHECK(e.state() == S::kStreaming && e.event() == MigrationEvent::kResume);
    CHECK(std::string(e.what()) == "illegal migration event 'resume' in state 'streaming'");
  }
  m.cancel(1);
  CHECK(m.state() == S::kCancelled);
  CHECK_THROWS(m.cancel(2), IllegalTransition);
  CHECK_THROWS(m.offer(MigrationMachine::kMaxEndpoints, 0, 0, "", 0, 0), std::out_of_range);
}

// A ring that did not start empty (another answer's unread tail): a token is committed only
// while the ring has room for it and the end record, so the end still fits.
static void a_full_ring_is_backpressure_not_loss() {
  auto ring = std::make_shared<TokenRing>(4);
  CHECK(ring->try_push(TokenRecord{}) && ring->try_push(TokenRecord{}));
  MigrationMachine m(ring);
  m.start(kDevice, 0);
  CHECK(m.offer(kDevice, 0, 0, "a", 0, 0) == R::kCommitted);
  CHECK(m.offer(kDevice, 1, 0, "b", 0, 0) == R::kBackpressure);  // the last slot is the end's
  CHECK(m.committed() == 1 && m.counters(kDevice).offered == 1);
  TokenRecord foreign;
  CHECK(ring->try_pop(foreign) && ring->try_pop(foreign));
  CHECK(m.offer(kDevice, 1, 0, "b", 0, 0) == R::kCommitted);
  CHECK(m.counters(kDevice).offered == 2);
  m.cancel(1);
  check_tokens_then_end(drain(*ring), 2, F::kCancelled, 0, 1);
}

// Only a ring full since before the first commit has no room for the end: nothing changes.
static void an_end_that_cannot_fit_changes_nothing() {
  auto ring = std::make_shared<TokenRing>(2);
  CHECK(ring->try_push(TokenRecord{}) && ring->try_push(TokenRecord{}));
  MigrationMachine m(ring);
  m.start(kCloud, 0);
  CHECK_THROWS(m.cancel(1), std::logic_error);
  CHECK(m.state() == S::kStreaming && m.finish_reason() == F::kNone);
  CHECK(m.transitions().size() == 1);
  TokenRecord foreign;
  CHECK(ring->try_pop(foreign));
  m.cancel(2);
  CHECK(m.state() == S::kCancelled);
}

static void each_terminal_path_pushes_one_end_record() {
  {  // offer_end: stop (the default) and length
    for (F reason : {F::kStop, F::kLength}) {
      auto ring = std::make_shared<TokenRing>(8);
      MigrationMachine m(ring);
      m.start(kCloud, 0);
      CHECK(m.offer(kCloud, 0, 1, "x", 0, 1) == R::kCommitted);
      CHECK(m.offer_end(kCloud, 1, reason, 7) == R::kCommitted);
      CHECK(m.state() == S::kFinished && m.finish_reason() == reason);
      check_tokens_then_end(drain(*ring), 1, reason, kCloud, 7);
    }
  }
  {  // give_up: no endpoint ended it
    auto ring = std::make_shared<TokenRing>(8);
    MigrationMachine m(ring);
    m.start(kCloud, 0);
    CHECK(m.offer(kCloud, 0, 1, "x", 0, 1) == R::kCommitted);
    m.endpoint_failed(kCloud, 2);
    CHECK(m.finish_reason() == F::kNone);  // recovering is not an end
    m.give_up(3);
    CHECK(m.state() == S::kFailed && m.finish_reason() == F::kFailed);
    check_tokens_then_end(drain(*ring), 1, F::kFailed, 0, 3);
  }
  {  // cancel, even before anything started
    auto ring = std::make_shared<TokenRing>(8);
    MigrationMachine m(ring);
    m.cancel(4);
    CHECK(m.finish_reason() == F::kCancelled);
    check_tokens_then_end(drain(*ring), 0, F::kCancelled, 0, 4);
    CHECK_THROWS(m.give_up(5), IllegalTransition);
    CHECK(ring->empty());  // a refused event pushes nothing
  }
}

static void the_machine_ends_the_answer_at_max_tokens() {
  auto ring = std::make_shared<TokenRing>(8);
  MigrationMachine m(ring, 3);
  CHECK(m.max_tokens() == 3);
  m.start(kDevice, 0);
  CHECK(m.offer(kDevice, 0, 0, "a", 0, 1) == R::kCommitted);
  CHECK(m.offer(kDevice, 1, 0, "b", 0, 2) == R::kCommitted);
  CHECK(m.state() == S::kStreaming);
  CHECK(m.offer(kDevice, 2, 0, "c", 0, 3) == R::kCommitted);
  CHECK(m.state() == S::kFinished && m.finish_reason() == F::kLength);
  CHECK(m.offer(kDevice, 3, 0, "d", 0, 4) == R::kClosed);
  CHECK(m.offer_end(kDevice, 3, 5) == R::kClosed);
  CHECK(m.counters(kDevice).accepted == 3 && m.counters(kDevice).dropped == 1);
  const TransitionRecord& last = m.transitions().back();
  CHECK(last.event == Ev::kFinish && last.position == 3 && last.endpoint == kDevice);
  check_tokens_then_end(drain(*ring), 3, F::kLength, kDevice, 3);
}

// A race won by the last allowed token: won (at its position), then the machine's finish.
static void max_tokens_after_a_won_race_and_from_a_start_position() {
  {
    auto ring = std::make_shared<TokenRing>(2);
    MigrationMachine m(ring, 1);
    m.race({kCloud, kDevice}, 0);
    CHECK(m.offer(kDevice, 0, 5, "a", 0, 1) == R::kCommitted);
    CHECK(m.state() == S::kFinished && m.finish_reason() == F::kLength);
    const auto& log = m.transitions();
    CHECK(log.size() == 3);
    CHECK(log[1].event == Ev::kWon && log[1].position == 0 && log[1].to == S::kStreaming);
    CHECK(log[2].event == Ev::kFinish && log[2].position == 1 && log[2].to == S::kFinished);
  }
  {
    auto ring = std::make_shared<TokenRing>(4);
    MigrationMachine m(ring, 5, 3);  // positions 3 and 4
    m.start(kCloud, 0);
    CHECK(m.offer(kCloud, 3, 0, "a", 0, 1) == R::kCommitted);
    CHECK(m.offer(kCloud, 4, 0, "b", 0, 2) == R::kCommitted);
    CHECK(m.state() == S::kFinished && m.committed() == 5);
    const std::vector<TokenRecord> records = drain(*ring);
    CHECK(records.size() == 3 && records[0].position == 3 && records[1].position == 4);
    CHECK(records[2].is_end() && records[2].position == 5);
  }
}

static void max_tokens_must_fit_the_ring_beside_the_end_record() {
  auto ring = std::make_shared<TokenRing>(8);
  CHECK(MigrationMachine(ring).max_tokens() == 7);  // default: all the ring holds
  CHECK(MigrationMachine(ring, std::nullopt, 10).max_tokens() == 17);
  CHECK(MigrationMachine(ring, 7).max_tokens() == 7);
  CHECK_THROWS(MigrationMachine(ring, 8), std::invalid_argument);
  CHECK(MigrationMachine(ring, 9, 2).max_tokens() == 9);
  CHECK_THROWS(MigrationMachine(ring, 10, 2), std::invalid_argument);
  CHECK_THROWS(MigrationMachine(ring, 2, 2), std::invalid_argument);  // nothing left to commit
  CHECK_THROWS(MigrationMachine(ring, 0), std::invalid_argument);
  CHECK_THROWS(MigrationMachine(nullptr), std::invalid_argument);
}

static void offer_end_takes_only_an_endpoints_reasons() {
  auto ring = std::make_shared<TokenRing>(8);
  MigrationMachine m(ring);
  m.start(kCloud, 0);
  for (F reason : {F::kNone, F::kFailed, F::kCancelled})
    CHECK_THROWS(m.offer_end(kCloud, 0, reason, 1), std::invalid_argument);
  CHECK(m.state() == S::kStreaming && ring->empty());
}

static void won_and_taken_over_are_logged_at_the_causing_position() {
  auto ring = std::make_shared<TokenRing>(16);
  MigrationMachine m(ring);
  m.race({kCloud, kDevice}, 10);
  CHECK(m.offer(kCloud, 0, 1, "a", 0, 20) == R::kCommitted);
  CHECK(m.offer(kCloud, 1, 2, "b", 0, 21) == R::kCommitted);
  m.prepare(kDevice, 30);
  CHECK(m.target_ready(40) == 2);
  CHECK(m.offer(kDevice, 2, 3, "c", 0, 50) == R::kCommitted);
  m.cancel(60);
  const auto& log = m.transitions();
  CHECK(log.size() == 6);
  const Ev events[] = {Ev::kRace, Ev::kWon, Ev::kPrepare, Ev::kTargetReady, Ev::kTakenOver,
                       Ev::kCancel};
  const std::uint64_t positions[] = {0, 0, 2, 2, 2, 3};
  const std::int64_t times[] = {10, 20, 30, 40, 50, 60};
  for (std::size_t i = 0; i < log.size(); ++i)
    CHECK(log[i].event == events[i] && log[i].position == positions[i] && log[i].at_ns == times[i]);
  CHECK(log[1].endpoint == kCloud && log[4].endpoint == kDevice);
}

static void the_commit_log_holds_every_committed_token() {
  auto ring = std::make_shared<TokenRing>(16);
  MigrationMachine m(ring);
  m.start(kCloud, 0);
  CHECK(m.offer(kCloud, 0, 11, "hé", 100, 110) == R::kCommitted);
  CHECK(m.offer(kCloud, 0, 11, "hé", 100, 111) == R::kDuplicate);  // not logged
  CHECK(m.offer(kCloud, 1, 12, "llo", 120, 130) == R::kCommitted);
  m.endpoint_failed(kCloud, 140);
  m.resume(kDevice, 150);
  CHECK(m.offer(kDevice, 2, -1, "", 160, 170) == R::kCommitted);
  const auto& commits = m.commits();
  CHECK(commits.size() == 3);
  CHECK(commits[0].position == 0 && commits[0].token_id == 11 && commits[0].source == kCloud);
  CHECK(commits[0].produced_ns == 100 && commits[0].arrived_ns == 110);
  CHECK(commits[1].position == 1 && commits[1].produced_ns == 120 && commits[1].arrived_ns == 130);
  CHECK(commits[2].position == 2 && commits[2].token_id == -1 && commits[2].source == kDevice);
  CHECK(m.committed_text() == "héllo");
  const std::string pieces[] = {"hé", "llo", ""};
  for (std::size_t i = 0; i < commits.size(); ++i)
    CHECK(m.committed_text().substr(commits[i].text_begin, commits[i].text_len) == pieces[i]);
  CHECK((m.committed_token_ids() == std::vector<std::int32_t>{11, 12, -1}));
}

static void every_table_row_is_reachable_from_idle() {
  // A cheap structural check: each state with rows is a `from` of some row and is reached by
  // some row (or is idle), so the table has no orphan states.
  for (const Transition& t : kTable) {
    bool reached = t.from == S::kIdle;
    for (const Transition& u : kTable) reached = reached || u.to == t.from;
    CHECK(reached);
  }
}

int main() {
  migration_cloud_to_device_has_no_gap_and_no_repeat();
  failover_resumes_from_the_committed_prefix();
  failover_to_a_preparing_target();
  illegal_events_are_explicit_errors();
  a_full_ring_is_backpressure_not_loss();
  an_end_that_cannot_fit_changes_nothing();
  each_terminal_path_pushes_one_end_record();
  the_machine_ends_the_answer_at_max_tokens();
  max_tokens_after_a_won_race_and_from_a_start_position();
  max_tokens_must_fit_the_ring_beside_the_end_record();
  offer_end_takes_only_an_endpoints_reasons();
  won_and_taken_over_are_logged_at_the_causing_position();
  the_commit_log_holds_every_committed_token();
  every_table_row_is_reachable_from_idle();
  return 0;
}
