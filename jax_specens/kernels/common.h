// Shared by the kernels: Load16 (16 float32 lanes from float32 or bfloat16 bits) and Parallel
// (tasks on the calling thread and XLA's intra-op thread pool).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jax_specens {

template <typename W>
inline __m512 Load16(const W* p);
template <>
inline __m512 Load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 Load16<uint16_t>(const uint16_t* p) {  // bfloat16 -> float32: the high 16 bits
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Runs task(i) for i < tasks on the calling thread and on XLA's intra-op pool; returns when every
// task has run. The caller never waits for a helper that has not started (the pool's threads may
// all be busy, e.g. running this same call for another operand): it claims tasks itself until none
// is left, then waits only for those claimed by helpers, which are running. A helper that starts
// late finds no task and touches only the shared counters, kept alive by its own reference.
inline void Parallel(xla::ffi::ThreadPool& pool, int64_t tasks,
                     const std::function<void(int64_t)>& task) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [tasks, &task](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < tasks;) {
      task(i);
      s.done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, tasks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state, work]() { work(*state); });
  work(*state);
  while (state->done.load() < tasks) std::this_thread::yield();
}

}  // namespace jax_specens
