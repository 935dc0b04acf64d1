#include <pybind11/stl.h>

#include <memory>
#include <mutex>
#include <vector>

#include "bindings.hpp"
#include "pydisco/native_consumer.hpp"

namespace py = pybind11;

namespace pydisco::bindings {
namespace {

// A NativeConsumer whose callback keeps every token and when it was received: the C++
// consumer path, observable from Python (tests, benchmarks).
class NativeCollector {
 public:
  explicit NativeCollector(std::shared_ptr<TokenRing> ring)
      : consumer_(std::move(ring), [this](const TokenRecord& t, std::int64_t received_ns) {
          std::lock_guard<std::mutex> lock(mutex_);
          tokens_.push_back(t);
          received_ns_.push_back(received_ns);
        }) {}

  void stop() { consumer_.stop(); }
  std::uint64_t consumed() const { return consumer_.consumed(); }
  bool finished() const { return consumer_.finished(); }

  std::vector<TokenRecord> tokens() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return tokens_;
  }

  std::vector<std::int64_t> received_ns() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return received_ns_;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<TokenRecord> tokens_;
  std::vector<std::int64_t> received_ns_;
  NativeConsumer consumer_;  // last: its thread starts after the vectors exist
};

}  // namespace

void register_consumer(py::module_& m) {
  py::class_<NativeCollector>(
      m, "NativeCollector",
      "A C++ thread consuming a ring with blocking pops (no Python, no GIL), keeping tokens; "
      "it ends after the answer's end record.",
      py::release_gil_before_calling_cpp_dtor())  // its destructor joins the thread
      .def(py::init<std::shared_ptr<TokenRing>>(), py::arg("ring"))
      .def("stop", &NativeCollector::stop, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("consumed", &NativeCollector::consumed, "Tokens taken (not the end).")
      .def_property_readonly("finished", &NativeCollector::finished,
                             "Whether it has taken the end record.")
      .def("tokens", &NativeCollector::tokens,
           "What it took, in order; the last is the end record once finished.")
      .def("received_ns", &NativeCollector::received_ns);
}

}  // namespace pydisco::bindings
