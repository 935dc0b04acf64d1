// Shared declarations of the binding layer. The core headers under csrc/pydisco hold no
// Python; everything Python-specific lives in this directory.
#pragma once

#include <pybind11/pybind11.h>

namespace pydisco::bindings {

void register_ring(pybind11::module_& m);
void register_pacer(pybind11::module_& m);
void register_migration(pybind11::module_& m);
void register_consumer(pybind11::module_& m);
void register_shm(pybind11::module_& m);

}  // namespace pydisco::bindings
