#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "check.hpp"
#include "pydisco/native_consumer.hpp"
#include "pydisco/pacer.hpp"

using namespace pydisco;

static TokenRecord token(std::uint64_t pos) {
  TokenRecord t;
  t.position = pos;
  t.arrived_ns = now_ns();
  return t;
}

// A C++ control loop taking an answer from the pacer's released ring, end to end: the end
// record reaches the callback after the tokens, and the consumer's thread ends there.
static void consumes_a_paced_answer_to_its_end() {
  auto committed = std::make_shared<TokenRing>(64);
  auto released = std::make_shared<TokenRing>(64);
  Pacer pacer(committed, released, PacerOptions{.interval_ns = 1'000'000});
  std::vector<TokenRecord> seen;
  NativeConsumer consumer(released, [&](const TokenRecord& t, std::int64_t received_ns) {
    CHECK(received_ns >= t.released_ns);
    seen.push_back(t);
  });
  pacer.start(false);
  for (std::uint64_t i = 0; i < 30; ++i) CHECK(committed->try_push_notify(token(i)));
  CHECK(committed->try_push_notify(TokenRecord::end_of_answer(30, FinishReason::kLength, 2, now_ns())));
  const std::int64_t deadline = now_ns() + 10'000'000'000;
  while (!consumer.finished() && now_ns() < deadline) std::this_thread::yield();
  CHECK(consumer.finished());
  pacer.stop();
  consumer.stop();
  CHECK(consumer.consumed() == 30);
  CHECK(seen.size() == 31);  // read after finished(): the thread wrote it before
  for (std::uint64_t i = 0; i < 30; ++i) CHECK(seen[i].position == i && !seen[i].is_end());
  CHECK(seen[30].is_end() && seen[30].finish_reason() == FinishReason::kLength);
}

// Nothing after the end record is taken: the thread has ended.
static void stops_at_the_end_record() {
  auto ring = std::make_shared<TokenRing>(8);
  for (std::uint64_t i = 0; i < 3; ++i) CHECK(ring->try_push(token(i)));
  CHECK(ring->try_push(TokenRecord::end_of_answer(3, FinishReason::kStop, 1, now_ns())));
  CHECK(ring->try_push(token(0)));  // a next answer's token, not this consumer's
  std::atomic<int> calls{0};
  NativeConsumer consumer(ring, [&](const TokenRecord&, std::int64_t) { ++calls; });
  const std::int64_t deadline = now_ns() + 10'000'000'000;
  while (!consumer.finished() && now_ns() < deadline) std::this_thread::yield();
  consumer.stop();
  CHECK(consumer.finished() && consumer.consumed() == 3 && calls.load() == 4);
  CHECK(ring->size() == 1);
}

// stop() racing the consumer thread's way into its wait, many times over: each returns.
static void stop_always_reaches_a_consumer_going_idle() {
  auto ring = std::make_shared<TokenRing>(8);
  for (int round = 0; round < 1000; ++round) {
    NativeConsumer consumer(ring, [](const TokenRecord&, std::int64_t) {});
    if (round % 2 == 0) std::this_thread::yield();
    consumer.stop();  // joins: hangs if the wake-up is lost
  }
}

int main() {
  consumes_a_paced_answer_to_its_end();
  stops_at_the_end_record();
  stop_always_reaches_a_consumer_going_idle();
  return 0;
}
