// parallel_for over XLA's intra-op thread pool, shared by the CPU kernels (cpu_decode.cc, cpu_attention.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace internvl_kernels {

// Calls fn(i) for every i < n, on the calling thread and on up to `threads` - 1 pool tasks. Indices are claimed
// from a counter, so a task that starts after every index was claimed returns at once: the caller only waits
// for work being done, never for a task still queued (XLA may run several of these ops at once on one pool).
// fn is only called before parallel_for returns.
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t threads, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n = 0;
    const Fn* fn = nullptr;
    void run() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        (*fn)(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = &fn;
  for (int64_t t = 1; t < std::min(threads, n); ++t) pool.Schedule([state] { state->run(); });
  state->run();
  for (int spins = 0; state->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins > 1000) std::this_thread::yield();
  }
}

}  // namespace internvl_kernels
