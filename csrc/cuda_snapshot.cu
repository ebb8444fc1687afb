// CUDA runtime calls of the snapshot engine: pinned memory, batched asynchronous copies,
// events and synchronization. Every cudaError_t is checked; a failure throws CudaError with
// the call's name and cudaGetErrorString. Nothing here launches a kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cuda_snapshot.h"

namespace tolaria {
namespace cuda {
namespace {

// cudaMemcpyBatchAsync takes the whole batch in one call; very long batches are cut so that
// the temporary arrays (and any per-call limit of the driver) stay small.
constexpr size_t kMaxBatch = 4096;

std::string describe(cudaError_t status) {
  return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
}

void check(cudaError_t status, const char* call, const char* what = nullptr) {
  if (status == cudaSuccess) return;
  // Reset the runtime's "last error" so it does not surface later in an unrelated call.
  (void)cudaGetLastError();
  std::string message = std::string(call) + " failed";
  if (what != nullptr) message += std::string(" during ") + what;
  throw CudaError(message + " (" + describe(status) + ")");
}

// Selects `device` for the scope and then puts the previous device back. The static runtime
// and torch's runtime share the thread's current driver context, so leaving our device
// selected would silently change torch.cuda.current_device() on multi-GPU machines.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) {
      if (cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
    } else {
      (void)cudaGetLastError();
    }
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void copy_loop(const std::vector<CopyOp>& ops, cudaMemcpyKind kind, cudaStream_t stream, const char* what) {
  for (const CopyOp& op : ops) {
    if (op.nbytes == 0) continue;
    check(cudaMemcpyAsync(op.dst, op.src, op.nbytes, kind, stream), "cudaMemcpyAsync", what);
  }
}

#if CUDART_VERSION >= 12080
// One call per batch: the driver schedules the copies together instead of paying a launch
// per tensor, which is what makes many small tensors cheap. Returns false (and clears the
// error) when the driver refuses batches so the caller can fall back to the loop.
bool copy_batched(const std::vector<CopyOp>& ops, bool device_to_host, int device, cudaStream_t stream) {
  cudaMemcpyAttributes attributes{};
  // Sources are read in stream order: the copies must see everything queued before them.
  attributes.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attributes.srcLocHint.type = device_to_host ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
  attributes.srcLocHint.id = device_to_host ? device : 0;
  attributes.dstLocHint.type = device_to_host ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  attributes.dstLocHint.id = device_to_host ? 0 : device;
  // Captures run beside training; let the copy engines overlap with its kernels.
  attributes.flags = device_to_host ? cudaMemcpyFlagPreferOverlapWithCompute : cudaMemcpyFlagDefault;
  size_t attribute_index = 0;

  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  for (size_t begin = 0; begin < ops.size(); begin += kMaxBatch) {
    const size_t end = std::min(ops.size(), begin + kMaxBatch);
    dsts.clear();
    srcs.clear();
    sizes.clear();
    for (size_t i = begin; i < end; ++i) {
      if (ops[i].nbytes == 0) continue;
      dsts.push_back(ops[i].dst);
      srcs.push_back(ops[i].src);
      sizes.push_back(ops[i].nbytes);
    }
    if (dsts.empty()) continue;
#if CUDART_VERSION >= 13000
    const cudaError_t status = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(),
                                                    &attributes, &attribute_index, 1, stream);
#else
    size_t fail_index = 0;
    const cudaError_t status = cudaMemcpyBatchAsync(dsts.data(), const_cast<void**>(srcs.data()), sizes.data(),
                                                    dsts.size(), &attributes, &attribute_index, 1, &fail_index,
                                                    stream);
#endif
    if (status == cudaErrorNotSupported || status == cudaErrorInvalidValue) {
      // Copies enqueued before the refusal are harmless to repeat: the loop writes the same
      // bytes from the same sources, in the same stream order.
      (void)cudaGetLastError();
      return false;
    }
    check(status, "cudaMemcpyBatchAsync");
  }
  return true;
}
#endif

}  // namespace

void* pinned_alloc(size_t nbytes, int device, std::string* error) noexcept {
  void* data = nullptr;
  try {
    DeviceScope scope(device);
    check(cudaHostAlloc(&data, std::max<size_t>(nbytes, 1), cudaHostAllocPortable), "cudaHostAlloc");
  } catch (const CudaError& failure) {
    if (error != nullptr) *error = failure.what();
    return nullptr;
  } catch (...) {  // std::bad_alloc building the message: still a refusal, never an escape
    if (error != nullptr) *error = "cudaHostAlloc failed";
    return nullptr;
  }
  return data;
}

void pinned_free(void* ptr) noexcept {
  if (ptr == nullptr) return;
  // At interpreter exit the driver may already be gone; there is nothing left to report to.
  if (cudaFreeHost(ptr) != cudaSuccess) (void)cudaGetLastError();
}

void copy_async(const std::vector<CopyOp>& ops, bool device_to_host, uintptr_t stream, int device,
                const char* what) {
  if (ops.empty()) return;
  DeviceScope scope(device);
  const cudaMemcpyKind kind = device_to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
#if CUDART_VERSION >= 12080
  // Batches are not accepted on the legacy default stream (handle 0).
  if (stream != 0 && copy_batched(ops, device_to_host, device, as_stream(stream))) return;
#endif
  copy_loop(ops, kind, as_stream(stream), what);
}

void device_synchronize(int device) {
  DeviceScope scope(device);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

void stream_synchronize(uintptr_t stream, int device) {
  DeviceScope scope(device);
  check(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize");
}

bool batch_copy_compiled() noexcept {
#if CUDART_VERSION >= 12080
  return true;
#else
  return false;
#endif
}

Event::Event(int device) : device_(device) {
  DeviceScope scope(device);
  cudaEvent_t event = nullptr;
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  handle_ = reinterpret_cast<uintptr_t>(event);
}

Event::~Event() {
  // Destroying an event with pending work is allowed; the runtime frees it on completion.
  if (cudaEventDestroy(reinterpret_cast<cudaEvent_t>(handle_)) != cudaSuccess) (void)cudaGetLastError();
}

void Event::record(uintptr_t stream) {
  DeviceScope scope(device_);
  check(cudaEventRecord(reinterpret_cast<cudaEvent_t>(handle_), as_stream(stream)), "cudaEventRecord");
}

void Event::block_stream(uintptr_t stream) {
  DeviceScope scope(device_);
  check(cudaStreamWaitEvent(as_stream(stream), reinterpret_cast<cudaEvent_t>(handle_), 0), "cudaStreamWaitEvent");
}

bool Event::query() {
  DeviceScope scope(device_);
  const cudaError_t status = cudaEventQuery(reinterpret_cast<cudaEvent_t>(handle_));
  if (status == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return false;
  }
  check(status, "cudaEventQuery");
  return true;
}

void Event::synchronize() {
  DeviceScope scope(device_);
  check(cudaEventSynchronize(reinterpret_cast<cudaEvent_t>(handle_)), "cudaEventSynchronize");
}

}  // namespace cuda
}  // namespace tolaria
