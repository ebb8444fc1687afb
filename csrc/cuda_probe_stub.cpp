// The CUDA runtime seen from a build without nvcc: nothing is ever available.
#include "cuda_probe.h"

namespace tolaria {

bool cuda_runtime_available() noexcept { return false; }

std::string cuda_runtime_version() { return ""; }

bool built_with_cuda() noexcept { return false; }

}  // namespace tolaria
