// Probing the CUDA runtime. Linked against the static runtime, so a machine without the
// driver reports an error code here instead of failing to load the module.
#include <cuda_runtime.h>

#include "cuda_probe.h"

namespace tolaria {

bool cuda_runtime_available() noexcept {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    // Clear the sticky "last error" so a later, unrelated call does not report it.
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

std::string cuda_runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

bool built_with_cuda() noexcept { return true; }

}  // namespace tolaria
