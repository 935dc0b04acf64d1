#include "check.hpp"
#include "pydisco/pace_schedule.hpp"

using pydisco::Deadline;
using pydisco::MissPolicy;
using pydisco::PaceSchedule;

// Releases a token available at `available` exactly `late` ns after its deadline.
static Deadline release(PaceSchedule& s, std::int64_t available, std::int64_t late = 0) {
  const Deadline d = s.next(available);
  s.on_released(d, d.effective + late);
  return d;
}

static void first_token_goes_out_when_available() {
  PaceSchedule s(10, MissPolicy::kDelay);
  CHECK(release(s, 1000).effective == 1000);
}

static void fixed_interval_has_no_drift() {
  PaceSchedule s(10, MissPolicy::kDelay);
  release(s, 0);
  for (int i = 1; i <= 1000; ++i) {
    // the pacer itself is 3 ns late every time; the grid must not move
    CHECK(release(s, 0, 3).effective == 10 * i);
  }
}

static void late_producer_reanchors_under_delay() {
  PaceSchedule s(10, MissPolicy::kDelay);
  release(s, 0);
  release(s, 0);                       // 10
  CHECK(release(s, 55).effective == 55);  // producer late: deadline = availability
  CHECK(release(s, 55).effective == 65);  // no burst: one interval after
}

static void catch_up_bursts_back_to_the_grid() {
  PaceSchedule s(10, MissPolicy::kCatchUp);
  release(s, 0);
  CHECK(release(s, 55).effective == 55);  // nominal 10
  CHECK(release(s, 55).effective == 55);  // nominal 20: burst
  CHECK(release(s, 55).effective == 55);  // 30
  CHECK(release(s, 55).effective == 55);  // 40
  CHECK(release(s, 55).effective == 55);  // 50
  CHECK(release(s, 55).effective == 60);  // back on the grid
}

static void skip_keeps_the_grid_without_burst() {
  PaceSchedule s(10, MissPolicy::kSkip);
  release(s, 0);
  CHECK(release(s, 55).effective == 55);  // nominal 10, released at 55
  CHECK(release(s, 0).effective == 60);   // 20..50 skipped
  CHECK(s.next(0).effective == 70);       // released on time at 60: the next slot
}

static void rate_change_applies_from_the_next_token() {
  PaceSchedule s(10, MissPolicy::kDelay);
  release(s, 0);
  release(s, 0);  // 10
  s.set_interval(100);
  CHECK(release(s, 0).effective == 110);
  s.set_interval(0);
  CHECK(release(s, 111).effective == 111);  // as soon as available
  CHECK_THROWS(s.set_interval(-1), std::invalid_argument);
}

static void reset_starts_a_new_answer() {
  PaceSchedule s(10, MissPolicy::kDelay);
  release(s, 0);
  s.reset();
  CHECK(release(s, 5).effective == 5);
}

int main() {
  first_token_goes_out_when_available();
  fixed_interval_has_no_drift();
  late_producer_reanchors_under_delay();
  catch_up_bursts_back_to_the_grid();
  skip_keeps_the_grid_without_burst();
  rate_change_applies_from_the_next_token();
  reset_starts_a_new_answer();
  return 0;
}
