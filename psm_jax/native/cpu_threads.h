// Threads for psm-jax's FFI kernels: how many, and contiguous shares of a range (shared by every kernel source).
#pragma once

#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace psm {

// $PSM_KERNEL_THREADS (or the older $PSM_SAE_KERNEL_THREADS), else the CPUs in this process's affinity mask.
inline int NumThreads() {
  for (const char* var : {"PSM_KERNEL_THREADS", "PSM_SAE_KERNEL_THREADS"}) {
    if (const char* env = std::getenv(var)) {
      int n = std::atoi(env);
      if (n > 0) return n;
    }
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// f(begin, end) over [0, n) split in contiguous ranges of at least min_per_thread; the calling thread takes the
// first range, and small problems stay on it.
template <typename F>
void ParallelFor(int64_t n, int64_t min_per_thread, F f) {
  if (n <= 0) return;
  int64_t nt = std::min<int64_t>(NumThreads(), std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread)));
  if (nt <= 1) {
    f(int64_t{0}, n);
    return;
  }
  int64_t chunk = (n + nt - 1) / nt;
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < nt; ++t) {
    int64_t b = t * chunk, e = std::min(n, b + chunk);
    if (b < e) threads.emplace_back([=] { f(b, e); });
  }
  f(int64_t{0}, std::min(n, chunk));
  for (auto& t : threads) t.join();
}

}  // namespace psm
