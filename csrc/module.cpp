// tolaria._C: the Python face of the compiled engine. Kept thin: each subsystem registers its
// own bindings; this file only assembles them and reports how the module was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda_probe.h"
#include "health_bindings.h"
#include "object_scan.h"
#include "snapshot_bindings.h"

namespace py = pybind11;

#ifndef TOLARIA_CUDA_ARCHITECTURES
#define TOLARIA_CUDA_ARCHITECTURES ""
#endif
#ifndef TOLARIA_CUDA_COMPILER_VERSION
#define TOLARIA_CUDA_COMPILER_VERSION ""
#endif

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = TOLARIA_VERSION;
  info["cuda"] = tolaria::built_with_cuda();
  info["cuda_version"] = tolaria::cuda_runtime_version();
  info["cuda_architectures"] = std::string(TOLARIA_CUDA_ARCHITECTURES);
  info["cuda_compiler_version"] = std::string(TOLARIA_CUDA_COMPILER_VERSION);
  info["cxx_compiler"] = TOLARIA_CXX_COMPILER;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tolaria's compiled engine (C++ always, CUDA when built with nvcc).";
  m.def("build_info", &build_info,
        "How this extension was built: version, cuda (bool), cuda_version, "
        "cuda_architectures, cuda_compiler_version, cxx_compiler.");
  m.def("cuda_runtime_available", &tolaria::cuda_runtime_available,
        "True when this build has CUDA and a driver with at least one device is present; "
        "False otherwise, without raising or printing.");
  tolaria::register_snapshot(m);
  tolaria::register_health(m);
  tolaria::register_object_scan(m);
}
