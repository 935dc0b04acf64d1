#include "bindings.hpp"

#include "pydisco/clock.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "pydisco's native core: token ring, pacer and migration state machine.";
  m.def("now_ns", &pydisco::now_ns,
        "CLOCK_MONOTONIC in ns: the native core's clock (same as time.monotonic_ns()).");
  pydisco::bindings::register_ring(m);
  pydisco::bindings::register_pacer(m);
  pydisco::bindings::register_migration(m);
  pydisco::bindings::register_consumer(m);
  pydisco::bindings::register_shm(m);
}
