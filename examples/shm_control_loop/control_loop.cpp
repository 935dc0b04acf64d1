// A 100 Hz control loop in its own process reading LLM answers from pydisco's shared-memory
// ring. No Python: it includes pydisco/shm_ring.hpp and links pydisco::core (header-only).
//
//   control_loop RING [--hz 100] [--seconds 30] [--answers N] [--realtime PRIORITY] [--quiet]
//
// Each tick sleeps to an absolute deadline (start + k·period, so no drift), takes whatever
// records are there without ever blocking (ShmRingReader::poll), then does its control work.
// It survives the runtime's death and restart: poll() reports the loss and re-attaches to the
// next producer by itself. Output: one JSON line per event and per finished answer, and a
// summary with the tick lateness (wake-up minus deadline) percentiles.
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "pydisco/shm_ring.hpp"

namespace {

struct Options {
  const char* ring = nullptr;
  double hz = 100.0;
  double seconds = 30.0;
  long answers = 0;  // stop after this many answers (0: run for `seconds`)
  int realtime = 0;
  bool quiet = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "control_loop: %s needs a value\n", argv[i]);
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--hz") o.hz = std::atof(value());
    else if (a == "--seconds") o.seconds = std::atof(value());
    else if (a == "--answers") o.answers = std::atol(value());
    else if (a == "--realtime") o.realtime = std::atoi(value());
    else if (a == "--quiet") o.quiet = true;
    else if (!a.empty() && a[0] != '-' && o.ring == nullptr) o.ring = argv[i];
    else {
      std::fprintf(stderr, "control_loop: unknown argument %s\n", argv[i]);
      std::exit(2);
    }
  }
  if (o.ring == nullptr || !(o.hz > 0) || !(o.seconds > 0)) {
    std::fprintf(stderr,
                 "usage: control_loop RING [--hz 100] [--seconds 30] [--answers N] "
                 "[--realtime PRIORITY] [--quiet]\n");
    std::exit(2);
  }
  return o;
}

std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

double percentile_us(std::vector<std::int64_t> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const auto i = static_cast<std::size_t>(std::ceil(q * static_cast<double>(v.size()))) - 1;
  return static_cast<double>(v[std::min(i, v.size() - 1)]) / 1e3;
}

// Stand-in for the controller's own work: a PID step on a simulated plant.
struct Controller {
  double position = 0, integral = 0, previous_error = 0, target = 1.0;
  void step(double dt) {
    const double error = target - position;
    integral += error * dt;
    const double derivative = (error - previous_error) / dt;
    previous_error = error;
    position += (2.0 * error + 0.5 * integral + 0.05 * derivative) * dt;
  }
};

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  if (opt.realtime > 0) {
    sched_param p{};
    p.sched_priority = opt.realtime;
    const bool granted = ::sched_setscheduler(0, SCHED_FIFO, &p) == 0;
    std::printf("{\"event\": \"realtime\", \"granted\": %s}\n", granted ? "true" : "false");
  }

  pydisco::ShmRingReader reader(opt.ring);
  Controller controller;
  const auto period_ns = static_cast<std::int64_t>(1e9 / opt.hz);
  const std::int64_t start = pydisco::now_ns() + period_ns;
  const std::int64_t stop = start + static_cast<std::int64_t>(opt.seconds * 1e9);
  std::vector<std::int64_t> lateness;
  lateness.reserve(static_cast<std::size_t>(opt.seconds * opt.hz) + 1);
  std::string text;  // the answer being received
  std::uint64_t tokens = 0;
  long answers = 0;
  std::uint64_t missed_ticks = 0;

  std::int64_t deadline = start;
  while (deadline < stop && (opt.answers == 0 || answers < opt.answers)) {
    const timespec ts = pydisco::to_timespec(deadline);
    while (::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
    }
    const std::int64_t woke = pydisco::now_ns();
    lateness.push_back(woke - deadline);

    // Take what is there; never wait. Bounded, so a burst cannot stretch one tick.
    pydisco::TokenRecord r;
    for (int taken = 0; taken < 256; ++taken) {
      const pydisco::ShmEvent e = reader.poll(r);
      if (e == pydisco::ShmEvent::kNone) break;
      switch (e) {
        case pydisco::ShmEvent::kRecord:
          if (r.is_end()) {
            ++answers;
            std::printf("{\"answer\": %ld, \"finish\": \"%s\", \"tokens\": %llu, \"text\": %s}\n",
                        answers, std::string(pydisco::to_string(r.finish_reason())).c_str(),
                        static_cast<unsigned long long>(tokens), json_string(text).c_str());
            std::fflush(stdout);
            text.clear();
            tokens = 0;
          } else {
            text.append(r.text_view());
            ++tokens;
            if (!opt.quiet) {
              std::printf("{\"token\": %llu, \"text\": %s}\n",
                          static_cast<unsigned long long>(r.position), json_string(r.text_view()).c_str());
            }
          }
          break;
        case pydisco::ShmEvent::kAttached:
          std::printf("{\"event\": \"attached\", \"generation\": %llu, \"producer_pid\": %d}\n",
                      static_cast<unsigned long long>(reader.generation()), reader.producer_pid());
          std::fflush(stdout);
          break;
        case pydisco::ShmEvent::kProducerLost:
          std::printf("{\"event\": \"producer_lost\", \"partial_tokens\": %llu}\n",
                      static_cast<unsigned long long>(tokens));
          std::fflush(stdout);
          text.clear();  // an answer cut by the producer's death: no end record will come
          tokens = 0;
          break;
        case pydisco::ShmEvent::kRefused:
          std::printf("{\"event\": \"refused\", \"error\": %s}\n", json_string(reader.error()).c_str());
          std::fflush(stdout);
          break;
        case pydisco::ShmEvent::kNone: break;
      }
    }

    controller.step(static_cast<double>(period_ns) / 1e9);

    deadline += period_ns;
    const std::int64_t now = pydisco::now_ns();
    if (now > deadline) {  // overran one or more ticks: skip them, keep the grid
      const std::int64_t behind = (now - deadline) / period_ns + 1;
      missed_ticks += static_cast<std::uint64_t>(behind);
      deadline += behind * period_ns;
    }
  }

  std::printf(
      "{\"summary\": {\"ticks\": %zu, \"missed_ticks\": %llu, \"answers\": %ld, "
      "\"tick_lateness_p50_us\": %.1f, \"tick_lateness_p99_us\": %.1f, \"tick_lateness_max_us\": %.1f}}\n",
      lateness.size(), static_cast<unsigned long long>(missed_ticks), answers,
      percentile_us(lateness, 0.50), percentile_us(lateness, 0.99), percentile_us(lateness, 1.0));
  return 0;
}
