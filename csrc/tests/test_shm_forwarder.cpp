// The forwarder: a paced answer goes from the pacer's released ring into the shared-memory
// ring, end record included; an abandoned answer is still ended there; an end record that
// does not fit is owed to the next answer, never lost.
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

static bool readable(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1;
}

// Pacer -> released ring -> forwarder -> shm ring -> consumer: every token in order with its
// release time, then the end record; the forwarder's eventfd says it is done.
static void forwards_a_paced_answer_with_its_end() {
  const std::string name = unique_name("paced");
  auto shm = std::make_shared<ShmRingProducer>(name, 8);  // smaller than the answer
  auto consumer = ShmRingConsumer::attach(name);
  auto committed = std::make_shared<TokenRing>(64);
  auto released = std::make_shared<TokenRing>(64);
  Pacer pacer(committed, released, PacerOptions{.interval_ns = 200'000});
  ShmForwarder forwarder(released, shm);
  CHECK_THROWS(ShmForwarder(released, shm), std::logic_error);  // one writer at a time
  pacer.start(false);
  constexpr std::uint64_t kCount = 40;
  for (std::uint64_t i = 0; i < kCount; ++i) CHECK(committed->try_push_notify(token(i)));
  CHECK(committed->try_push_notify(TokenRecord::end_of_answer(kCount, FinishReason::kStop, 1, now_ns())));
  TokenRecord r;
  for (std::uint64_t i = 0; i < kCount; ++i) {
    CHECK(consumer->pop_wait(r, now_ns() + 10'000'000'000) == ShmRead::kRecord);
    CHECK(r.position == i && r.text_view() == "w" + std::to_string(i) && r.released_ns > 0);
    CHECK(now_ns() >= r.released_ns);
  }
  CHECK(consumer->pop_wait(r, now_ns() + 10'000'000'000) == ShmRead::kRecord);
  CHECK(r.is_end() && r.position == kCount && r.finish_reason() == FinishReason::kStop);
  CHECK(readable(forwarder.event_fd(), 10'000) && forwarder.finished());
  CHECK(forwarder.forwarded() == kCount && forwarder.stranded() == 0);
  pacer.stop();
  forwarder.stop();
  CHECK(!shm->writer_claimed());
  ShmRingProducer::unlink(name);
}

// Stopped before the end record came: what was released is forwarded, then a cancelled end.
static void an_abandoned_answer_still_ends_in_the_ring() {
  const std::string name = unique_name("abandoned");
  auto shm = std::make_shared<ShmRingProducer>(name, 16);
  auto consumer = ShmRingConsumer::attach(name);
  auto released = std::make_shared<TokenRing>(16);
  {
    ShmForwarder forwarder(released, shm);
    for (std::uint64_t i = 0; i < 3; ++i) CHECK(released->try_push_notify(token(i)));
    TokenRecord r;
    for (std::uint64_t i = 0; i < 3; ++i)
      CHECK(consumer->pop_wait(r, now_ns() + 10'000'000'000) == ShmRead::kRecord && r.position == i);
    CHECK(released->try_push(token(3)));  // no notify: it may still be in the released ring
    forwarder.stop();
    CHECK(forwarder.finished() && forwarder.forwarded() == 4);
  }
  TokenRecord r;
  CHECK(consumer->pop_wait(r, now_ns() + 1'000'000'000) == ShmRead::kRecord && r.position == 3);
  CHECK(consumer->try_pop(r) == ShmRead::kRecord);
  CHECK(r.is_end() && r.position == 4 && r.finish_reason() == FinishReason::kCancelled);
  ShmRingProducer::unlink(name);
}

// Nobody reads: the shm ring fills, the forwarder waits; stopped, it counts what it left and
// owes the end record, which goes out before the next answer's first token.
static void an_end_that_does_not_fit_is_owed_to_the_next_answer() {
  const std::string name = unique_name("owed");
  auto shm = std::make_shared<ShmRingProducer>(name, 2);
  auto released = std::make_shared<TokenRing>(16);
  for (std::uint64_t i = 0; i < 5; ++i) CHECK(released->try_push(token(i)));
  {
    ShmForwarder forwarder(released, shm);
    while (shm->statistics().pushed < 2) std::this_thread::yield();
    forwarder.stop();
    CHECK(forwarder.forwarded() == 2 && forwarder.stranded() == 3);
  }
  CHECK(shm->owes_end());
  auto consumer = ShmRingConsumer::attach(name);
  TokenRecord r;
  CHECK(consumer->try_pop(r) == ShmRead::kRecord && r.position == 0);
  CHECK(consumer->try_pop(r) == ShmRead::kRecord && r.position == 1);
  CHECK(consumer->try_pop(r) == ShmRead::kEmpty);
  auto next = std::make_shared<TokenRing>(16);
  CHECK(next->try_push(token(0)));
  CHECK(next->try_push(TokenRecord::end_of_answer(1, FinishReason::kStop, 1, now_ns())));
  ShmForwarder forwarder(next, shm);
  CHECK(consumer->pop_wait(r, now_ns() + 10'000'000'000) == ShmRead::kRecord);
  CHECK(r.is_end() && r.position == 2 && r.finish_reason() == FinishReason::kCancelled);
  CHECK(consumer->pop_wait(r, now_ns() + 10'000'000'000) == ShmRead::kRecord && r.position == 0);
  CHECK(consumer->pop_wait(r, now_ns() + 10'000'000'000) == ShmRead::kRecord && r.is_end());
  CHECK(readable(forwarder.event_fd(), 10'000));
  ShmRingProducer::unlink(name);
}

int main() {
  forwards_a_paced_answer_with_its_end();
  an_abandoned_answer_still_ends_in_the_ring();
  an_end_that_does_not_fit_is_owed_to_the_next_answer();
  std::puts("test_shm_forwarder: ok");
  return 0;
}
