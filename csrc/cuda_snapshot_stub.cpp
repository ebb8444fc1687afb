// The snapshot engine's CUDA calls in a build without nvcc: pinning reports that it cannot
// (so arenas fall back to pageable memory) and everything else raises CudaError.
#include <string>

#include "cuda_snapshot.h"

namespace tolaria {
namespace cuda {
namespace {

[[noreturn]] void unavailable(const char* what) {
  throw CudaError(std::string(what) + " needs CUDA, but tolaria._C was built without it "
                  "(no nvcc at build time, or TOLARIA_CUDA=OFF)");
}

}  // namespace

void* pinned_alloc(size_t /*nbytes*/, int /*device*/, std::string* error) noexcept {
  if (error != nullptr) *error = "tolaria._C was built without CUDA";
  return nullptr;
}

void pinned_free(void* /*ptr*/) noexcept {}

void copy_async(const std::vector<CopyOp>& /*ops*/, bool /*device_to_host*/, uintptr_t /*stream*/,
                int /*device*/, const char* what) {
  unavailable(what);
}

void device_synchronize(int /*device*/) { unavailable("cudaDeviceSynchronize"); }

void stream_synchronize(uintptr_t /*stream*/, int /*device*/) { unavailable("cudaStreamSynchronize"); }

bool batch_copy_compiled() noexcept { return false; }

Event::Event(int device) : device_(device) { unavailable("a CUDA event"); }

Event::~Event() = default;

void Event::record(uintptr_t /*stream*/) { unavailable("cudaEventRecord"); }

void Event::block_stream(uintptr_t /*stream*/) { unavailable("cudaStreamWaitEvent"); }

bool Event::query() { unavailable("cudaEventQuery"); }

void Event::synchronize() { unavailable("cudaEventSynchronize"); }

}  // namespace cuda
}  // namespace tolaria
