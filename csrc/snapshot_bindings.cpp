// Python bindings of the snapshot engine. The orchestration (what to capture, when to verify
// and commit) lives in tolaria/snapshot/native.py; these are its byte-moving primitives.
// Every call that copies, allocates or waits releases the GIL.
#include "snapshot_bindings.h"

#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <vector>

#include "cuda_snapshot.h"
#include "host_arena.h"

namespace py = pybind11;

namespace tolaria {
namespace {

using Addresses = std::vector<uintptr_t>;
using Release = py::call_guard<py::gil_scoped_release>;

void register_layout(py::module_& m) {
  py::class_<ArenaLayout>(m, "ArenaLayout",
                          "Where each tensor lives in an arena: chunk_index[i], offsets[i], sizes[i] (bytes).")
      .def_readonly("sizes", &ArenaLayout::sizes)
      .def_readonly("chunk_index", &ArenaLayout::chunk_index)
      .def_readonly("offsets", &ArenaLayout::offsets)
      .def_readonly("chunk_sizes", &ArenaLayout::chunk_sizes)
      .def_readonly("alignment", &ArenaLayout::alignment)
      .def_property_readonly("total_bytes", &ArenaLayout::total_bytes);
  m.def("plan_layout", &plan_layout, py::arg("sizes"), py::arg("alignment") = 256,
        py::arg("chunk_bytes") = size_t{1} << 30,
        "Pack byte sizes (each > 0) in order at offsets aligned to `alignment` (a power of two "
        ">= 256), in chunks of at most `chunk_bytes` (a larger tensor gets its own chunk). "
        "Raises ValueError on a zero size or a bad alignment.");
}

void register_arena(py::module_& m) {
  py::class_<HostChunk, std::shared_ptr<HostChunk>>(
      m, "HostChunk", py::buffer_protocol(),
      "One host allocation of an arena, writable through the buffer protocol "
      "(torch.frombuffer); views keep it alive.")
      .def_buffer([](HostChunk& chunk) {
        return py::buffer_info(chunk.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(chunk.nbytes())}, {py::ssize_t{1}});
      })
      .def_property_readonly("address", [](const HostChunk& c) { return reinterpret_cast<uintptr_t>(c.data()); })
      .def_property_readonly("nbytes", &HostChunk::nbytes)
      .def_property_readonly("pinned", &HostChunk::pinned);

  py::class_<HostArena, std::shared_ptr<HostArena>>(
      m, "HostArena", "Host memory for one copy of a layout: pinned chunks, or pageable with a reason.")
      .def(py::init([](const std::vector<size_t>& chunk_sizes, bool pin, int device) {
             py::gil_scoped_release release;  // pinning and first-touching can take a while
             return std::make_shared<HostArena>(chunk_sizes, pin, device);
           }),
           py::arg("chunk_sizes"), py::arg("pin") = false, py::arg("device") = 0)
      .def_property_readonly("chunks", &HostArena::chunks)
      .def_property_readonly("pinned", &HostArena::pinned)
      .def_property_readonly("nbytes", &HostArena::nbytes)
      .def_property_readonly("fallback_reason", [](const HostArena& arena) -> std::optional<std::string> {
        if (arena.fallback_reason().empty()) return std::nullopt;
        return arena.fallback_reason();
      });
}

void register_copy_plan(py::module_& m) {
  py::class_<CopyPlan>(m, "CopyPlan",
                       "The host side of one arena's slots. Each call passes live tensor addresses, one "
                       "per slot, or one per entry of `slots` (slot indices) when given.")
      .def(py::init<std::shared_ptr<HostArena>, const ArenaLayout&>(), py::arg("arena"), py::arg("layout"))
      .def_property_readonly("slot_count", &CopyPlan::slots)
      .def_property_readonly("total_bytes", &CopyPlan::total_bytes)
      .def_property_readonly("host_addresses", &CopyPlan::host_addresses)
      .def_property_readonly("arena", &CopyPlan::arena)
      .def("capture_host", &CopyPlan::capture_host, py::arg("addresses"), py::arg("threads") = 0,
           py::arg("slots") = CopyPlan::Slots{}, Release(),
           "memcpy each CPU tensor into its slot (threads=0: automatic). Blocking.")
      .def("capture_host_checked", &CopyPlan::capture_host_checked, py::arg("addresses"), py::arg("dtypes"),
           py::arg("threads") = 0, py::arg("slots") = CopyPlan::Slots{}, Release(),
           "capture_host fused with the host health pass: copies each CPU tensor into its slot and "
           "returns the sum of squares of what was written, per address (dtypes: 0 float32, 1 float16, "
           "2 bfloat16, 3 float64, -1 raw bytes: copied, sum 0). Blocking.")
      .def("restore_host", &CopyPlan::restore_host, py::arg("addresses"), py::arg("threads") = 0,
           py::arg("slots") = CopyPlan::Slots{}, Release(),
           "memcpy each slot back into its CPU tensor. Blocking.")
      .def("capture_device", &CopyPlan::capture_device, py::arg("addresses"), py::arg("stream"),
           py::arg("device"), py::arg("slots") = CopyPlan::Slots{}, Release(),
           "Enqueue device-to-host copies of each CUDA tensor into its slot on `stream`; returns at once.")
      .def("restore_device", &CopyPlan::restore_device, py::arg("addresses"), py::arg("stream"),
           py::arg("device"), py::arg("slots") = CopyPlan::Slots{}, Release(),
           "Synchronize the device, copy each slot into its CUDA tensor on `stream`, synchronize `stream`.");
}

void register_event(py::module_& m) {
  py::class_<cuda::Event>(m, "CudaEvent", "A cudaEvent_t (timing disabled) on one device.")
      .def(py::init<int>(), py::arg("device"))
      .def_property_readonly("device", &cuda::Event::device)
      .def("record", &cuda::Event::record, py::arg("stream"), "Capture the work queued on `stream` so far.")
      .def("block_stream", &cuda::Event::block_stream, py::arg("stream"),
           "Make `stream` wait on the GPU for the last record(); no host synchronization.")
      .def("query", &cuda::Event::query, "True when the recorded work has completed.")
      .def("synchronize", &cuda::Event::synchronize, Release(),
           "Block until the recorded work has completed.");
}

}  // namespace

void register_snapshot(py::module_& m) {
  py::register_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);
  register_layout(m);
  register_arena(m);
  register_copy_plan(m);
  register_event(m);
  m.def("cuda_batch_copy_compiled", &cuda::batch_copy_compiled,
        "True when copies are batched with cudaMemcpyBatchAsync (built with CUDA >= 12.8).");
}

}  // namespace tolaria
