#include <pybind11/native_enum.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <tuple>

#include "bindings.hpp"
#include "pydisco/pace_schedule.hpp"
#include "pydisco/pacer.hpp"

namespace py = pybind11;

namespace pydisco::bindings {

void register_pacer(py::module_& m) {
  py::native_enum<MissPolicy>(m, "MissPolicy", "enum.Enum",
                              "What the schedule does after a missed deadline.")
      .value("DELAY", MissPolicy::kDelay, "re-anchor on the effective deadline (no burst)")
      .value("CATCH_UP", MissPolicy::kCatchUp, "keep the grid, burst until caught up")
      .value("SKIP", MissPolicy::kSkip, "keep the grid, skip missed slots")
      .finalize();

  py::class_<PaceSchedule>(m, "PaceSchedule",
                           "Pure pacing arithmetic: the deadline of each token, no clock inside.")
      .def(py::init<std::int64_t, MissPolicy>(), py::arg("interval_ns") = 0,
           py::arg("policy") = MissPolicy::kDelay)
      .def_property_readonly("interval_ns", &PaceSchedule::interval_ns)
      .def_property_readonly("policy", &PaceSchedule::policy)
      .def_property_readonly("started", &PaceSchedule::started)
      .def("next",
           [](const PaceSchedule& s, std::int64_t available_ns) {
             const Deadline d = s.next(available_ns);
             return std::make_tuple(d.nominal, d.effective);
           },
           py::arg("available_ns"), "(nominal, effective) deadline of the next token.")
      .def("on_released",
           [](PaceSchedule& s, std::int64_t nominal, std::int64_t effective,
              std::int64_t released_ns) { s.on_released({nominal, effective}, released_ns); },
           py::arg("nominal"), py::arg("effective"), py::arg("released_ns"))
      .def("set_interval", &PaceSchedule::set_interval, py::arg("interval_ns"))
      .def("reset", &PaceSchedule::reset);

  py::class_<ReleaseRecord>(m, "ReleaseRecord",
                            "One release the pacer logged; lateness = released_ns - deadline_ns.")
      .def_readonly("position", &ReleaseRecord::position)
      .def_readonly("deadline_ns", &ReleaseRecord::deadline_ns)
      .def_readonly("released_ns", &ReleaseRecord::released_ns)
      .def_property_readonly("is_end",
                             [](const ReleaseRecord& r) { return r.kind == RecordKind::kEnd; });

  py::class_<PacerStatistics>(m, "PacerStatistics")
      .def_readonly("released", &PacerStatistics::released)
      .def_readonly("max_lateness_ns", &PacerStatistics::max_lateness_ns)
      .def_readonly("mean_lateness_ns", &PacerStatistics::mean_lateness_ns)
      .def_readonly("interval_ns", &PacerStatistics::interval_ns)
      .def_readonly("running", &PacerStatistics::running)
      .def_readonly("realtime", &PacerStatistics::realtime)
      .def_readonly("backlog", &PacerStatistics::backlog)
      .def_readonly("unread", &PacerStatistics::unread)
      .def_readonly("lateness_samples_dropped", &PacerStatistics::lateness_samples_dropped);

  py::class_<Pacer, std::shared_ptr<Pacer>>(
      m, "Pacer", "Releases tokens from `input` into `output` on a schedule.",
      py::release_gil_before_calling_cpp_dtor())  // its destructor joins the pacer thread
      .def(py::init([](std::shared_ptr<TokenRing> input, std::shared_ptr<TokenRing> output,
                       std::int64_t interval_ns, MissPolicy policy, std::int64_t spin_ns,
                       std::size_t log_capacity, std::int64_t handoff_lead_ns) {
             PacerOptions options;
             options.interval_ns = interval_ns;
             options.policy = policy;
             options.spin_ns = spin_ns;
             options.log_capacity = log_capacity;
             options.handoff_lead_ns = handoff_lead_ns;
             return std::make_shared<Pacer>(std::move(input), std::move(output), options);
           }),
           py::arg("input"), py::arg("output"), py::arg("interval_ns") = 0,
           py::arg("policy") = MissPolicy::kDelay, py::arg("spin_ns") = 200'000,
           py::arg("log_capacity") = 0, py::arg("handoff_lead_ns") = PacerOptions{}.handoff_lead_ns,
           "log_capacity: release-log entries kept until taken (0: input.capacity). "
           "handoff_lead_ns: wake the consumer this long before each release, so it is awake "
           "when the token lands (0: not).")
      .def_property_readonly("input", &Pacer::input)
      .def_property_readonly("output", &Pacer::output)
      .def_property_readonly("interval_ns", &Pacer::interval_ns)
      .def_property_readonly("running", &Pacer::running)
      .def("set_interval_ns", &Pacer::set_interval_ns, py::arg("interval_ns"))
      .def("set_rate", &Pacer::set_rate, py::arg("tokens_per_second"),
           "Tokens per second from the next token on; 0 releases as soon as available.")
      .def("next_deadline", &Pacer::next_deadline,
           "Manual driver: deadline (ns) of the oldest committed token, or None.")
      .def("release_due", &Pacer::release_due, py::arg("now_ns"),
           "Manual driver: release every record due at now_ns; returns how many.")
      .def("release_all", &Pacer::release_all, py::arg("now_ns"),
           "Manual driver: release every record in the input at now_ns, due or not; returns "
           "how many (fewer only when the output ring is full).")
      .def("reset_schedule", &Pacer::reset_schedule)
      .def("start",
           [](Pacer& p, bool realtime, int priority) { p.start(realtime, priority); },
           py::arg("realtime") = true, py::arg("priority") = 50,
           "Start the driver thread (SCHED_FIFO if `realtime` and permitted).")
      .def("stop", &Pacer::stop, py::call_guard<py::gil_scoped_release>())
      .def("fileno", &Pacer::event_fd, "An eventfd, readable when released tokens are waiting.")
      .def("clear_event", &Pacer::clear_event)
      .def("take_releases", &Pacer::take_releases,
           "Every release (tokens and end records) logged since the last take, in order. "
           "One taker at a time; take_lateness takes from the same log.")
      .def("take_lateness", &Pacer::take_lateness,
           "Lateness (ns) of every token released since the last take, in order.")
      .def("statistics", &Pacer::statistics);
}

}  // namespace pydisco::bindings
