// y[M, N] = x[M, K] @ w for the few rows of a decode pass (M <= 16), float32 or bfloat16 weights
// converted exactly to float32 in registers, float32 accumulation. Weight layouts:
//   "nn": w[K, N] (a Linear kernel), rows of w streamed four at a time;
//   "nt": w[N, K] (a tied embedding used as the head), one dot product per row of w.
// A task reads its part of w once for every 4 rows of x ("nn") or 8 ("nt"): once per call for
// the 1-4 rows of a batch-1 decode pass, while XLA's CPU matrix product reads a weight at about
// half the bandwidth as soon as M > 1 (measured: a 4-row product costs 2x a 1-row one there).
// More rows re-read it (M = 8: twice for "nn"). Tasks (column blocks, or ranges of w's rows whose
// partial sums are added) are shared by the calling thread and XLA's intra-op thread pool.
// Built by jax_specens/kernels/cpu.py with -O3 -mavx512f -mfma; called through jax.ffi.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxCols = 2048;  // "nn": output columns per task (4 rows of accumulators: 32 KB)

template <typename W>
inline __m512 Load16(const W* p);
template <>
inline __m512 Load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 Load16<uint16_t>(const uint16_t* p) {  // bfloat16 -> float32: the high 16 bits
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// "nn": y[m0 : m0 + MB, c0 : c0 + cn] for w[K, N]
template <typename W, int MB>
void BlockNN(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t c0,
             int64_t cn, int64_t k0, int64_t k1) {
  alignas(64) float acc[MB * kMaxCols];
  std::fill(acc, acc + MB * cn, 0.0f);
  const float* xr = x + m0 * K;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const W* r0 = w + k * N + c0;
    const W *r1 = r0 + N, *r2 = r1 + N, *r3 = r2 + N;
    __m512 xv[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < 4; ++j) xv[m][j] = _mm512_set1_ps(xr[m * K + k + j]);
    for (int64_t t = 0; t < cn; t += 16) {
      const __m512 w0 = Load16<W>(r0 + t), w1 = Load16<W>(r1 + t), w2 = Load16<W>(r2 + t),
                   w3 = Load16<W>(r3 + t);
      for (int m = 0; m < MB; ++m) {
        float* a = acc + m * cn + t;
        __m512 v = _mm512_load_ps(a);
        v = _mm512_fmadd_ps(xv[m][0], w0, v);
        v = _mm512_fmadd_ps(xv[m][1], w1, v);
        v = _mm512_fmadd_ps(xv[m][2], w2, v);
        v = _mm512_fmadd_ps(xv[m][3], w3, v);
        _mm512_store_ps(a, v);
      }
    }
  }
  for (; k < k1; ++k) {
    const W* r0 = w + k * N + c0;
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_set1_ps(xr[m * K + k]);
      for (int64_t t = 0; t < cn; t += 16) {
        float* a = acc + m * cn + t;
        _mm512_store_ps(a, _mm512_fmadd_ps(xv, Load16<W>(r0 + t), _mm512_load_ps(a)));
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    std::memcpy(y + (m0 + m) * N + c0, acc + m * cn, cn * sizeof(float));
}

// y[:, c0 : c0 + cn] (its own rows of leading dimension N) over w's rows k0 <= k < k1
template <typename W>
void TaskNN(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t c0,
            int64_t cn, int64_t k0, int64_t k1) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: BlockNN<W, 1>(x, w, y, K, N, m0, c0, cn, k0, k1); break;
      case 2: BlockNN<W, 2>(x, w, y, K, N, m0, c0, cn, k0, k1); break;
      case 3: BlockNN<W, 3>(x, w, y, K, N, m0, c0, cn, k0, k1); break;
      default: BlockNN<W, 4>(x, w, y, K, N, m0, c0, cn, k0, k1); break;
    }
  }
}

// "nt": y[m0 : m0 + MB, n] for rows n0 <= n < n0 + rows of w[N, K]
template <typename W, int MB>
void BlockNT(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0,
             int64_t rows) {
  const float* xr = x + m0 * K;
  for (int64_t n = n0; n < n0 + rows; ++n) {
    const W* r = w + n * K;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 wv = Load16<W>(r + k);
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + m * K + k), wv, acc[m]);
    }
    for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

template <typename W>
void TaskNT(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
            int64_t rows) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: BlockNT<W, 1>(x, w, y, K, N, m0, n0, rows); break;
      case 2: BlockNT<W, 2>(x, w, y, K, N, m0, n0, rows); break;
      case 3: BlockNT<W, 3>(x, w, y, K, N, m0, n0, rows); break;
      case 4: BlockNT<W, 4>(x, w, y, K, N, m0, n0, rows); break;
      case 5: BlockNT<W, 5>(x, w, y, K, N, m0, n0, rows); break;
      case 6: BlockNT<W, 6>(x, w, y, K, N, m0, n0, rows); break;
      case 7: BlockNT<W, 7>(x, w, y, K, N, m0, n0, rows); break;
      default: BlockNT<W, 8>(x, w, y, K, N, m0, n0, rows); break;
    }
  }
}

// Runs task(i) for i < tasks on the calling thread and on XLA's intra-op pool; returns when every
// task has run. The caller never waits for a helper that has not started (the pool's threads may
// all be busy, e.g. running this same call for another operand): it claims tasks itself until none
// is left, then waits only for those claimed by helpers, which are running. A helper that starts
// late finds no task and touches only the shared counters, kept alive by its own reference.
void Parallel(ffi::ThreadPool& pool, int64_t tasks, const std::function<void(int64_t)>& task) {
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

template <typename W>
void Run(ffi::ThreadPool& pool, bool nt, const float* x, const W* w, float* y, int64_t M,
         int64_t K, int64_t N) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());  // the caller is one of them
  if (nt) {
    const int64_t rows = std::max<int64_t>(16, N / (8 * threads));
    Parallel(pool, (N + rows - 1) / rows, [&](int64_t i) {
      TaskNT<W>(x, w, y, M, K, N, i * rows, std::min(rows, N - i * rows));
    });
  } else if (N <= kMaxCols) {
    // whole rows of w, contiguous in memory, split by K: each task sums its rows into its own
    // partial output, then the partials are added (M x N floats each, a few KB)
    const int64_t parts = std::min<int64_t>(threads, std::max<int64_t>(1, K / 64));
    const int64_t rows = (K + parts - 1) / parts;
    std::vector<float> partial(parts * M * N);
    Parallel(pool, parts, [&](int64_t i) {
      TaskNN<W>(x, w, partial.data() + i * M * N, M, K, N, 0, N, i * rows,
                std::min(K, (i + 1) * rows));
    });
    for (int64_t j = 0; j < M * N; ++j) {
      float v = 0.0f;
      for (int64_t i = 0; i < parts; ++i) v += partial[i * M * N + j];
      y[j] = v;
    }
  } else {
    const int64_t cols = kMaxCols;
    Parallel(pool, (N + cols - 1) / cols, [&](int64_t i) {
      TaskNN<W>(x, w, y, M, K, N, i * cols, std::min(cols, N - i * cols), 0, K);
    });
  }
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                ffi::ResultBuffer<ffi::F32> y, bool transposed) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("x and w must be 2-D");
  const int64_t M = xd[0], K = xd[1];
  const int64_t N = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != K) return ffi::Error::InvalidArgument("K differs");
  if (N % 16 || (transposed && K % 16)) return ffi::Error::InvalidArgument("sizes not % 16");
  if (w.element_type() == ffi::F32) {
    Run<float>(pool, transposed, x.typed_data(), static_cast<const float*>(w.untyped_data()),
               y->typed_data(), M, K, N);
  } else if (w.element_type() == ffi::BF16) {
    Run<uint16_t>(pool, transposed, x.typed_data(),
                  static_cast<const uint16_t*>(w.untyped_data()), y->typed_data(), M, K, N);
  } else {
    return ffi::Error::InvalidArgument("weights must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSpecensSmallMatmul, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));
