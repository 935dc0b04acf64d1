#include <pybind11/native_enum.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "bindings.hpp"
#include "pydisco/clock.hpp"
#include "pydisco/migration.hpp"

namespace py = pybind11;

namespace pydisco::bindings {
namespace {

std::int64_t or_now(std::optional<std::int64_t> t) { return t ? *t : now_ns(); }

}  // namespace

void register_migration(py::module_& m) {
  py::native_enum<MigrationState>(m, "MigrationState", "enum.Enum")
      .value("IDLE", MigrationState::kIdle)
      .value("RACING", MigrationState::kRacing)
      .value("STREAMING", MigrationState::kStreaming)
      .value("PREPARING", MigrationState::kPreparing)
      .value("HANDING_OVER", MigrationState::kHandingOver)
      .value("RECOVERING", MigrationState::kRecovering)
      .value("FINISHED", MigrationState::kFinished)
      .value("FAILED", MigrationState::kFailed)
      .value("CANCELLED", MigrationState::kCancelled)
      .finalize();

  py::native_enum<MigrationEvent>(m, "MigrationEvent", "enum.Enum")
      .value("START", MigrationEvent::kStart)
      .value("RACE", MigrationEvent::kRace)
      .value("WON", MigrationEvent::kWon)
      .value("RACER_FAILED", MigrationEvent::kRacerFailed)
      .value("LAST_RACER_FAILED", MigrationEvent::kLastRacerFailed)
      .value("PREPARE", MigrationEvent::kPrepare)
      .value("TARGET_READY", MigrationEvent::kTargetReady)
      .value("TAKEN_OVER", MigrationEvent::kTakenOver)
      .value("TARGET_FAILED", MigrationEvent::kTargetFailed)
      .value("SOURCE_FAILED", MigrationEvent::kSourceFailed)
      .value("RESUME", MigrationEvent::kResume)
      .value("FINISH", MigrationEvent::kFinish)
      .value("CANCEL", MigrationEvent::kCancel)
      .value("GIVE_UP", MigrationEvent::kGiveUp)
      .finalize();

  py::native_enum<EndpointRole>(m, "EndpointRole", "enum.Enum")
      .value("NONE", EndpointRole::kNone)
      .value("RACER", EndpointRole::kRacer)
      .value("SOURCE", EndpointRole::kSource)
      .value("TARGET", EndpointRole::kTarget)
      .value("STANDBY", EndpointRole::kStandby)
      .value("STOPPED", EndpointRole::kStopped)
      .value("FAILED", EndpointRole::kFailed)
      .finalize();

  py::native_enum<OfferResult>(m, "OfferResult", "enum.Enum")
      .value("COMMITTED", OfferResult::kCommitted)
      .value("DUPLICATE", OfferResult::kDuplicate)
      .value("AHEAD", OfferResult::kAhead)
      .value("NOT_ACTIVE", OfferResult::kNotActive)
      .value("CLOSED", OfferResult::kClosed)
      .value("BACKPRESSURE", OfferResult::kBackpressure)
      .finalize();

  py::register_exception<IllegalTransition>(m, "IllegalTransition", PyExc_RuntimeError);

  py::class_<EndpointCounters>(m, "EndpointCounters")
      .def_readonly("role", &EndpointCounters::role)
      .def_readonly("offered", &EndpointCounters::offered)
      .def_readonly("accepted", &EndpointCounters::accepted)
      .def_readonly("dropped", &EndpointCounters::dropped)
      .def_readonly("duplicates", &EndpointCounters::duplicates)
      .def_readonly("started_at_position", &EndpointCounters::started_at_position);

  py::class_<CommitRecord>(
      m, "CommitRecord",
      "One committed token. Its text is committed_text's UTF-8 bytes "
      "[text_begin, text_begin + text_len): committed_text.encode()[text_begin:][:text_len].")
      .def_readonly("position", &CommitRecord::position)
      .def_readonly("token_id", &CommitRecord::token_id)
      .def_readonly("source", &CommitRecord::source)
      .def_readonly("produced_ns", &CommitRecord::produced_ns)
      .def_readonly("arrived_ns", &CommitRecord::arrived_ns)
      .def_readonly("text_begin", &CommitRecord::text_begin)
      .def_readonly("text_len", &CommitRecord::text_len);

  py::class_<TransitionRecord>(m, "TransitionRecord")
      .def_readonly("at_ns", &TransitionRecord::at_ns)
      .def_readonly("from_state", &TransitionRecord::from)
      .def_readonly("event", &TransitionRecord::event)
      .def_readonly("to_state", &TransitionRecord::to)
      .def_readonly("position", &TransitionRecord::position)
      .def_readonly("endpoint", &TransitionRecord::endpoint);

  const auto now = py::arg("now_ns") = py::none();
  py::class_<MigrationMachine>(
      m, "MigrationMachine",
      "One answer's single writer: commits endpoint offers exactly once and in order.")
      .def(py::init<std::shared_ptr<TokenRing>, std::optional<std::uint64_t>, std::uint64_t>(),
           py::arg("output"), py::arg("max_tokens") = py::none(), py::arg("start_position") = 0,
           py::keep_alive<1, 2>(),
           "max_tokens bounds the whole answer (default: start_position + output.capacity - 1, "
           "all the ring holds beside the end record); the machine ends the answer with LENGTH "
           "when it commits position max_tokens - 1.")
      .def_static("transition_table", [] {
        std::vector<std::tuple<MigrationState, MigrationEvent, MigrationState>> rows;
        for (const Transition& t : kTable) rows.emplace_back(t.from, t.event, t.to);
        return rows;
      })
      .def("start", [](MigrationMachine& mm, EndpointId ep, std::optional<std::int64_t> t) {
             mm.start(ep, or_now(t));
           }, py::arg("endpoint"), now)
      .def("race", [](MigrationMachine& mm, const std::vector<EndpointId>& eps,
                      std::optional<std::int64_t> t) { mm.race(eps, or_now(t)); },
           py::arg("endpoints"), now)
      .def("prepare", [](MigrationMachine& mm, EndpointId ep, std::optional<std::int64_t> t) {
             mm.prepare(ep, or_now(t));
           }, py::arg("target"), now)
      .def("target_ready", [](MigrationMachine& mm, std::optional<std::int64_t> t) {
             return mm.target_ready(or_now(t));
           }, now, "The source stops; returns the position the target must resume from.")
      .def("endpoint_failed",
           [](MigrationMachine& mm, EndpointId ep, std::optional<std::int64_t> t) {
             mm.endpoint_failed(ep, or_now(t));
           }, py::arg("endpoint"), now)
      .def("resume", [](MigrationMachine& mm, EndpointId ep, std::optional<std::int64_t> t) {
             return mm.resume(ep, or_now(t));
           }, py::arg("endpoint"), now)
      .def("cancel", [](MigrationMachine& mm, std::optional<std::int64_t> t) {
             mm.cancel(or_now(t));
           }, now)
      .def("give_up", [](MigrationMachine& mm, std::optional<std::int64_t> t) {
             mm.give_up(or_now(t));
           }, now)
      .def("offer",
           [](MigrationMachine& mm, EndpointId ep, std::uint64_t position, std::int32_t token_id,
              std::string_view text, std::int64_t produced_ns, std::optional<std::int64_t> t) {
             return mm.offer(ep, position, token_id, text, produced_ns, or_now(t));
           },
           py::arg("endpoint"), py::arg("position"), py::arg("token_id"), py::arg("text"),
           py::arg("produced_ns") = 0, now)
      .def("offer_end",
           [](MigrationMachine& mm, EndpointId ep, std::uint64_t position, FinishReason reason,
              std::optional<std::int64_t> t) {
             return mm.offer_end(ep, position, reason, or_now(t));
           },
           py::arg("endpoint"), py::arg("position"), py::arg("reason") = FinishReason::kStop, now,
           "The committer ends the answer at `position` (reason STOP or LENGTH).")
      .def_property_readonly("state", &MigrationMachine::state)
      .def_property_readonly("finish_reason", &MigrationMachine::finish_reason)
      .def_property_readonly("max_tokens", &MigrationMachine::max_tokens)
      .def_property_readonly("committed", &MigrationMachine::committed)
      .def_property_readonly("source", &MigrationMachine::source)
      .def_property_readonly("target", &MigrationMachine::target)
      .def_property_readonly("migrations", &MigrationMachine::migrations)
      .def_property_readonly("last_handover_gap_ns", &MigrationMachine::last_handover_gap_ns)
      .def_property_readonly("committed_token_ids", &MigrationMachine::committed_token_ids)
      .def_property_readonly("committed_text", &MigrationMachine::committed_text)
      .def_property_readonly("output", &MigrationMachine::output)
      .def("commits", &MigrationMachine::commits, "One record per committed token, in order.")
      .def("transitions", &MigrationMachine::transitions)
      .def("counters", &MigrationMachine::counters, py::arg("endpoint"))
      .def("endpoints", &MigrationMachine::endpoints);
}

}  // namespace pydisco::bindings
