// C++ ring throughput across two threads: tokens/s through a TokenRing, consumer batching
// with pop_many. Prints one JSON object. Run by bench/core.py.
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "pydisco/token.hpp"

int main(int argc, char** argv) {
  const std::uint64_t count = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 20'000'000;
  const std::size_t capacity = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 4096;
  pydisco::TokenRing ring(capacity);
  const std::int64_t t0 = pydisco::now_ns();
  std::thread producer([&] {
    pydisco::TokenRecord r;
    (void)r.set_text("token");
    for (std::uint64_t i = 0; i < count; ++i) {
      r.position = i;
      while (!ring.try_push(r)) pydisco::cpu_relax();
    }
  });
  std::uint64_t received = 0;
  std::uint64_t checksum = 0;
  while (received < count) {
    const std::size_t n = ring.pop_many(256, [&](const pydisco::TokenRecord& r) {
      checksum += r.position;
    });
    if (n == 0) pydisco::cpu_relax();
    received += n;
  }
  producer.join();
  const double seconds = static_cast<double>(pydisco::now_ns() - t0) / 1e9;
  const bool ok = checksum == count * (count - 1) / 2;
  std::printf("{\"tokens\": %llu, \"seconds\": %.6f, \"mops\": %.3f, \"ok\": %s}\n",
              static_cast<unsigned long long>(count), seconds,
              static_cast<double>(count) / seconds / 1e6, ok ? "true" : "false");
  return ok ? 0 : 1;
}
