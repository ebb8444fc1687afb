// Per-tensor sums of squares on the host (see host_health.h).
#include "host_health.h"

#include <algorithm>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
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

#if defined(__SSE2__)
// The copy of `count` <= kBlock floats to a 16-byte-aligned `dst` with streaming stores, summing
// the very registers it stores (so the sum is of exactly the bytes written). Streaming stores
// skip the read-for-ownership of each arena line that a cached store pays, so a fused capture
// moves one read and one write per byte, as a large memcpy does; nothing reads the arena soon.
double block_copy_sum_streamed(const float* src, float* dst, size_t count) {
  __m128 a = _mm_setzero_ps(), b = a, c = a, d = a;
  size_t index = 0;
  for (; index + 16 <= count; index += 16) {
    const __m128 w = _mm_loadu_ps(src + index), x = _mm_loadu_ps(src + index + 4);
    const __m128 y = _mm_loadu_ps(src + index + 8), z = _mm_loadu_ps(src + index + 12);
    _mm_stream_ps(dst + index, w);
    _mm_stream_ps(dst + index + 4, x);
    _mm_stream_ps(dst + index + 8, y);
    _mm_stream_ps(dst + index + 12, z);
    a = _mm_add_ps(a, _mm_mul_ps(w, w));
    b = _mm_add_ps(b, _mm_mul_ps(x, x));
    c = _mm_add_ps(c, _mm_mul_ps(y, y));
    d = _mm_add_ps(d, _mm_mul_ps(z, z));
  }
  float lanes[4];
  _mm_storeu_ps(lanes, _mm_add_ps(_mm_add_ps(a, b), _mm_add_ps(c, d)));
  double total = static_cast<double>(lanes[0]) + lanes[1] + lanes[2] + lanes[3];
  for (; index < count; ++index) {
    const float value = src[index];
    dst[index] = value;
    total += static_cast<double>(value * value);
  }
  return total;
}
#endif

// With `dst`, the floats are copied there as they are summed, and the sum is of exactly the
// bytes written: with SSE2 by streaming stores of the summed registers (after at most three
// elements that bring `dst` to a 16-byte boundary), otherwise each block is copied, then its
// copy summed from L1 where the copy just put it. Either way the source is read once.
double sum_floats(const float* data, float* dst, size_t count) {
  double total = 0.0;
  size_t index = 0;
#if defined(__SSE2__)
  if (dst != nullptr) {
    for (; index < count && reinterpret_cast<uintptr_t>(dst + index) % 16 != 0; ++index) {
      dst[index] = data[index];
      total += static_cast<double>(data[index] * data[index]);
    }
    for (; index < count; index += kBlock) {
      total += block_copy_sum_streamed(data + index, dst + index, std::min(kBlock, count - index));
    }
    _mm_sfence();  // the streamed stores are visible before the pass returns (and the threads join)
    return total;
  }
#endif
  for (; index < count; index += kBlock) {
    const size_t take = std::min(kBlock, count - index);
    if (dst != nullptr) std::memcpy(dst + index, data + index, take * sizeof(float));
    total += block_sum((dst != nullptr ? dst : data) + index, take);
  }
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
double sum_halves(const uint16_t* data, uint16_t* dst, size_t count, Widen widen) {
  float widened[kBlock];
  double total = 0.0;
  for (size_t index = 0; index < count; index += kBlock) {
    const size_t take = std::min(kBlock, count - index);
    const uint16_t* block = data + index;
    if (dst != nullptr) {
      std::memcpy(dst + index, block, take * sizeof(uint16_t));
      block = dst + index;
    }
    for (size_t i = 0; i < take; ++i) widened[i] = widen(block[i]);
    total += block_sum(widened, take);
  }
  return total;
}

double sum_doubles(const double* data, double* dst, size_t count) {
  if (dst != nullptr) {
    std::memcpy(dst, data, count * sizeof(double));
    data = dst;  // fp64 is rare on the host path: one copy, then one pass over it
  }
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

// One tensor (or arena slot) for a pass: `numel` elements of `dtype` at `src`, copied to `dst`
// first when `dst` is not null. kBytes: raw bytes (integer buffers), copied and never summed.
constexpr int kBytes = -1;

struct Range {
  uintptr_t src;
  uintptr_t dst;
  size_t numel;
  int dtype;
};

size_t element_bytes(int dtype) {
  switch (static_cast<HealthDtype>(dtype)) {
    case HealthDtype::kFloat32:
      return 4;
    case HealthDtype::kFloat16:
    case HealthDtype::kBFloat16:
      return 2;
    case HealthDtype::kFloat64:
      return 8;
  }
  return 1;  // kBytes
}

template <typename T>
T* at(uintptr_t address, size_t first) {
  return address == 0 ? nullptr : reinterpret_cast<T*>(address) + first;
}

// `count` elements starting at element `first` of `range`.
double pass_range(const Range& range, size_t first, size_t count) {
  switch (range.dtype) {
    case static_cast<int>(HealthDtype::kFloat32):
      return sum_floats(at<const float>(range.src, first), at<float>(range.dst, first), count);
    case static_cast<int>(HealthDtype::kFloat16):
      return sum_halves(at<const uint16_t>(range.src, first), at<uint16_t>(range.dst, first), count, half_magnitude);
    case static_cast<int>(HealthDtype::kBFloat16):
      return sum_halves(at<const uint16_t>(range.src, first), at<uint16_t>(range.dst, first), count, bfloat16_value);
    case static_cast<int>(HealthDtype::kFloat64):
      return sum_doubles(at<const double>(range.src, first), at<double>(range.dst, first), count);
    default:  // kBytes
      if (range.dst != 0) std::memcpy(at<char>(range.dst, first), at<const char>(range.src, first), count);
      return 0.0;
  }
}

// A piece of one tensor: a thread's share cuts a large tensor where the byte boundary falls.
struct Piece {
  size_t tensor;
  size_t first;
  size_t count;
};

}  // namespace

namespace {

// Every range's sum of squares, on as many threads as its bytes pay for.
std::vector<double> run_pass(const std::vector<Range>& ranges, int max_threads) {
  size_t total_bytes = 0;
  for (const Range& range : ranges) total_bytes += range.numel * element_bytes(range.dtype);
  std::vector<double> sums(ranges.size(), 0.0);
  const int threads = host_thread_count(max_threads, total_bytes, kMinBytesPerThread);
  if (threads <= 1) {
    for (size_t i = 0; i < ranges.size(); ++i) {
      if (ranges[i].numel != 0) sums[i] = pass_range(ranges[i], 0, ranges[i].numel);
    }
    return sums;
  }
  // Shares of about equal bytes, cut at element boundaries; each thread adds its pieces' partial
  // sums into its own row, and the rows are added per range at the end (no shared writes).
  std::vector<std::vector<Piece>> shares(static_cast<size_t>(threads));
  const size_t share_bytes = (total_bytes + threads - 1) / threads;
  size_t share = 0;
  size_t filled = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const size_t width = element_bytes(ranges[i].dtype);
    size_t done = 0;
    while (done < ranges[i].numel) {
      if (filled >= share_bytes && share + 1 < shares.size()) {
        ++share;
        filled = 0;
      }
      const size_t room = share + 1 < shares.size() ? (share_bytes - filled + width - 1) / width : ranges[i].numel;
      const size_t take = std::min(ranges[i].numel - done, std::max<size_t>(room, 1));
      shares[share].push_back({i, done, take});
      done += take;
      filled += take * width;
    }
  }
  std::vector<std::vector<double>> rows(shares.size(), std::vector<double>(ranges.size(), 0.0));
  run_shares(shares.size(), [&](size_t which) {
    for (const Piece& piece : shares[which]) {
      rows[which][piece.tensor] += pass_range(ranges[piece.tensor], piece.first, piece.count);
    }
  });
  for (const auto& row : rows) {
    for (size_t i = 0; i < ranges.size(); ++i) sums[i] += row[i];
  }
  return sums;
}

void check_dtype(int dtype, size_t index, bool bytes_allowed) {
  const bool known = dtype >= 0 && dtype <= static_cast<int>(HealthDtype::kFloat64);
  if (!known && !(bytes_allowed && dtype == kBytes)) {
    throw InvalidArgument("dtypes[" + std::to_string(index) + "] = " + std::to_string(dtype) +
                          " is not a dtype code (0 float32, 1 float16, 2 bfloat16, 3 float64" +
                          (bytes_allowed ? ", -1 raw bytes)" : ")"));
  }
}

}  // namespace

std::vector<double> sum_squares_host(const std::vector<uintptr_t>& addresses, const std::vector<size_t>& numels,
                                     const std::vector<int>& dtypes, int max_threads) {
  const size_t tensors = addresses.size();
  if (numels.size() != tensors || dtypes.size() != tensors) {
    throw InvalidArgument("addresses, numels and dtypes differ in length: " + std::to_string(tensors) + ", " +
                          std::to_string(numels.size()) + ", " + std::to_string(dtypes.size()));
  }
  std::vector<Range> ranges(tensors);
  for (size_t i = 0; i < tensors; ++i) {
    check_dtype(dtypes[i], i, false);
    if (addresses[i] == 0 && numels[i] != 0) {
      throw InvalidArgument("tensor address " + std::to_string(i) + " is null");
    }
    ranges[i] = {addresses[i], 0, numels[i], dtypes[i]};
  }
  return run_pass(ranges, max_threads);
}

std::vector<double> copy_sum_squares(const std::vector<CopyOp>& ops, const std::vector<int>& dtypes, int max_threads) {
  if (dtypes.size() != ops.size()) {
    throw InvalidArgument("expected " + std::to_string(ops.size()) + " dtype codes (one per copy), got " +
                          std::to_string(dtypes.size()));
  }
  std::vector<Range> ranges(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    check_dtype(dtypes[i], i, true);
    const size_t width = element_bytes(dtypes[i]);
    if (ops[i].nbytes % width != 0) {
      throw InvalidArgument("copy " + std::to_string(i) + " has " + std::to_string(ops[i].nbytes) +
                            " bytes, not a whole number of its " + std::to_string(width) + "-byte elements");
    }
    ranges[i] = {reinterpret_cast<uintptr_t>(ops[i].src), reinterpret_cast<uintptr_t>(ops[i].dst), ops[i].nbytes / width,
                 dtypes[i]};
  }
  return run_pass(ranges, max_threads);
}

}  // namespace tolaria
