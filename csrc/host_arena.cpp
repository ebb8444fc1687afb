// Layout planning, host memory and host-side copies of the snapshot engine.
#include "host_arena.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "cuda_snapshot.h"
#include "host_health.h"
#include "host_threads.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace tolaria {
namespace {

constexpr size_t kMinAlignment = 256;
constexpr size_t kPageBytes = 4096;
constexpr size_t kHugePageBytes = size_t{2} << 20;
// Below this a single memcpy is as fast as several threads (thread start-up costs tens of
// microseconds and one core already streams several GB/s), so small arenas stay inline.
constexpr size_t kParallelMinBytes = size_t{16} << 20;
constexpr size_t kMinBytesPerThread = size_t{8} << 20;

size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

bool is_power_of_two(size_t value) { return value != 0 && (value & (value - 1)) == 0; }

int thread_count(int max_threads, size_t total_bytes) {
  if (total_bytes < kParallelMinBytes) return 1;
  return host_thread_count(max_threads, total_bytes, kMinBytesPerThread);
}

// Splits `ops` into `parts` lists of about equal bytes, cutting an op in two where a boundary
// falls inside it, so one huge tensor is still shared by every thread.
std::vector<std::vector<CopyOp>> split_by_bytes(const std::vector<CopyOp>& ops, size_t total, int parts) {
  std::vector<std::vector<CopyOp>> lists(static_cast<size_t>(parts));
  const size_t share = (total + parts - 1) / parts;
  size_t list = 0;
  size_t filled = 0;
  for (const CopyOp& op : ops) {
    size_t done = 0;
    while (done < op.nbytes) {
      if (filled == share && list + 1 < lists.size()) {
        ++list;
        filled = 0;
      }
      const size_t take = std::min(op.nbytes - done, list + 1 < lists.size() ? share - filled : op.nbytes - done);
      lists[list].push_back({static_cast<char*>(op.dst) + done, static_cast<const char*>(op.src) + done, take});
      done += take;
      filled += take;
    }
  }
  return lists;
}

void copy_all(const std::vector<CopyOp>& ops) {
  for (const CopyOp& op : ops) std::memcpy(op.dst, op.src, op.nbytes);
}

// A page-aligned pageable allocation, touched once so that the first capture does not pay the
// page faults (the pageable baseline pays them on every clone). Large chunks ask for
// transparent huge pages: fewer faults and TLB misses on multi-hundred-MB copies.
void* aligned_host_alloc(size_t nbytes) {
  const size_t alignment = nbytes >= 2 * kHugePageBytes ? kHugePageBytes : kPageBytes;
  void* data = std::aligned_alloc(alignment, round_up(std::max<size_t>(nbytes, 1), alignment));
  if (data == nullptr) throw std::bad_alloc();
#ifdef __linux__
  if (alignment == kHugePageBytes) (void)madvise(data, round_up(nbytes, alignment), MADV_HUGEPAGE);
#endif
  std::memset(data, 0, nbytes);
  return data;
}

}  // namespace

size_t ArenaLayout::total_bytes() const {
  size_t total = 0;
  for (size_t size : chunk_sizes) total += size;
  return total;
}

ArenaLayout plan_layout(const std::vector<size_t>& sizes, size_t alignment, size_t chunk_bytes) {
  if (!is_power_of_two(alignment) || alignment < kMinAlignment) {
    throw InvalidArgument("alignment must be a power of two >= 256, got " + std::to_string(alignment));
  }
  if (chunk_bytes == 0) throw InvalidArgument("chunk_bytes must be positive");
  ArenaLayout layout;
  layout.alignment = alignment;
  layout.sizes = sizes;
  layout.chunk_index.reserve(sizes.size());
  layout.offsets.reserve(sizes.size());
  size_t cursor = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] == 0) {
      throw InvalidArgument("sizes[" + std::to_string(i) + "] is 0: empty tensors take no arena slot");
    }
    size_t offset = round_up(cursor, alignment);
    const bool fits = !layout.chunk_sizes.empty() && (cursor == 0 || offset + sizes[i] <= chunk_bytes);
    if (!fits) {
      layout.chunk_sizes.push_back(0);
      offset = 0;
    }
    layout.chunk_index.push_back(layout.chunk_sizes.size() - 1);
    layout.offsets.push_back(offset);
    cursor = offset + sizes[i];
    layout.chunk_sizes.back() = cursor;
  }
  return layout;
}

HostChunk::~HostChunk() {
  if (kind_ == Kind::kPinned) {
    cuda::pinned_free(data_);
  } else {
    std::free(data_);
  }
}

HostArena::HostArena(const std::vector<size_t>& chunk_sizes, bool pin, int device) {
  if (pin) {
    std::string error;
    for (size_t size : chunk_sizes) {
      void* data = cuda::pinned_alloc(size, device, &error);
      if (data == nullptr) {
        fallback_reason_ = "could not pin " + std::to_string(size) + " bytes of host memory (" + error +
                           "); the snapshot arena uses pageable memory, so captures block the host";
        chunks_.clear();  // frees the chunks already pinned: all or nothing keeps one kind
        break;
      }
      // Zeroed like pageable chunks: the padding between slots must read as finite values
      // when a whole dtype region is checked at once.
      std::memset(data, 0, size);
      chunks_.push_back(std::make_shared<HostChunk>(data, size, HostChunk::Kind::kPinned));
    }
    pinned_ = fallback_reason_.empty();
    if (pinned_) return;
  }
  for (size_t size : chunk_sizes) {
    chunks_.push_back(std::make_shared<HostChunk>(aligned_host_alloc(size), size, HostChunk::Kind::kAligned));
  }
}

size_t HostArena::nbytes() const {
  size_t total = 0;
  for (const auto& chunk : chunks_) total += chunk->nbytes();
  return total;
}

void parallel_memcpy(const std::vector<CopyOp>& ops, int max_threads) {
  size_t total = 0;
  for (const CopyOp& op : ops) total += op.nbytes;
  const int threads = thread_count(max_threads, total);
  if (threads <= 1) {
    copy_all(ops);
    return;
  }
  const auto lists = split_by_bytes(ops, total, threads);
  run_shares(lists.size(), [&lists](size_t share) { copy_all(lists[share]); });
}

CopyPlan::CopyPlan(std::shared_ptr<HostArena> arena, const ArenaLayout& layout) : arena_(std::move(arena)) {
  if (!arena_) throw InvalidArgument("arena must not be None");
  const auto& chunks = arena_->chunks();
  if (chunks.size() != layout.chunk_sizes.size()) {
    throw InvalidArgument("arena has " + std::to_string(chunks.size()) + " chunks, layout has " +
                          std::to_string(layout.chunk_sizes.size()));
  }
  host_.reserve(layout.sizes.size());
  for (size_t i = 0; i < layout.sizes.size(); ++i) {
    const HostChunk& chunk = *chunks.at(layout.chunk_index[i]);
    if (layout.offsets[i] + layout.sizes[i] > chunk.nbytes()) {
      throw InvalidArgument("slot " + std::to_string(i) + " does not fit its arena chunk");
    }
    host_.push_back(reinterpret_cast<uintptr_t>(chunk.data()) + layout.offsets[i]);
    total_bytes_ += layout.sizes[i];
  }
  sizes_ = layout.sizes;
}

std::vector<CopyOp> CopyPlan::ops(const std::vector<uintptr_t>& live, bool to_host, const Slots& slots) const {
  const size_t expected = slots.empty() ? host_.size() : slots.size();
  if (live.size() != expected) {
    throw InvalidArgument("expected " + std::to_string(expected) + " tensor addresses (one per " +
                          (slots.empty() ? "slot" : "entry of slots") + "), got " + std::to_string(live.size()));
  }
  std::vector<CopyOp> result;
  result.reserve(live.size());
  for (size_t i = 0; i < live.size(); ++i) {
    const size_t slot = slots.empty() ? i : slots[i];
    if (slot >= host_.size()) {
      throw InvalidArgument("slots[" + std::to_string(i) + "] = " + std::to_string(slot) + " is out of range (" +
                            std::to_string(host_.size()) + " slots)");
    }
    if (live[i] == 0) throw InvalidArgument("tensor address " + std::to_string(i) + " is null");
    void* host = reinterpret_cast<void*>(host_[slot]);
    void* other = reinterpret_cast<void*>(live[i]);
    result.push_back(to_host ? CopyOp{host, other, sizes_[slot]} : CopyOp{other, host, sizes_[slot]});
  }
  return result;
}

void CopyPlan::capture_host(const std::vector<uintptr_t>& live, int max_threads, const Slots& slots) const {
  parallel_memcpy(ops(live, true, slots), max_threads);
}

std::vector<double> CopyPlan::capture_host_checked(const std::vector<uintptr_t>& live, const std::vector<int>& dtypes,
                                                   int max_threads, const Slots& slots) const {
  return copy_sum_squares(ops(live, true, slots), dtypes, max_threads);
}

void CopyPlan::restore_host(const std::vector<uintptr_t>& live, int max_threads, const Slots& slots) const {
  parallel_memcpy(ops(live, false, slots), max_threads);
}

void CopyPlan::capture_device(const std::vector<uintptr_t>& live, uintptr_t stream, int device,
                              const Slots& slots) const {
  cuda::copy_async(ops(live, true, slots), true, stream, device, "snapshot capture (device to host)");
}

void CopyPlan::restore_device(const std::vector<uintptr_t>& live, uintptr_t stream, int device,
                              const Slots& slots) const {
  const auto copies = ops(live, false, slots);
  // Nothing may still be writing the live tensors (or reading them for an older capture)
  // when the restored bytes land.
  cuda::device_synchronize(device);
  cuda::copy_async(copies, false, stream, device, "snapshot restore (host to device)");
  cuda::stream_synchronize(stream, device);
}

}  // namespace tolaria
