// The CUDA runtime calls the snapshot engine needs, behind a header free of CUDA types so that
// plain C++ files can use them. Implemented in cuda_snapshot.cu, or by cuda_snapshot_stub.cpp
// in a build without nvcc (there every call that would need CUDA throws CudaError).
//
// tolaria links the static CUDA runtime, whose "current device" is its own and not torch's,
// so every call takes the device index explicitly, selects it for its duration and then puts
// the thread's previous device back.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "host_arena.h"

namespace tolaria {

// A CUDA runtime call failed. The message names the call and carries cudaGetErrorString;
// the bindings turn it into tolaria._C.CudaError (a RuntimeError).
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace cuda {

// Page-locked host memory (cudaHostAllocPortable, so every context sees it pinned).
// Returns nullptr and fills `error` when the runtime refuses; never throws.
void* pinned_alloc(size_t nbytes, int device, std::string* error) noexcept;
void pinned_free(void* ptr) noexcept;

// Enqueue `ops` on `stream` (a cudaStream_t as an integer; 0 is the legacy default stream) as
// one cudaMemcpyBatchAsync where the runtime has it, else one cudaMemcpyAsync per op.
// `device_to_host` picks the direction. Throws CudaError; `what` names the operation.
void copy_async(const std::vector<CopyOp>& ops, bool device_to_host, uintptr_t stream, int device,
                const char* what);

void device_synchronize(int device);
void stream_synchronize(uintptr_t stream, int device);

// True when this build enqueues batches with cudaMemcpyBatchAsync (CUDA >= 12.8).
bool batch_copy_compiled() noexcept;

// A cudaEvent_t without timing, created on `device`.
class Event {
 public:
  explicit Event(int device);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  int device() const { return device_; }
  // Captures the work queued on `stream` so far.
  void record(uintptr_t stream);
  // Makes `stream` wait, on the GPU, for the last record() (no host synchronization).
  void block_stream(uintptr_t stream);
  // True when the recorded work has completed (or nothing was ever recorded).
  bool query();
  // Blocks the calling thread until the recorded work has completed.
  void synchronize();

 private:
  uintptr_t handle_ = 0;
  int device_;
};

}  // namespace cuda
}  // namespace tolaria
