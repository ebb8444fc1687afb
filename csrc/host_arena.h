// The host side of the snapshot engine: a layout planned once per tensor set, the host memory
// that layout lives in (pinned when it can be, pageable otherwise), and the copy plans that
// move bytes between that memory and live tensors. No Python and no torch in here: tensors are
// raw addresses and byte counts, so the same code serves CPU and CUDA tensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace tolaria {

// Raised for bad arguments; the bindings turn it into ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Where each tensor lives in an arena: tensor i occupies
// [offsets[i], offsets[i] + sizes[i]) of chunk chunk_index[i].
struct ArenaLayout {
  std::vector<size_t> sizes;
  std::vector<size_t> chunk_index;
  std::vector<size_t> offsets;
  std::vector<size_t> chunk_sizes;
  size_t alignment = 0;

  size_t total_bytes() const;
};

// Packs `sizes` (all > 0) in order, each offset a multiple of `alignment` (a power of two
// >= 256). A chunk grows until the next tensor would push it past `chunk_bytes`; a tensor
// larger than `chunk_bytes` gets a chunk of its own. Tensors never straddle chunks, so every
// tensor is one contiguous range and one copy.
ArenaLayout plan_layout(const std::vector<size_t>& sizes, size_t alignment, size_t chunk_bytes);

// One host allocation. Owned through shared_ptr so that tensors viewing it (through the
// Python buffer protocol) keep it alive after the arena that made it is gone.
class HostChunk {
 public:
  enum class Kind { kAligned, kPinned };

  HostChunk(void* data, size_t nbytes, Kind kind) : data_(data), nbytes_(nbytes), kind_(kind) {}
  ~HostChunk();
  HostChunk(const HostChunk&) = delete;
  HostChunk& operator=(const HostChunk&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  bool pinned() const { return kind_ == Kind::kPinned; }

 private:
  void* data_;
  size_t nbytes_;
  Kind kind_;
};

// The memory for one copy of a layout (the LKG, or the staging buffer). With `pin` the chunks
// come from cudaHostAlloc; if any chunk cannot be pinned, every chunk is pageable instead and
// fallback_reason() says why, so the caller can warn and keep working.
class HostArena {
 public:
  HostArena(const std::vector<size_t>& chunk_sizes, bool pin, int device);

  const std::vector<std::shared_ptr<HostChunk>>& chunks() const { return chunks_; }
  bool pinned() const { return pinned_; }
  const std::string& fallback_reason() const { return fallback_reason_; }
  size_t nbytes() const;

 private:
  std::vector<std::shared_ptr<HostChunk>> chunks_;
  bool pinned_ = false;
  std::string fallback_reason_;
};

// One byte range to copy.
struct CopyOp {
  void* dst;
  const void* src;
  size_t nbytes;
};

// memcpy of every op, split by bytes across up to `max_threads` threads when the total is
// large enough to pay for them (0 = as many as the hardware has, capped at 8). Blocking.
void parallel_memcpy(const std::vector<CopyOp>& ops, int max_threads);

// The fixed host side of one arena's slots, so that each capture or restore passes only the
// live tensors' addresses. Holds the arena, so its addresses stay valid while the plan lives.
class CopyPlan {
 public:
  CopyPlan(std::shared_ptr<HostArena> arena, const ArenaLayout& layout);

  size_t slots() const { return host_.size(); }
  size_t total_bytes() const { return total_bytes_; }
  const std::vector<uintptr_t>& host_addresses() const { return host_; }
  const std::shared_ptr<HostArena>& arena() const { return arena_; }

  // Every call pairs live[i] with slot i, or with slot slots[i] when `slots` is non-empty
  // (a subset, e.g. the keys a restore targets). live addresses are contiguous tensors.
  using Slots = std::vector<size_t>;

  // CPU tensors: live -> slot (capture) or slot -> live (restore). Blocking.
  void capture_host(const std::vector<uintptr_t>& live, int max_threads, const Slots& slots) const;
  void restore_host(const std::vector<uintptr_t>& live, int max_threads, const Slots& slots) const;
  // capture_host fused with the health pass: returns each copied slot's sum of squares
  // (dtypes: one code per address, as copy_sum_squares in host_health.h takes them).
  std::vector<double> capture_host_checked(const std::vector<uintptr_t>& live, const std::vector<int>& dtypes,
                                           int max_threads, const Slots& slots) const;

  // CUDA tensors: device->host copies enqueued on `stream`; returns before they complete.
  void capture_device(const std::vector<uintptr_t>& live, uintptr_t stream, int device, const Slots& slots) const;
  // Synchronizes the device, enqueues host->device copies on `stream`, synchronizes `stream`.
  void restore_device(const std::vector<uintptr_t>& live, uintptr_t stream, int device, const Slots& slots) const;

 private:
  std::vector<CopyOp> ops(const std::vector<uintptr_t>& live, bool to_host, const Slots& slots) const;

  std::shared_ptr<HostArena> arena_;
  std::vector<uintptr_t> host_;
  std::vector<size_t> sizes_;
  size_t total_bytes_ = 0;
};

}  // namespace tolaria
