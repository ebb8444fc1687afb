// Registers the snapshot engine (host arena, copy plans, CUDA events) on the _C module.
#pragma once

#include <pybind11/pybind11.h>

namespace tolaria {

void register_snapshot(pybind11::module_& m);

}  // namespace tolaria
