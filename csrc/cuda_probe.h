// The CUDA runtime as the rest of the extension sees it. Compiled against the real runtime
// (cuda_probe.cu) when the build found nvcc, against a stub (cuda_probe_stub.cpp) otherwise, so
// callers need no #ifdef.
#pragma once

#include <string>

namespace tolaria {

// True when a driver is present and at least one device is visible. Never throws and never
// prints: on a machine without a driver it simply answers false.
bool cuda_runtime_available() noexcept;

// Version of the CUDA runtime compiled in, as "major.minor", or "" without CUDA.
std::string cuda_runtime_version();

// Whether this build contains the CUDA part at all.
bool built_with_cuda() noexcept;

}  // namespace tolaria
