// When each token may be released: pure arithmetic on (token availability, interval, policy).
// No clock of its own — the caller passes times in — so it is tested without real time and
// drives both the real-time pacer thread and a virtual-time driver.
//
// Deadline of token i (i > 0), with `nominal_i` from the policy and `available_i` the time it
// was committed:   deadline_i = max(nominal_i, available_i).   Token 0: deadline = available.
// Lateness of a release = release time - deadline.
//
// Missed-deadline policies (what nominal_{i+1} is after token i was released at t_i):
//   kDelay   (default)  deadline_i + interval   Re-anchor on the effective deadline: a late
//                                                producer shifts the schedule (no burst, the
//                                                reader never gets tokens faster than the rate)
//                                                but the pacer's own lateness never drifts it.
//   kCatchUp            nominal_i + interval    A fixed grid: after a stall, tokens go out
//                                                back to back until the grid is caught up.
//   kSkip               first grid point > t_i  A fixed grid, but missed slots are skipped.
// An interval of 0 releases each token as soon as it is available.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace pydisco {

enum class MissPolicy : std::uint8_t { kDelay = 0, kCatchUp = 1, kSkip = 2 };

struct Deadline {
  std::int64_t nominal = 0;    // where the schedule puts the token
  std::int64_t effective = 0;  // max(nominal, availability): when it may really go out
};

class PaceSchedule {
 public:
  explicit PaceSchedule(std::int64_t interval_ns = 0, MissPolicy policy = MissPolicy::kDelay)
      : interval_(check_interval(interval_ns)), policy_(policy) {}

  std::int64_t interval_ns() const noexcept { return interval_; }
  MissPolicy policy() const noexcept { return policy_; }
  bool started() const noexcept { return started_; }

  // Deadline of the next token, given when it became available.
  Deadline next(std::int64_t available_ns) const noexcept {
    if (!started_) return {available_ns, available_ns};
    return {next_nominal_, std::max(next_nominal_, available_ns)};
  }

  // Records that the token with deadline `d` was released at `released_ns`.
  void on_released(Deadline d, std::int64_t released_ns) noexcept {
    started_ = true;
    last_ = d;
    last_release_ = released_ns;
    advance();
  }

  // A rate change applies from the next token: its nominal deadline is re-based on the last
  // released token with the new interval.
  void set_interval(std::int64_t interval_ns) {
    interval_ = check_interval(interval_ns);
    if (started_) advance();
  }

  // Starts a new answer: the next token goes out as soon as it is available.
  void reset() noexcept { started_ = false; }

 private:
  static std::int64_t check_interval(std::int64_t ns) {
    if (ns < 0) throw std::invalid_argument("pacing interval must be >= 0");
    return ns;
  }

  void advance() noexcept {
    switch (policy_) {
      case MissPolicy::kDelay:
        next_nominal_ = last_.effective + interval_;
        break;
      case MissPolicy::kCatchUp:
        next_nominal_ = last_.nominal + interval_;
        break;
      case MissPolicy::kSkip:
        next_nominal_ = last_.nominal + interval_;
        if (interval_ > 0 && next_nominal_ <= last_release_) {
          const std::int64_t missed = (last_release_ - last_.nominal) / interval_;
          next_nominal_ = last_.nominal + (missed + 1) * interval_;
        }
        break;
    }
  }

  std::int64_t interval_;
  MissPolicy policy_;
  bool started_ = false;
  Deadline last_{};
  std::int64_t last_release_ = 0;
  std::int64_t next_nominal_ = 0;
};

}  // namespace pydisco
