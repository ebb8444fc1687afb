// How the host-side passes (copies, the health sums) share work between threads: how many
// threads a pass of so many bytes gets, and running its shares with share 0 on the caller.
#pragma once

#include <algorithm>
#include <cstddef>
#include <functional>
#include <system_error>
#include <thread>
#include <vector>

namespace tolaria {

constexpr int kMaxAutoThreads = 8;

// `max_threads` > 0 caps the count; 0 or less: the hardware's, at most kMaxAutoThreads. Each
// thread gets at least `min_bytes_per_thread` (a thread costs tens of microseconds to start and
// one core already streams several GB/s), so small passes stay on one thread.
inline int host_thread_count(int max_threads, size_t total_bytes, size_t min_bytes_per_thread) {
  size_t limit = 0;
  if (max_threads > 0) {
    limit = static_cast<size_t>(max_threads);
  } else {
    const unsigned hardware = std::thread::hardware_concurrency();
    limit = std::min<size_t>(hardware == 0 ? 1 : hardware, kMaxAutoThreads);
  }
  return static_cast<int>(std::max<size_t>(1, std::min(limit, total_bytes / min_bytes_per_thread)));
}

// Runs work(0) .. work(shares - 1): share 0 here, the others on threads of their own; a share
// whose thread cannot be started runs here too, so the pass always completes.
inline void run_shares(size_t shares, const std::function<void(size_t)>& work) {
  std::vector<std::thread> workers;
  std::vector<size_t> here{0};
  workers.reserve(shares > 0 ? shares - 1 : 0);
  for (size_t share = 1; share < shares; ++share) {
    try {
      workers.emplace_back(work, share);
    } catch (const std::system_error&) {
      here.push_back(share);
    }
  }
  if (shares > 0) {
    for (size_t share : here) work(share);
  }
  for (auto& worker : workers) worker.join();
}

}  // namespace tolaria
