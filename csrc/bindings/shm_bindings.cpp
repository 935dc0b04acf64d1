// Python side of the shared-memory ring (shm_ring.hpp, shm_forwarder.hpp): the runtime's
// process creates the producer and forwards answers into it; a Python consumer (tests, tools)
// reads it with ShmRingReader, as a C++ process would.
#include <poll.h>

#include <pybind11/native_enum.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <memory>
#include <optional>
#include <string>

#include "bindings.hpp"
#include "pydisco/shm_forwarder.hpp"
#include "pydisco/shm_ring.hpp"

namespace py = pybind11;

namespace pydisco::bindings {
namespace {

std::int64_t seconds_to_ns(double s, const char* what) {
  if (!(s >= 0)) throw py::value_error(std::string(what) + " must be >= 0");
  return static_cast<std::int64_t>(s * 1e9);
}

std::int64_t deadline_after(std::optional<double> timeout_s) {
  if (!timeout_s) return -1;
  return now_ns() + seconds_to_ns(*timeout_s, "timeout");
}

// What one poll or wait of a reader saw.
struct ShmReading {
  ShmEvent event = ShmEvent::kNone;
  std::optional<TokenRecord> token;
  std::string message;
};

ShmReading reading(ShmEvent e, const TokenRecord& r, const ShmRingReader& reader) {
  ShmReading out;
  out.event = e;
  if (e == ShmEvent::kRecord) out.token = r;
  if (e == ShmEvent::kRefused) out.message = reader.error();
  return out;
}

void check_writer(const ShmRingProducer& p) {
  if (p.writer_claimed())
    throw std::logic_error("shm ring '" + p.name() + "' is being written by a forwarder");
}

}  // namespace

void register_shm(py::module_& m) {
  py::register_exception<ShmRingError>(m, "ShmRingError", PyExc_RuntimeError);
  m.attr("SHM_LAYOUT_VERSION") = kShmRingLayoutVersion;

  py::class_<ShmRingProducer, std::shared_ptr<ShmRingProducer>>(
      m, "ShmRingProducer",
      "The producer side of a named shared-memory token ring (POSIX shm). It owns the name "
      "while it lives; a consumer in another process attaches by name. One thread writes.")
      .def(py::init([](const std::string& name, std::size_t capacity, unsigned mode) {
             return std::make_shared<ShmRingProducer>(name, capacity, static_cast<mode_t>(mode));
           }),
           py::arg("name"), py::arg("capacity") = 1024, py::arg("mode") = 0600)
      .def_property_readonly("name", &ShmRingProducer::name, "The shm name, with its leading '/'.")
      .def_property_readonly("generation", &ShmRingProducer::generation,
                             "1 for a name's first producer, one more per restart.")
      .def_property_readonly("capacity", &ShmRingProducer::capacity)
      .def_property_readonly("closed", &ShmRingProducer::closed)
      .def_property_readonly("consumer_attached", &ShmRingProducer::consumer_attached)
      .def_property_readonly("owes_end", &ShmRingProducer::owes_end,
                             "An end record is waiting for room (it goes before the next push).")
      .def(
          "try_push",
          [](ShmRingProducer& p, std::uint64_t position, std::int32_t token_id,
             std::string_view text, EndpointId source, std::int64_t produced_ns,
             std::optional<std::int64_t> arrived_ns) {
            check_writer(p);
            TokenRecord::check_text(text);
            TokenRecord r;
            r.position = position;
            r.token_id = token_id;
            r.source = source;
            r.produced_ns = produced_ns;
            r.arrived_ns = arrived_ns ? *arrived_ns : now_ns();
            (void)r.set_text(text);
            return p.try_push(r);
          },
          py::arg("position"), py::arg("token_id"), py::arg("text"), py::arg("source") = 0,
          py::arg("produced_ns") = 0, py::arg("arrived_ns") = py::none(),
          "Push one token; False when the ring is full (counted) or closed.")
      .def(
          "try_push_end",
          [](ShmRingProducer& p, std::uint64_t count, FinishReason reason, EndpointId source) {
            check_writer(p);
            if (reason == FinishReason::kNone) throw py::value_error("an end record needs a finish reason");
            return p.try_push(TokenRecord::end_of_answer(count, reason, source, now_ns()));
          },
          py::arg("count"), py::arg("reason"), py::arg("source") = 0,
          "Push an answer's end record (`count` tokens, ended for `reason`).")
      .def(
          "try_push_record",
          [](ShmRingProducer& p, const TokenRecord& record) {
            check_writer(p);
            return p.try_push(record);
          },
          py::arg("record"), "Push a Token (or end record) as another ring carried it.")
      .def("heartbeat", &ShmRingProducer::heartbeat)
      .def("close", &ShmRingProducer::close,
           "The consumer reads what is left, then sees the producer gone. The name stays.")
      .def("statistics", &ShmRingProducer::statistics)
      .def("__enter__", [](std::shared_ptr<ShmRingProducer> p) { return p; })
      .def("__exit__", [](ShmRingProducer& p, py::args) { p.close(); });

  m.def("unlink_shm_ring", &ShmRingProducer::unlink, py::arg("name"),
        "Remove a ring's name (mappings stay valid). False when there was none.");

  py::native_enum<ShmEvent>(m, "ShmEvent", "enum.Enum", "What a ShmRingReader saw.")
      .value("NONE", ShmEvent::kNone, "nothing now")
      .value("RECORD", ShmEvent::kRecord, "a token or an end record (reading.token)")
      .value("ATTACHED", ShmEvent::kAttached, "attached to a (new) producer: see generation")
      .value("PRODUCER_LOST", ShmEvent::kProducerLost,
             "the producer died or closed; all it published was read")
      .value("REFUSED", ShmEvent::kRefused,
             "a ring is there but cannot be read (reading.message says why)")
      .finalize();

  py::class_<ShmReading>(m, "ShmReading", "What one poll or wait of a ShmRingReader saw.")
      .def_readonly("event", &ShmReading::event)
      .def_readonly("token", &ShmReading::token)
      .def_readonly("message", &ShmReading::message)
      .def("__repr__", [](const ShmReading& r) {
        return "ShmReading(" + std::string(py::str(py::cast(r.event))) +
               (r.token ? ", " + std::string(py::repr(py::cast(*r.token))) : "") +
               (r.message.empty() ? "" : ", " + std::string(py::repr(py::str(r.message)))) + ")";
      });

  py::class_<ShmRingReader>(
      m, "ShmRingReader",
      "A consumer of a named shared-memory ring that (re-)attaches by name: poll() never "
      "blocks; wait() blocks without the GIL. One thread uses it.")
      .def(py::init([](const std::string& name, double reattach_interval, double liveness_interval) {
             return std::make_unique<ShmRingReader>(
                 name, ShmReaderOptions{
                           .reattach_interval_ns = seconds_to_ns(reattach_interval, "reattach_interval"),
                           .liveness_interval_ns = seconds_to_ns(liveness_interval, "liveness_interval")});
           }),
           py::arg("name"), py::arg("reattach_interval") = 0.01, py::arg("liveness_interval") = 0.01)
      .def(
          "poll",
          [](ShmRingReader& reader) {
            TokenRecord r;
            const ShmEvent e = reader.poll(r);
            return reading(e, r, reader);
          },
          "The next event without blocking (NONE when there is nothing).")
      .def(
          "wait",
          [](ShmRingReader& reader, std::optional<double> timeout) {
            const std::int64_t deadline = deadline_after(timeout);
            TokenRecord r;
            ShmEvent e;
            {
              py::gil_scoped_release nogil;
              e = reader.wait(r, deadline);
            }
            return reading(e, r, reader);
          },
          py::arg("timeout") = py::none(),
          "Block (without the GIL) until an event or the timeout (NONE then).")
      .def_property_readonly("name", &ShmRingReader::name)
      .def_property_readonly("attached", &ShmRingReader::attached)
      .def_property_readonly("generation", &ShmRingReader::generation,
                             "The generation of the producer attached last (0: never).")
      .def_property_readonly("producer_pid", &ShmRingReader::producer_pid)
      .def_property_readonly("error", &ShmRingReader::error,
                             "Why the ring was last refused ('' once attached).")
      .def("detach", &ShmRingReader::detach);

  py::class_<ShmForwarder>(
      m, "ShmForwarder",
      "One answer into a ShmRingProducer, up to and including the end record: the answer's "
      "pacer pushes each release into the shm ring from its own thread (see docs/embedding.md).",
      py::release_gil_before_calling_cpp_dtor())  // its destructor stops the forwarding
      .def(py::init<std::shared_ptr<Pacer>, std::shared_ptr<ShmRingProducer>>(), py::arg("pacer"),
           py::arg("producer"),
           "Redirect `pacer` into `producer`: nobody else may read the pacer's output ring.")
      .def("stop", &ShmForwarder::stop, py::call_guard<py::gil_scoped_release>(),
           "Stop; an unfinished answer is still ended in the shm ring (cancelled).")
      .def(
          "join",
          [](ShmForwarder& f, std::optional<double> timeout) {
            const int ms = timeout ? static_cast<int>(seconds_to_ns(*timeout, "timeout") / 1'000'000) : -1;
            py::gil_scoped_release nogil;
            pollfd p{f.event_fd(), POLLIN, 0};
            while (!f.finished()) {
              const int rc = ::poll(&p, 1, ms);
              if (rc == 0) break;
              if (rc < 0 && errno != EINTR) break;
            }
            return f.finished();
          },
          py::arg("timeout") = py::none(),
          "Wait (without the GIL) until the end record is forwarded; False on timeout.")
      .def("fileno", &ShmForwarder::event_fd, "An eventfd, readable once finished.")
      .def_property_readonly("finished", &ShmForwarder::finished)
      .def_property_readonly("forwarded", &ShmForwarder::forwarded, "Tokens forwarded (not the end).")
      .def_property_readonly("read", &ShmForwarder::read,
                             "Of the tokens forwarded, how many the other process has read.")
      .def_property_readonly("stranded", &ShmForwarder::stranded,
                             "Tokens released after stop(), dropped: the answer was abandoned.");
}

}  // namespace pydisco::bindings
