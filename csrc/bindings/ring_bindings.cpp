#include <pybind11/native_enum.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bindings.hpp"
#include "pydisco/clock.hpp"
#include "pydisco/token.hpp"

namespace py = pybind11;

namespace pydisco::bindings {
namespace {

std::int64_t deadline_from_timeout(std::optional<double> timeout_s) {
  if (!timeout_s) return -1;
  if (*timeout_s < 0) throw py::value_error("timeout must be >= 0");
  return now_ns() + static_cast<std::int64_t>(*timeout_s * 1e9);
}

TokenRecord make_record(std::uint64_t position, std::int32_t token_id, std::string_view text,
                        EndpointId source, std::int64_t produced_ns,
                        std::optional<std::int64_t> arrived_ns) {
  TokenRecord r;
  r.position = position;
  r.token_id = token_id;
  r.source = source;
  r.produced_ns = produced_ns;
  r.arrived_ns = arrived_ns ? *arrived_ns : now_ns();
  TokenRecord::check_text(text);
  [[maybe_unused]] const bool fits = r.set_text(text);
  return r;
}

// What pop_many returns: one Python object for a whole batch, so moving tokens into Python
// costs a memcpy each instead of an object each. Tokens materialise only when indexed.
struct TokenBatch {
  std::vector<TokenRecord> tokens;
};

}  // namespace

void register_ring(py::module_& m) {
  py::native_enum<FinishReason>(m, "FinishReason", "enum.Enum", "Why an answer ended.")
      .value("NONE", FinishReason::kNone, "not ended (on a Token: it is a token, not the end)")
      .value("STOP", FinishReason::kStop, "the committing endpoint ended it")
      .value("LENGTH", FinishReason::kLength, "max_tokens reached")
      .value("FAILED", FinishReason::kFailed, "no endpoint could continue")
      .value("CANCELLED", FinishReason::kCancelled)
      .finalize();

  py::class_<TokenRecord>(
      m, "Token",
      "One committed token as the ring carries it (read-only), or the answer's end record "
      "(is_end: position is the token count, finish_reason says why, text is empty).")
      .def_readonly("position", &TokenRecord::position)
      .def_readonly("token_id", &TokenRecord::token_id)
      .def_readonly("source", &TokenRecord::source)
      .def_readonly("produced_ns", &TokenRecord::produced_ns)
      .def_readonly("arrived_ns", &TokenRecord::arrived_ns)
      .def_readonly("released_ns", &TokenRecord::released_ns)
      .def_property_readonly("text", [](const TokenRecord& r) {
        return py::str(r.text, r.text_len);
      })
      .def_property_readonly("is_end", &TokenRecord::is_end)
      .def_property_readonly("finish_reason", &TokenRecord::finish_reason)
      .def("__repr__", [](const TokenRecord& r) {
        if (r.is_end())
          return "Token(end, position=" + std::to_string(r.position) + ", finish_reason=" +
                 std::string(to_string(r.finish_reason())) +
                 ", source=" + std::to_string(r.source) + ")";
        return "Token(position=" + std::to_string(r.position) +
               ", token_id=" + std::to_string(r.token_id) + ", text=" +
               std::string(py::repr(py::str(r.text, r.text_len))) +
               ", source=" + std::to_string(r.source) + ")";
      });
  m.attr("TOKEN_TEXT_CAPACITY") = TokenRecord::kTextCapacity;

  py::class_<RingStatistics>(m, "RingStatistics")
      .def_readonly("capacity", &RingStatistics::capacity)
      .def_readonly("size", &RingStatistics::size)
      .def_readonly("pushed", &RingStatistics::pushed)
      .def_readonly("popped", &RingStatistics::popped)
      .def_readonly("rejected", &RingStatistics::rejected)
      .def_readonly("high_water", &RingStatistics::high_water)
      .def("__repr__", [](const RingStatistics& s) {
        return "RingStatistics(capacity=" + std::to_string(s.capacity) +
               ", size=" + std::to_string(s.size) + ", pushed=" + std::to_string(s.pushed) +
               ", popped=" + std::to_string(s.popped) +
               ", rejected=" + std::to_string(s.rejected) +
               ", high_water=" + std::to_string(s.high_water) + ")";
      });

  py::class_<TokenBatch>(m, "TokenBatch",
                         "Tokens taken from a ring in one call, oldest first. A sequence of Token.")
      .def("__len__", [](const TokenBatch& b) { return b.tokens.size(); })
      .def("__bool__", [](const TokenBatch& b) { return !b.tokens.empty(); })
      .def("__getitem__",
           [](const TokenBatch& b, std::ptrdiff_t i) {
             const auto n = static_cast<std::ptrdiff_t>(b.tokens.size());
             if (i < 0) i += n;
             if (i < 0 || i >= n) throw py::index_error("token index out of range");
             return b.tokens[static_cast<std::size_t>(i)];
           })
      .def("__iter__",
           [](const TokenBatch& b) { return py::make_iterator(b.tokens.begin(), b.tokens.end()); },
           py::keep_alive<0, 1>())
      .def_property_readonly("text",
                             [](const TokenBatch& b) {
                               std::string s;
                               for (const TokenRecord& r : b.tokens) s.append(r.text_view());
                               return py::str(s);
                             },
                             "The batch's text pieces joined.")
      .def_property_readonly("positions",
                             [](const TokenBatch& b) {
                               std::vector<std::uint64_t> v;
                               v.reserve(b.tokens.size());
                               for (const TokenRecord& r : b.tokens) v.push_back(r.position);
                               return v;
                             })
      .def_property_readonly("token_ids", [](const TokenBatch& b) {
        std::vector<std::int32_t> v;
        v.reserve(b.tokens.size());
        for (const TokenRecord& r : b.tokens) v.push_back(r.token_id);
        return v;
      });

  py::class_<TokenRing, std::shared_ptr<TokenRing>>(
      m, "TokenRing",
      "Lock-free single-producer/single-consumer ring of tokens. One thread pushes, one pops.")
      .def(py::init<std::size_t>(), py::arg("capacity"))
      .def_property_readonly("capacity", &TokenRing::capacity)
      .def("__len__", &TokenRing::size)
      .def("try_push",
           [](TokenRing& ring, std::uint64_t position, std::int32_t token_id,
              std::string_view text, EndpointId source, std::int64_t produced_ns,
              std::optional<std::int64_t> arrived_ns) {
             return ring.try_push_notify(
                 make_record(position, token_id, text, source, produced_ns, arrived_ns));
           },
           py::arg("position"), py::arg("token_id"), py::arg("text"), py::arg("source") = 0,
           py::arg("produced_ns") = 0, py::arg("arrived_ns") = py::none(),
           "Push one token; False (and counted as rejected) when the ring is full.")
      .def("try_pop",
           [](TokenRing& ring) -> std::optional<TokenRecord> {
             TokenRecord r;
             if (!ring.try_pop(r)) return std::nullopt;
             return r;
           })
      .def("pop_many",
           [](TokenRing& ring, std::size_t max) {
             TokenBatch batch;
             batch.tokens.reserve(std::min(max, ring.size()));
             ring.pop_many(max, [&](const TokenRecord& r) { batch.tokens.push_back(r); });
             return batch;
           },
           py::arg("max") = 1024, "Take up to `max` tokens, oldest first.")
      .def("pop_wait",
           [](TokenRing& ring, std::optional<double> timeout) -> std::optional<TokenRecord> {
             const std::int64_t deadline = deadline_from_timeout(timeout);
             TokenRecord r;
             bool ok = false;
             {
               py::gil_scoped_release nogil;
               ok = ring.pop_wait(r, deadline);
             }
             if (!ok) return std::nullopt;
             return r;
           },
           py::arg("timeout") = py::none(),
           "Block (without the GIL) until a token arrives or the timeout passes; None then.")
      .def("spin_for_announced",
           [](TokenRing& ring, std::optional<double> timeout) {
             // Nothing announced (the common case on the reader's path): no GIL hand-off.
             if (ring.announced_next_ns() < 0) return ring.front() != nullptr;
             const std::int64_t deadline = deadline_from_timeout(timeout);
             py::gil_scoped_release nogil;
             return ring.spin_for_announced(deadline);
           },
           py::arg("timeout") = py::none(),
           "When the producer has announced the next token (a pacer does, shortly before each "
           "deadline): spin for it without the GIL until it lands or is overdue. Returns "
           "whether a token is there. Returns at once when nothing is announced.")
      .def("announced_next_ns",
           [](TokenRing& ring) -> std::optional<std::int64_t> {
             const std::int64_t at = ring.announced_next_ns();
             if (at < 0) return std::nullopt;
             return at;
           },
           "When the next token is announced and not here yet: when it is due (monotonic ns).")
      .def("wake_consumer", &TokenRing::wake_consumer,
           "Wake a consumer blocked in pop_wait (it returns None if nothing arrived).")
      .def("statistics", &TokenRing::statistics);

  // Benchmark support: a native producer thread, so the Python consumer is measured alone.
  m.def(
      "_produce_native",
      [](std::shared_ptr<TokenRing> ring, std::uint64_t count, std::string text) {
        py::gil_scoped_release nogil;
        TokenRecord r;
        TokenRecord::check_text(text);
        [[maybe_unused]] const bool fits = r.set_text(text);
        for (std::uint64_t i = 0; i < count; ++i) {
          r.position = i;
          while (!ring->try_push(r)) std::this_thread::yield();
        }
      },
      py::arg("ring"), py::arg("count"), py::arg("text") = "tok");

  // Benchmark support: C++ producer and C++ consumer threads, batching pops; returns seconds.
  m.def(
      "_ring_throughput_cpp",
      [](std::uint64_t count, std::size_t capacity) {
        py::gil_scoped_release nogil;
        TokenRing ring(capacity);
        const std::int64_t t0 = now_ns();
        // Yield rather than spin on full/empty: on a busy two-core machine the two threads
        // often share one core, and a spinner would burn the other's time slice.
        std::thread producer([&] {
          TokenRecord r;
          (void)r.set_text("token");
          for (std::uint64_t i = 0; i < count; ++i) {
            r.position = i;
            while (!ring.try_push(r)) std::this_thread::yield();
          }
        });
        std::uint64_t received = 0;
        std::uint64_t checksum = 0;
        while (received < count) {
          const std::size_t n =
              ring.pop_many(256, [&](const TokenRecord& r) { checksum += r.position; });
          if (n == 0) std::this_thread::yield();
          received += n;
        }
        producer.join();
        const double seconds = static_cast<double>(now_ns() - t0) / 1e9;
        if (count != 0 && checksum != count * (count - 1) / 2)
          throw std::runtime_error("ring throughput run lost or reordered tokens");
        return seconds;
      },
      py::arg("count"), py::arg("capacity") = 4096);
}

}  // namespace pydisco::bindings
