// Registers the host health check (per-tensor sums of squares) on the _C module.
#pragma once

#include <pybind11/pybind11.h>

namespace tolaria {

void register_health(pybind11::module_& m);

}  // namespace tolaria
