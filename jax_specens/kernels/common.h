// Shared by the kernels: Load16 (16 float32 lanes from float32 or bfloat16 bits) and Parallel
// (tasks on the calling thread and XLA's intra-op thread pool, each thread streaming its own
// contiguous range of them; helpers linger a little for the next call).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
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

// The tasks of one Parallel call, kept alive by every thread's reference (a helper that arrives
// after the last task only touches these counters). Tasks are split into one contiguous range per
// thread, in task order (for a product: the thread streams its part of the weight front to back);
// a thread whose range is empty takes tasks from the back of the fullest other range (a helper
// that starts late, or never, leaves its range to the others).
struct Job {
  static constexpr int kMaxRanges = 64;
  Job(int64_t tasks, int64_t threads, const std::function<void(int64_t)>* task)
      : tasks(tasks), ranges(std::min<int64_t>(std::max<int64_t>(threads, 1), kMaxRanges)),
        task(task) {
    for (int64_t r = 0; r < ranges; ++r)
      range[r].store(Pack(tasks * r / ranges, tasks * (r + 1) / ranges));
  }
  const int64_t tasks, ranges;
  const std::function<void(int64_t)>* task;  // called only while a task is left (the caller waits)
  std::atomic<uint64_t> range[kMaxRanges];  // [lo, hi) of tasks left in each range
  std::atomic<int64_t> arrived{0}, done{0};

  static uint64_t Pack(uint64_t lo, uint64_t hi) { return lo << 32 | hi; }
  // the next task of range r: its first (front) or last (!front); -1 when it is empty
  int64_t Claim(int64_t r, bool front) {
    uint64_t v = range[r].load();
    for (;;) {
      const uint64_t lo = v >> 32, hi = v & 0xffffffffu;
      if (lo >= hi) return -1;
      if (range[r].compare_exchange_weak(v, front ? Pack(lo + 1, hi) : Pack(lo, hi - 1)))
        return int64_t(front ? lo : hi - 1);
    }
  }
  void Work() {
    const int64_t own = arrived.fetch_add(1);
    for (int64_t i; own < ranges && (i = Claim(own, true)) >= 0;) Run(i);
    for (;;) {  // then the back of the fullest range (the front, where there is one range)
      int64_t best = -1, most = 0;
      for (int64_t r = 0; r < ranges; ++r) {
        const uint64_t v = range[r].load();
        const int64_t left = int64_t(v & 0xffffffffu) - int64_t(v >> 32);
        if (left > most) most = left, best = r;
      }
      if (best < 0) return;
      if (const int64_t i = Claim(best, ranges == 1); i >= 0) Run(i);
    }
  }
  void Run(int64_t i) {
    (*task)(i);
    done.fetch_add(1);
  }
};

// How long a helper that has run its tasks stays for the next call's (`Linger`). A decode pass
// makes a call every 10-60 us (products, attention), and a helper of XLA's pool that went back to
// sleep starts ~14 us after it is scheduled (measured in SmolLM2's decode). Measured on SmolLM2's
// bfloat16 decode loop, ms a token (median of 12 interleaved rounds): 7.31 without lingering, 7.29
// / 7.09 / 7.11 lingering 30 / 100 / 300 us.
constexpr int64_t kLingerMicros = 100;

// Where a lingering helper looks for the next call's tasks: the last job posted.
struct Mailbox {
  std::atomic<int64_t> waiting{0};  // helpers lingering now
  std::atomic<uint64_t> posted{0};  // the number of the last job posted
  std::mutex mu;
  std::shared_ptr<Job> job;  // the last job posted (under mu)
};
inline Mailbox mailbox;

// A helper's tail: until kLingerMicros pass without a new job, joins each job posted after job
// number `seen`, spinning in between (yielding the core now and then: XLA's own threads may need
// it). At most `most` helpers linger at once (one fewer than the pool's threads: one is always
// free for XLA's own work).
inline void Linger(uint64_t seen, int64_t most) {
  int64_t n = mailbox.waiting.load();
  do {
    if (n >= most) return;
  } while (!mailbox.waiting.compare_exchange_weak(n, n + 1));
  using clock = std::chrono::steady_clock;
  const auto wait = std::chrono::microseconds(kLingerMicros);
  auto until = clock::now() + wait;
  for (int spins = 0; clock::now() < until; ++spins) {
    if (mailbox.posted.load(std::memory_order_acquire) != seen) {
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mailbox.mu);
        job = mailbox.job;
        seen = mailbox.posted.load();
      }
      job->Work();
      until = clock::now() + wait;
      continue;
    }
    if (spins % 64 == 63) std::this_thread::yield(); else _mm_pause();
  }
  mailbox.waiting.fetch_sub(1);
}

// Runs task(i) for i < tasks on the calling thread and on XLA's intra-op pool; returns when every
// task has run. The caller never waits for a helper that has not started (the pool's threads may
// all be busy, e.g. running this same call for another operand): it claims tasks itself until none
// is left, then waits only for those claimed by helpers, which are running.
inline void Parallel(xla::ffi::ThreadPool& pool, int64_t tasks,
                     const std::function<void(int64_t)>& task) {
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, tasks - 1);
  auto job = std::make_shared<Job>(tasks, helpers + 1, &task);
  uint64_t number;
  {
    std::lock_guard<std::mutex> lock(mailbox.mu);
    mailbox.job = job;
    number = mailbox.posted.fetch_add(1, std::memory_order_release) + 1;
  }
  if (helpers > 0) helpers -= std::min<int64_t>(helpers, mailbox.waiting.load());
  const int64_t most = pool.num_threads() - 1;
  for (int64_t h = 0; h < helpers; ++h)
    pool.Schedule([job, number, most]() {
      job->Work();
      Linger(number, most);
    });
  job->Work();
  while (job->done.load() < tasks) std::this_thread::yield();
}

}  // namespace jax_specens
