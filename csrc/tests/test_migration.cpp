#include <memory>
#include <string>

#include "check.hpp"
#include "pydisco/migration.hpp"

using namespace pydisco;
using S = MigrationState;
using R = OfferResult;

static constexpr EndpointId kCloud = 1;
static constexpr EndpointId kDevice = 2;

static std::string drain_text(TokenRing& ring) {
  std::string s;
  ring.pop_many(1 << 20, [&](const TokenRecord& r) { s.append(r.text_view()); });
  return s;
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
  CHECK(drain_text(*ring) == "ABCD");
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

static void a_full_ring_is_backpressure_not_loss() {
  auto ring = std::make_shared<TokenRing>(2);
  MigrationMachine m(ring);
  m.start(kDevice, 0);
  CHECK(m.offer(kDevice, 0, 0, "a", 0, 0) == R::kCommitted);
  CHECK(m.offer(kDevice, 1, 0, "b", 0, 0) == R::kCommitted);
  CHECK(m.offer(kDevice, 2, 0, "c", 0, 0) == R::kBackpressure);
  CHECK(m.committed() == 2);
  CHECK(drain_text(*ring) == "ab");
  CHECK(m.offer(kDevice, 2, 0, "c", 0, 0) == R::kCommitted);
  CHECK(m.counters(kDevice).offered == 3);
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
  every_table_row_is_reachable_from_idle();
  return 0;
}
