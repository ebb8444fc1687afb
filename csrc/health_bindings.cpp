// Python binding of the host health check; the orchestration (which tensors, the report) lives
// in tolaria/health/native.py. The pass releases the GIL.
#include "health_bindings.h"

#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>

#include "host_health.h"

namespace py = pybind11;

namespace tolaria {
namespace {

// A check's [4, count] float64 result (sums of squares, then NaN, +Inf and -Inf counts) at
// `address` in host memory: (squares, norms) as two lists of floats when every count is zero,
// None otherwise. The healthy case, every step's, then costs one pass instead of tensor ops;
// std::sqrt is correctly rounded, as math.sqrt and torch.sqrt are.
py::object healthy_rows(std::uintptr_t address, Py_ssize_t count) {
  if (count < 0) throw py::value_error("count must be >= 0");
  if (address == 0 && count > 0) throw py::value_error("healthy_rows got a null address");
  const double* rows = reinterpret_cast<const double*>(address);
  for (Py_ssize_t i = count; i < 4 * count; ++i) {
    if (rows[i] != 0.0) return py::none();
  }
  py::list squares(count);
  py::list norms(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* square = PyFloat_FromDouble(rows[i]);
    if (square == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(squares.ptr(), i, square);
    PyObject* norm = PyFloat_FromDouble(std::sqrt(rows[i]));
    if (norm == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(norms.ptr(), i, norm);
  }
  return py::make_tuple(squares, norms);
}

}  // namespace

void register_health(py::module_& m) {
  m.def("sum_squares_host", &sum_squares_host, py::arg("addresses"), py::arg("numels"), py::arg("dtypes"),
        py::arg("threads") = 0, py::call_guard<py::gil_scoped_release>(),
        "Per-tensor sums of squares of contiguous CPU tensors, read in place: addresses[i] holds "
        "numels[i] elements of dtype code dtypes[i] (0 float32, 1 float16, 2 bfloat16, 3 float64). "
        "threads=0: automatic. Returns a list of floats; a NaN or an Inf makes its sum non-finite. "
        "Raises ValueError on mismatched lengths, an unknown code or a null address.");
  m.def("healthy_rows", &healthy_rows, py::arg("address"), py::arg("count"),
        "(squares, norms) of the [4, count] float64 check result at address in host memory (sums "
        "of squares, then NaN, +Inf and -Inf counts), as lists of floats, when every count is zero; "
        "None otherwise. Raises ValueError on a negative count or a null address.");
}

}  // namespace tolaria
