// Per-tensor sums of squares on the host (see host_health.h).
#include "host_health.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "host_arena.h"
#include "host_threads.h"

namespace tolaria {
namespace {

// Four vector accumulators of four fp32 lanes (SSE width, the x86-64 baseline; GCC and Clang
// vector extensions, so the loop is vectorized as written instead of as the optimizer guesses):
// four independent chains hide the add latency. Each lane adds 32 squares before the block is
// folded into fp64, which bounds fp32 rounding to a few ulps of a short sum.
typedef float Float4 __attribute__((vector_size(16)));
constexpr size_t kBlock = 512;  // elements per fp64 fold; 16 per step, 32 steps
// A second thread pays off only past its start-up cost (see host_threads.h).
constexpr size_t kMinBytesPerThread = size_t{4} << 20;

inline Float4 load4(const float* data) {
  Float4 value;
  std::memcpy(&value, data, sizeof value);  // an unaligned load
  return value;
}

// The sum of squares of `count` <= kBlock floats.
double block_sum(const float* data, size_t count) {
  Float4 a = {0, 0, 0, 0}, b = a, c = a, d = a;
  size_t index = 0;
  for (; index + 16 <= count; index += 16) {
    const Float4 w = load4(data + index), x = load4(data + index + 4);
    const Float4 y = load4(data + index + 8), z = load4(data + index + 12);
    a += w * w;
    b += x * x;
    c += y * y;
    d += z * z;
  }
  const Float4 lanes = (a + b) + (c + d);
  double total = static_cast<double>(lanes[0]) + lanes[1] + lanes[2] + lanes[3];
  for (; index < count; ++index) total += static_cast<double>(data[index] * data[index]);
  return total;
}

double sum_floats(const float* data, size_t count) {
  double total = 0.0;
  for (size_t index = 0; index < count; index += kBlock) total += block_sum(data + index, std::min(kBlock, count - index));
  return total;
}

inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// The magnitude of an IEEE half as a float (the sign does not change a square): the exponent
// and mantissa move up 13 bits and a multiply by 2**112 rebiases them, subnormals included;
// exponent 31 keeps its mantissa so that Inf stays Inf and NaN stays NaN.
inline float half_magnitude(uint16_t half) {
  const uint32_t shifted = static_cast<uint32_t>(half & 0x7fffu) << 13;
  if ((half & 0x7c00u) == 0x7c00u) return float_from_bits(shifted | 0x7f800000u);
  return float_from_bits(shifted) * 0x1p112f;
}

inline float bfloat16_value(uint16_t value) { return float_from_bits(static_cast<uint32_t>(value) << 16); }

// Half-width floats are widened a block at a time into a buffer on the stack (exact: both fit
// fp32), then summed like fp32.
template <typename Widen>
double sum_halves(const uint16_t* data, size_t count, Widen widen) {
  float widened[kBlock];
  double total = 0.0;
  for (size_t index = 0; index < count; index += kBlock) {
    const size_t take = std::min(kBlock, count - index);
    for (size_t i = 0; i < take; ++i) widened[i] = widen(data[index + i]);
    total += block_sum(widened, take);
  }
  return total;
}

double sum_doubles(const double* data, size_t count) {
  constexpr size_t kDoubleLanes = 8;
  double lanes[kDoubleLanes] = {};
  size_t index = 0;
  for (; index + kDoubleLanes <= count; index += kDoubleLanes) {
    for (size_t lane = 0; lane < kDoubleLanes; ++lane) lanes[lane] += data[index + lane] * data[index + lane];
  }
  for (; index < count; ++index) lanes[0] += data[index] * data[index];
  double total = 0.0;
  for (double lane : lanes) total += lane;
  return total;
}

// `count` elements of one dtype starting at element `first` of the tensor at `address`.
double sum_range(uintptr_t address, HealthDtype dtype, size_t first, size_t count) {
  switch (dtype) {
    case HealthDtype::kFloat32:
      return sum_floats(reinterpret_cast<const float*>(address) + first, count);
    case HealthDtype::kFloat16:
      return sum_halves(reinterpret_cast<const uint16_t*>(address) + first, count, half_magnitude);
    case HealthDtype::kBFloat16:
      return sum_halves(reinterpret_cast<const uint16_t*>(address) + first, count, bfloat16_value);
    case HealthDtype::kFloat64:
      return sum_doubles(reinterpret_cast<const double*>(address) + first, count);
  }
  return 0.0;  // unreachable: codes are validated before any work starts
}

size_t element_bytes(HealthDtype dtype) {
  switch (dtype) {
    case HealthDtype::kFloat32:
      return 4;
    case HealthDtype::kFloat16:
    case HealthDtype::kBFloat16:
      return 2;
    case HealthDtype::kFloat64:
      return 8;
  }
  return 0;
}

// A piece of one tensor: a thread's share cuts a large tensor where the byte boundary falls.
struct Piece {
  size_t tensor;
  size_t first;
  size_t count;
};

}  // namespace

std::vector<double> sum_squares_host(const std::vector<uintptr_t>& addresses, const std::vector<size_t>& numels,
                                     const std::vector<int>& dtypes, int max_threads) {
  const size_t tensors = addresses.size();
  if (numels.size() != tensors || dtypes.size() != tensors) {
    throw InvalidArgument("addresses, numels and dtypes differ in length: " + std::to_string(tensors) + ", " +
                          std::to_string(numels.size()) + ", " + std::to_string(dtypes.size()));
  }
  std::vector<HealthDtype> kinds(tensors);
  size_t total_bytes = 0;
  for (size_t i = 0; i < tensors; ++i) {
    if (dtypes[i] < 0 || dtypes[i] > static_cast<int>(HealthDtype::kFloat64)) {
      throw InvalidArgument("dtypes[" + std::to_string(i) + "] = " + std::to_string(dtypes[i]) +
                            " is not a dtype code (0 float32, 1 float16, 2 bfloat16, 3 float64)");
    }
    if (addresses[i] == 0 && numels[i] != 0) {
      throw InvalidArgument("tensor address " + std::to_string(i) + " is null");
    }
    kinds[i] = static_cast<HealthDtype>(dtypes[i]);
    total_bytes += numels[i] * element_bytes(kinds[i]);
  }
  std::vector<double> sums(tensors, 0.0);
  const int threads = host_thread_count(max_threads, total_bytes, kMinBytesPerThread);
  if (threads <= 1) {
    for (size_t i = 0; i < tensors; ++i) {
      if (numels[i] != 0) sums[i] = sum_range(addresses[i], kinds[i], 0, numels[i]);
    }
    return sums;
  }
  // Shares of about equal bytes; each thread adds its pieces' partial sums into its own row,
  // and the rows are added per tensor at the end (no shared writes while threads run).
  std::vector<std::vector<Piece>> shares(static_cast<size_t>(threads));
  const size_t share_bytes = (total_bytes + threads - 1) / threads;
  size_t share = 0;
  size_t filled = 0;
  for (size_t i = 0; i < tensors; ++i) {
    const size_t width = element_bytes(kinds[i]);
    size_t done = 0;
    while (done < numels[i]) {
      if (filled >= share_bytes && share + 1 < shares.size()) {
        ++share;
        filled = 0;
      }
      const size_t room = share + 1 < shares.size() ? (share_bytes - filled + width - 1) / width : numels[i];
      const size_t take = std::min(numels[i] - done, std::max<size_t>(room, 1));
      shares[share].push_back({i, done, take});
      done += take;
      filled += take * width;
    }
  }
  std::vector<std::vector<double>> rows(shares.size(), std::vector<double>(tensors, 0.0));
  auto run = [&](size_t which) {
    for (const Piece& piece : shares[which]) {
      rows[which][piece.tensor] += sum_range(addresses[piece.tensor], kinds[piece.tensor], piece.first, piece.count);
    }
  };
  run_shares(shares.size(), run);
  for (const auto& row : rows) {
    for (size_t i = 0; i < tensors; ++i) sums[i] += row[i];
  }
  return sums;
}

}  // namespace tolaria
