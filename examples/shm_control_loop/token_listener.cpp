// A thread that reacts to each token the moment it arrives from pydisco's shared-memory ring
// (blocked in ShmRingReader::wait, woken by the producer's futex), and measures how long each
// took from the pacer's release in the runtime's process to here.
//
//   token_listener RING [--answers N] [--seconds 60] [--realtime PRIORITY]
//
// Prints one JSON summary line: tokens received, latency percentiles (µs) from release
// (TokenRecord::released_ns, CLOCK_MONOTONIC, the same clock in every process) to receipt.
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "pydisco/shm_ring.hpp"

namespace {

double percentile_us(std::vector<std::int64_t>& v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const auto i = static_cast<std::size_t>(std::ceil(q * static_cast<double>(v.size()))) - 1;
  return static_cast<double>(v[std::min(i, v.size() - 1)]) / 1e3;
}

}  // namespace

int main(int argc, char** argv) {
  const char* ring = nullptr;
  long answers_wanted = 1;
  double seconds = 60;
  int realtime = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if ((a == "--answers" || a == "--seconds" || a == "--realtime") && i + 1 < argc) {
      const char* v = argv[++i];
      if (a == "--answers") answers_wanted = std::atol(v);
      else if (a == "--seconds") seconds = std::atof(v);
      else realtime = std::atoi(v);
    } else if (!a.empty() && a[0] != '-' && ring == nullptr) {
      ring = argv[i];
    } else {
      std::fprintf(stderr, "usage: token_listener RING [--answers N] [--seconds S] [--realtime PRIORITY]\n");
      return 2;
    }
  }
  if (ring == nullptr) {
    std::fprintf(stderr, "usage: token_listener RING [--answers N] [--seconds S] [--realtime PRIORITY]\n");
    return 2;
  }
  bool granted = false;
  if (realtime > 0) {
    sched_param p{};
    p.sched_priority = realtime;
    granted = ::sched_setscheduler(0, SCHED_FIFO, &p) == 0;
  }

  pydisco::ShmRingReader reader(ring);
  std::vector<std::int64_t> latency;
  latency.reserve(1 << 16);
  long answers = 0;
  const std::int64_t stop = pydisco::now_ns() + static_cast<std::int64_t>(seconds * 1e9);
  pydisco::TokenRecord r;
  while (answers < answers_wanted) {
    const pydisco::ShmEvent e = reader.wait(r, stop);
    const std::int64_t received = pydisco::now_ns();
    if (e == pydisco::ShmEvent::kNone) break;  // out of time
    if (e == pydisco::ShmEvent::kRefused) {
      std::fprintf(stderr, "token_listener: %s\n", reader.error().c_str());
      return 1;
    }
    if (e != pydisco::ShmEvent::kRecord) continue;
    if (r.is_end()) {
      ++answers;
    } else if (r.released_ns > 0) {
      latency.push_back(received - r.released_ns);
    }
  }
  std::printf(
      "{\"tokens\": %zu, \"answers\": %ld, \"realtime\": %s, \"latency_p50_us\": %.2f, "
      "\"latency_p99_us\": %.2f, \"latency_max_us\": %.2f}\n",
      latency.size(), answers, granted ? "true" : "false", percentile_us(latency, 0.5),
      percentile_us(latency, 0.99), percentile_us(latency, 1.0));
  return answers >= answers_wanted ? 0 : 1;
}
