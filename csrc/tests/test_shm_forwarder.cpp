// The forwarder: a paced answer goes from the pacer's own thread into the shared-memory ring,
// end record included; tokens released before the redirect go first; an abandoned answer is
// still ended there; an end record that does not fit is owed to the next answer, never lost;
// read() counts what the other side took.
#include <poll.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "check.hpp"
#include "pydisco/pacer.hpp"
#include "pydisco/shm_forwarder.hpp"

using namespace pydisco;

static std::string unique_name(const char* what) {
  static int n = 0;
  return "pydisco-test-" + std::to_string(::getpid()) + "-" + what + "-" + std::to_string(n++);
}

static TokenRecord token(std::uint64_t pos) {
  TokenRecord t;
  t.position = pos;
  t.token_id = static_cast<std::int32_t>(pos + 100);
  t.arrived_ns = now_ns();
  CHECK(t.set_text("w" + std::to_string(pos)));
  return t;
}

static TokenRecord end_at(std::uint64_t pos) {
  return TokenRecord::end_of_answer(pos, FinishReason::kStop, 1, now_ns());
}

static bool readable(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1;
}

static std::int64_t in_10s() { return now_ns() + 10'000'000'000; }

struct PacedAnswer {
  std::shared_ptr<TokenRing> committed = std::make_shared<TokenRing>(64);
  std::shared_ptr<TokenRing> released = std::make_shared<TokenRing>(64);
  std::shared_ptr<Pacer> pacer;
  explicit PacedAnswer(std::int64_t interval_ns = 0)
      : pacer(std::make_shared<Pacer>(committed, released, PacerOptions{.interval_ns = interval_ns})) {}
};

// Pacer thread -> shm ring -> consumer: every token in order with its release time, then the
// end record; the forwarder's eventfd says it is done; read() follows the consumer.
static void forwards_a_paced_answer_with_its_end() {
  const std::string name = unique_name("paced");
  auto shm = std::make_shared<ShmRingProducer>(name, 8);  // smaller than the answer
  auto consumer = ShmRingConsumer::attach(name);
  PacedAnswer answer(200'000);
  ShmForwarder forwarder(answer.pacer, shm);
  CHECK_THROWS(ShmForwarder(answer.pacer, shm), std::logic_error);  // one writer at a time
  answer.pacer->start(false);
  constexpr std::uint64_t kCount = 40;
  for (std::uint64_t i = 0; i < kCount; ++i) CHECK(answer.committed->try_push_notify(token(i)));
  CHECK(answer.committed->try_push_notify(end_at(kCount)));
  TokenRecord r;
  for (std::uint64_t i = 0; i < kCount; ++i) {
    CHECK(consumer->pop_wait(r, in_10s()) == ShmRead::kRecord);
    CHECK(r.position == i && r.text_view() == "w" + std::to_string(i) && r.released_ns > 0);
    CHECK(now_ns() >= r.released_ns);
  }
  CHECK(consumer->pop_wait(r, in_10s()) == ShmRead::kRecord);
  CHECK(r.is_end() && r.position == kCount && r.finish_reason() == FinishReason::kStop);
  CHECK(readable(forwarder.event_fd(), 10'000) && forwarder.finished());
  CHECK(forwarder.forwarded() == kCount && forwarder.read() == kCount && forwarder.stranded() == 0);
  CHECK(answer.released->statistics().pushed == kCount + 1);  // it went through the output ring
  answer.pacer->stop();
  forwarder.stop();
  CHECK(!shm->writer_claimed());
  ShmRingProducer::unlink(name);
}

// Redirected mid-answer: what was released before and not read goes first, then the rest;
// read() counts from this answer's first record, not from the ring's start.
static void a_redirect_mid_answer_loses_and_repeats_nothing() {
  const std::string name = unique_name("midway");
  auto shm = std::make_shared<ShmRingProducer>(name, 64);
  auto consumer = ShmRingConsumer::attach(name);
  {  // an earlier answer in the same ring, read whole
    PacedAnswer earlier;
    ShmForwarder forwarder(earlier.pacer, shm);
    CHECK(earlier.committed->try_push(token(0)) && earlier.committed->try_push(end_at(1)));
    CHECK(earlier.pacer->release_all(now_ns()) == 2 && forwarder.finished());
  }
  TokenRecord r;
  CHECK(consumer->try_pop(r) == ShmRead::kRecord && consumer->try_pop(r) == ShmRead::kRecord && r.is_end());
  PacedAnswer answer;
  for (std::uint64_t i = 0; i < 5; ++i) CHECK(answer.committed->try_push(token(i)));
  CHECK(answer.pacer->release_all(now_ns()) == 5);
  CHECK(answer.released->try_pop(r) && r.position == 0);  // the in-process reader took one
  ShmForwarder forwarder(answer.pacer, shm);  // the pacer is not running: hands over here
  CHECK(forwarder.forwarded() == 4 && answer.released->size() == 0);
  CHECK(answer.committed->try_push(token(5)) && answer.committed->try_push(end_at(6)));
  answer.pacer->start(false);
  CHECK(readable(forwarder.event_fd(), 10'000));
  answer.pacer->stop();
  CHECK(forwarder.read() == 0);
  for (std::uint64_t i = 1; i <= 5; ++i) {
    CHECK(consumer->try_pop(r) == ShmRead::kRecord && r.position == i);
    CHECK(forwarder.read() == i);
  }
  CHECK(consumer->try_pop(r) == ShmRead::kRecord && r.is_end() && r.position == 6);
  CHECK(forwarder.read() == 5);  // the end record is not a token
  ShmRingProducer::unlink(name);
}

// Stopped before the end record came: a cancelled end after what was forwarded; what the
// pacer releases later is dropped and counted.
static void an_abandoned_answer_still_ends_in_the_ring() {
  const std::string name = unique_name("abandoned");
  auto shm = std::make_shared<ShmRingProducer>(name, 16);
  auto consumer = ShmRingConsumer::attach(name);
  PacedAnswer answer;
  {
    ShmForwarder forwarder(answer.pacer, shm);
    for (std::uint64_t i = 0; i < 3; ++i) CHECK(answer.committed->try_push(token(i)));
    CHECK(answer.pacer->release_all(now_ns()) == 3);
    CHECK(answer.committed->try_push(token(3)));  // committed, not released yet
    forwarder.stop();
    CHECK(forwarder.finished() && forwarder.forwarded() == 3 && !shm->writer_claimed());
    CHECK(answer.pacer->release_all(now_ns()) == 1);
    CHECK(forwarder.stranded() == 1);
  }
  TokenRecord r;
  for (std::uint64_t i = 0; i < 3; ++i) CHECK(consumer->try_pop(r) == ShmRead::kRecord && r.position == i);
  CHECK(consumer->try_pop(r) == ShmRead::kRecord);
  CHECK(r.is_end() && r.position == 3 && r.finish_reason() == FinishReason::kCancelled);
  CHECK(consumer->try_pop(r) == ShmRead::kEmpty);
  ShmRingProducer::unlink(name);
}

// Nobody reads: the shm ring fills and the rest waits in the pacer's output ring; stopped, the
// end record is owed and goes out before the next answer's first token.
static void an_end_that_does_not_fit_is_owed_to_the_next_answer() {
  const std::string name = unique_name("owed");
  auto shm = std::make_shared<ShmRingProducer>(name, 2);
  PacedAnswer first;
  for (std::uint64_t i = 0; i < 5; ++i) CHECK(first.committed->try_push(token(i)));
  {
    ShmForwarder forwarder(first.pacer, shm);
    CHECK(first.pacer->release_all(now_ns()) == 5);
    CHECK(forwarder.forwarded() == 2 && first.released->size() == 3);  // kept, in order
    forwarder.stop();
    CHECK(first.pacer->release_all(now_ns()) == 0 && forwarder.stranded() == 3);
  }
  CHECK(shm->owes_end());
  auto consumer = ShmRingConsumer::attach(name);
  TokenRecord r;
  CHECK(consumer->try_pop(r) == ShmRead::kRecord && r.position == 0);
  CHECK(consumer->try_pop(r) == ShmRead::kRecord && r.position == 1);
  CHECK(consumer->try_pop(r) == ShmRead::kEmpty);
  PacedAnswer next;
  CHECK(next.committed->try_push(token(0)) && next.committed->try_push(end_at(1)));
  ShmForwarder forwarder(next.pacer, shm);
  next.pacer->start(false);
  CHECK(consumer->pop_wait(r, in_10s()) == ShmRead::kRecord);
  CHECK(r.is_end() && r.position == 2 && r.finish_reason() == FinishReason::kCancelled);
  CHECK(consumer->pop_wait(r, in_10s()) == ShmRead::kRecord && r.position == 0);
  CHECK(consumer->pop_wait(r, in_10s()) == ShmRead::kRecord && r.is_end());
  CHECK(readable(forwarder.event_fd(), 10'000) && forwarder.read() == 1);
  next.pacer->stop();
  ShmRingProducer::unlink(name);
}

// stop() racing the pacer's thread (under TSan: no data race): the consumer sees tokens
// 0..k-1 with no gap or repeat, then one end record at k, whatever k the race left.
static void a_stop_racing_the_pacer_leaves_a_clean_answer() {
  for (int round = 0; round < 20; ++round) {
    const std::string name = unique_name("race");
    auto shm = std::make_shared<ShmRingProducer>(name, 64);
    auto consumer = ShmRingConsumer::attach(name);
    PacedAnswer answer(20'000);
    ShmForwarder forwarder(answer.pacer, shm);
    answer.pacer->start(false);
    for (std::uint64_t i = 0; i < 40; ++i) CHECK(answer.committed->try_push_notify(token(i)));
    std::this_thread::sleep_for(std::chrono::microseconds(50 * round));
    forwarder.stop();
    answer.pacer->stop();
    TokenRecord r;
    std::uint64_t expected = 0;
    while (consumer->try_pop(r) == ShmRead::kRecord && !r.is_end()) CHECK(r.position == expected++);
    CHECK(r.is_end() && r.position == expected && expected == forwarder.forwarded());
    CHECK(consumer->try_pop(r) == ShmRead::kEmpty);
    ShmRingProducer::unlink(name);
  }
}

int main() {
  forwards_a_paced_answer_with_its_end();
  a_redirect_mid_answer_loses_and_repeats_nothing();
  an_abandoned_answer_still_ends_in_the_ring();
  an_end_that_does_not_fit_is_owed_to_the_next_answer();
  a_stop_racing_the_pacer_leaves_a_clean_answer();
  std::puts("test_shm_forwarder: ok");
  return 0;
}
