// Per-step "is it still the same?" questions about Python objects, answered in one C loop.
//
// The Governor asks them on every step (is the module tree the one it walked? which parameters
// have a gradient? are these the very tensors a cached plan trusts?). Asked from Python they
// cost one interpreted iteration per module or per tensor, which is most of what a guarded step
// spends on the host; here they cost a pointer comparison each. They read objects only (no
// tensor data, no libtorch), with the GIL held.
#pragma once

#include <pybind11/pybind11.h>

namespace tolaria {

void register_object_scan(pybind11::module_& m);

}  // namespace tolaria
