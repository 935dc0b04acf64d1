#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "check.hpp"
#include "pydisco/native_consumer.hpp"
#include "pydisco/pacer.hpp"

using namespace pydisco;

// A C++ control loop taking an answer from the pacer's released ring, end to end.
int main() {
  auto committed = std::make_shared<TokenRing>(64);
  auto released = std::make_shared<TokenRing>(64);
  Pacer pacer(committed, released, PacerOptions{.interval_ns = 1'000'000});
  std::vector<std::uint64_t> positions;
  std::atomic<int> seen{0};
  NativeConsumer consumer(released, [&](const TokenRecord& t, std::int64_t received_ns) {
    CHECK(received_ns >= t.released_ns);
    positions.push_back(t.position);
    ++seen;
  });
  pacer.start(false);
  for (std::uint64_t i = 0; i < 30; ++i) {
    TokenRecord t;
    t.position = i;
    t.arrived_ns = now_ns();
    CHECK(committed->try_push_notify(t));
  }
  const std::int64_t deadline = now_ns() + 10'000'000'000;
  while (seen.load() < 30 && now_ns() < deadline) std::this_thread::yield();
  pacer.stop();
  consumer.stop();
  CHECK(consumer.consumed() == 30);
  for (std::uint64_t i = 0; i < 30; ++i) CHECK(positions[i] == i);
  return 0;
}
