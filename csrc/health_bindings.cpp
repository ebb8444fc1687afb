// Python binding of the host health check; the orchestration (which tensors, the report) lives
// in tolaria/health/native.py. The pass releases the GIL.
#include "health_bindings.h"

#include <pybind11/stl.h>

#include "host_health.h"

namespace py = pybind11;

namespace tolaria {

void register_health(py::module_& m) {
  m.def("sum_squares_host", &sum_squares_host, py::arg("addresses"), py::arg("numels"), py::arg("dtypes"),
        py::arg("threads") = 0, py::call_guard<py::gil_scoped_release>(),
        "Per-tensor sums of squares of contiguous CPU tensors, read in place: addresses[i] holds "
        "numels[i] elements of dtype code dtypes[i] (0 float32, 1 float16, 2 bfloat16, 3 float64). "
        "threads=0: automatic. Returns a list of floats; a NaN or an Inf makes its sum non-finite. "
        "Raises ValueError on mismatched lengths, an unknown code or a null address.");
}

}  // namespace tolaria
