// The host side of the health check: per-tensor sums of squares of CPU tensors, read in place in
// one pass. No Python and no torch in here: tensors arrive as addresses, element counts and
// dtype codes, like the snapshot engine's. A NaN or an Inf makes its tensor's sum non-finite,
// which is all the verdict needs; the rare sick tensor is then counted element by element in
// Python (tolaria/health/native.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "host_arena.h"

namespace tolaria {

// The element types the host check reads, by the codes tolaria/health/native.py passes.
enum class HealthDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// sums[i] = the sum of the squares of tensor i's `numels[i]` elements of dtype `dtypes[i]`,
// stored contiguously from `addresses[i]` (an address may be 0 only when its count is 0).
// Squares of narrow floats are accumulated in fp32 lanes over short blocks and the blocks in
// fp64 (fp64 tensors in fp64 throughout), so the result is at least as exact as torch's fp32
// norm. `max_threads` <= 0: automatic (one thread below a few MB). Raises InvalidArgument (see
// host_arena.h) on mismatched lengths, an unknown dtype code or a null address.
std::vector<double> sum_squares_host(const std::vector<uintptr_t>& addresses, const std::vector<size_t>& numels,
                                     const std::vector<int>& dtypes, int max_threads);

// The same pass fused into a copy: each op is copied block by block and each block's copy is
// summed while it is in cache, so a verified capture reads its source once. dtypes[i] is op i's
// code, or -1 for raw bytes (copied, sum 0); an op's byte count must be whole elements.
std::vector<double> copy_sum_squares(const std::vector<CopyOp>& ops, const std::vector<int>& dtypes, int max_threads);

}  // namespace tolaria
