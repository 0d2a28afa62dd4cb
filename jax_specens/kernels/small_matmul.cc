// y[M, N] = x[M, K] @ w for the few rows of a decode pass (M <= 16), float32 accumulation:
//   x float32, w float32 or bfloat16 (converted exactly to float32 in registers, then FMA);
//   x and w bfloat16 (a bfloat16 model's activations): AVX512-BF16's vdpbf16ps, which adds the
//   exact products of two bfloat16 pairs to each float32 lane (one instruction per 32 weights,
//   where the conversion costs three; built for the CPUs that have it, chosen by cpu.py).
// Weight layouts:
//   "nn": w[K, N] (a Linear kernel), rows of w streamed 8 at a time (4 for more than 2 rows of x;
//         bfloat16 x: 4 pairs) into accumulators kept in L1;
//   "nt": w[N, K] (a tied embedding used as the head), one dot product per row of w.
// One call takes one weight or several (q, k and v: their tasks run together), each 2-D or a
// stack w[n, ., .] (a scanned model's layers) read at w[layer] in place (XLA copies a sliced
// operand out before a custom call).
// A task reads its part of w once for every 4 rows of x ("nn") or 8 ("nt"): once per call for
// the 1-4 rows of a batch-1 decode pass, while XLA's CPU matrix product reads a weight at about
// half the bandwidth as soon as M > 1 (measured: a 4-row product costs 2x a 1-row one there).
// More rows re-read it (M = 8: twice for "nn"). Tasks (column blocks, or ranges of w's rows whose
// partial sums are added) are shared by the calling thread and XLA's intra-op thread pool.
// Built by jax_specens/kernels/cpu.py with -O3 -mavx512f -mfma (the vdpbf16ps functions carry
// their own target attribute); called through jax.ffi.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "common.h"

namespace ffi = xla::ffi;

namespace {

using jax_specens::Load16;
using jax_specens::Parallel;

constexpr int64_t kMaxCols = 2048;  // "nn": output columns per task (4 rows of accumulators: 32 KB)

// "nn": R rows of w[K, N] from row k into the accumulators of MB rows of x (acc[MB, cn]): the
// accumulators of 16 columns are loaded and stored once per R rows
template <typename W, int MB, int R>
inline void RowsNN(const float* xr, const W* w, float* acc, int64_t K, int64_t N, int64_t c0,
                   int64_t cn, int64_t k) {
  const W* r0 = w + k * N + c0;
  __m512 xv[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < R; ++j) xv[m][j] = _mm512_set1_ps(xr[m * K + k + j]);
  for (int64_t t = 0; t < cn; t += 16) {
    __m512 wv[R];
    for (int j = 0; j < R; ++j) wv[j] = Load16<W>(r0 + j * N + t);
    for (int m = 0; m < MB; ++m) {
      float* a = acc + m * cn + t;
      __m512 v = _mm512_load_ps(a);
      for (int j = 0; j < R; ++j) v = _mm512_fmadd_ps(xv[m][j], wv[j], v);
      _mm512_store_ps(a, v);
    }
  }
}

// "nn": y[m0 : m0 + MB, c0 : c0 + cn] for w[K, N], rows k0 <= k < k1 of w: 8 rows at a time for
// up to 2 rows of x, 4 for more (the broadcasts of x stay in registers), then one at a time
template <typename W, int MB>
void BlockNN(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t c0,
             int64_t cn, int64_t k0, int64_t k1) {
  constexpr int R = MB <= 2 ? 8 : 4;
  alignas(64) float acc[MB * kMaxCols];
  std::fill(acc, acc + MB * cn, 0.0f);
  const float* xr = x + m0 * K;
  int64_t k = k0;
  for (; k + R <= k1; k += R) RowsNN<W, MB, R>(xr, w, acc, K, N, c0, cn, k);
  for (; k < k1; ++k) RowsNN<W, MB, 1>(xr, w, acc, K, N, c0, cn, k);
  for (int m = 0; m < MB; ++m)
    std::memcpy(y + (m0 + m) * N + c0, acc + m * cn, cn * sizeof(float));
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

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// "nn", x and w bfloat16: rows k, k + 1 of w interleaved per column (vpunpck{l,h}wd, within
// 128-bit lanes) against the pair (x[k], x[k + 1]) broadcast. Accumulator i of a 32-column group
// holds column 8 (i % 16 / 4) + 4 (i >= 16) + i % 4; the order is undone when written out.
// P pairs of rows (2P rows of w from row k) at a time: the accumulators of a 32-column group are
// loaded and stored once per P pairs (measured on SmolLM2's MLP products, M = 1: P = 4 reads a
// weight 15-25% faster than P = 1); a last row without a partner is paired with a zero row.
template <int MB, int P>
BF16_TARGET inline void PairsNNbf16(const uint16_t* xr, const uint16_t* w, float* acc, int64_t K,
                                    int64_t N, int64_t c0, int64_t cn, int64_t k, int64_t k1) {
  bool pair[P];  // row k + 2j + 1 exists (P > 1: called with k + 2P <= k1)
  __m512bh xv[P][MB];
  for (int j = 0; j < P; ++j) {
    pair[j] = P > 1 || k + 2 * j + 1 < k1;
    for (int m = 0; m < MB; ++m) {
      const uint32_t hi = pair[j] ? uint32_t(xr[m * K + k + 2 * j + 1]) << 16 : 0u;
      xv[j][m] = (__m512bh)_mm512_set1_epi32(int(xr[m * K + k + 2 * j] | hi));
    }
  }
  const uint16_t* r0 = w + k * N + c0;
  for (int64_t t = 0; t < cn; t += 32) {
    __m512bh lo[P], hi[P];
    for (int j = 0; j < P; ++j) {
      const __m512i a = _mm512_loadu_si512(r0 + 2 * j * N + t);
      const __m512i b =
          pair[j] ? _mm512_loadu_si512(r0 + (2 * j + 1) * N + t) : _mm512_setzero_si512();
      lo[j] = (__m512bh)_mm512_unpacklo_epi16(a, b);
      hi[j] = (__m512bh)_mm512_unpackhi_epi16(a, b);
    }
    for (int m = 0; m < MB; ++m) {
      float* p = acc + m * cn + t;
      __m512 u = _mm512_load_ps(p), v = _mm512_load_ps(p + 16);
      for (int j = 0; j < P; ++j) {
        u = _mm512_dpbf16_ps(u, xv[j][m], lo[j]);
        v = _mm512_dpbf16_ps(v, xv[j][m], hi[j]);
      }
      _mm512_store_ps(p, u);
      _mm512_store_ps(p + 16, v);
    }
  }
}

template <int MB>
BF16_TARGET void BlockNNbf16(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N,
                             int64_t m0, int64_t c0, int64_t cn, int64_t k0, int64_t k1) {
  alignas(64) float acc[MB * kMaxCols];
  std::fill(acc, acc + MB * cn, 0.0f);
  const uint16_t* xr = x + m0 * K;
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) PairsNNbf16<MB, 4>(xr, w, acc, K, N, c0, cn, k, k1);
  for (; k < k1; k += 2) PairsNNbf16<MB, 1>(xr, w, acc, K, N, c0, cn, k, k1);
  for (int m = 0; m < MB; ++m)
    for (int64_t t = 0; t < cn; t += 32)
      for (int i = 0; i < 32; ++i)
        y[(m0 + m) * N + c0 + t + 8 * (i % 16 / 4) + 4 * (i >= 16) + i % 4] = acc[m * cn + t + i];
}

// "nt", x and w bfloat16: a row of w and a row of x are both contiguous along K
template <int MB>
BF16_TARGET void BlockNTbf16(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N,
                             int64_t m0, int64_t n0, int64_t rows) {
  const uint16_t* xr = x + m0 * K;
  const __mmask32 tail = __mmask32((1ull << (K % 32)) - 1);  // K % 32 is 0 or 16
  for (int64_t n = n0; n < n0 + rows; ++n) {
    const uint16_t* r = w + n * K;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(r + k);
      for (int m = 0; m < MB; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(xr + m * K + k), wv);
    }
    if (k < K) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, r + k);
      for (int m = 0; m < MB; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_maskz_loadu_epi16(tail, xr + m * K + k),
                                  wv);
    }
    for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

// The blocks of MB rows of x for activations X (float: float32, uint16_t: bfloat16) and weights W
template <typename X, typename W, int MB>
struct Block {
  static void NN(const X* x, const W* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t c0,
                 int64_t cn, int64_t k0, int64_t k1) {
    BlockNN<W, MB>(x, w, y, K, N, m0, c0, cn, k0, k1);
  }
  static void NT(const X* x, const W* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0,
                 int64_t rows) {
    BlockNT<W, MB>(x, w, y, K, N, m0, n0, rows);
  }
};
template <int MB>
struct Block<uint16_t, uint16_t, MB> {
  static void NN(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t m0,
                 int64_t c0, int64_t cn, int64_t k0, int64_t k1) {
    BlockNNbf16<MB>(x, w, y, K, N, m0, c0, cn, k0, k1);
  }
  static void NT(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t m0,
                 int64_t n0, int64_t rows) {
    BlockNTbf16<MB>(x, w, y, K, N, m0, n0, rows);
  }
};

// y[:, c0 : c0 + cn] (its own rows of leading dimension N) over w's rows k0 <= k < k1
template <typename X, typename W>
void TaskNN(const X* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t c0,
            int64_t cn, int64_t k0, int64_t k1) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: Block<X, W, 1>::NN(x, w, y, K, N, m0, c0, cn, k0, k1); break;
      case 2: Block<X, W, 2>::NN(x, w, y, K, N, m0, c0, cn, k0, k1); break;
      case 3: Block<X, W, 3>::NN(x, w, y, K, N, m0, c0, cn, k0, k1); break;
      default: Block<X, W, 4>::NN(x, w, y, K, N, m0, c0, cn, k0, k1); break;
    }
  }
}

template <typename X, typename W>
void TaskNT(const X* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
            int64_t rows) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: Block<X, W, 1>::NT(x, w, y, K, N, m0, n0, rows); break;
      case 2: Block<X, W, 2>::NT(x, w, y, K, N, m0, n0, rows); break;
      case 3: Block<X, W, 3>::NT(x, w, y, K, N, m0, n0, rows); break;
      case 4: Block<X, W, 4>::NT(x, w, y, K, N, m0, n0, rows); break;
      case 5: Block<X, W, 5>::NT(x, w, y, K, N, m0, n0, rows); break;
      case 6: Block<X, W, 6>::NT(x, w, y, K, N, m0, n0, rows); break;
      case 7: Block<X, W, 7>::NT(x, w, y, K, N, m0, n0, rows); break;
      default: Block<X, W, 8>::NT(x, w, y, K, N, m0, n0, rows); break;
    }
  }
}

// The tasks of one call's products (one weight or several), run together by one `Parallel`, then
// the sums of split products: one dispatch for q, k and v (a helper of XLA's pool that is not
// lingering from the previous call starts ~14 us after it is scheduled: a quarter of a 60 us
// product). Each weight's tasks are a segment, one function of the task's index: planning a call
// allocates one function per weight, not one per task.
struct Jobs {
  struct Segment {  // tasks run(0) ... run(tasks - 1)
    int64_t tasks;
    std::function<void(int64_t)> run;
  };
  std::vector<Segment> segments;
  std::vector<std::function<void()>> after;
  std::deque<std::vector<float>> partials;  // of the products split along K

  void Run(ffi::ThreadPool& pool) {
    std::vector<int64_t> starts;
    int64_t total = 0;
    for (const auto& s : segments) starts.push_back(total), total += s.tasks;
    Parallel(pool, total, [&](int64_t i) {
      const size_t j = std::upper_bound(starts.begin(), starts.end(), i) - starts.begin() - 1;
      segments[j].run(i - starts[j]);
    });
    for (const auto& f : after) f();
  }
};

// The tasks of y = x @ w (w [K, N]) or x @ w.T (nt: w [N, K]) for `threads` threads
template <typename X, typename W>
void Plan(Jobs& jobs, int64_t threads, bool nt, const X* x, const W* w, float* y, int64_t M,
          int64_t K, int64_t N) {
  if (nt) {
    const int64_t rows = std::max<int64_t>(16, N / (8 * threads));
    jobs.segments.push_back({(N + rows - 1) / rows, [=](int64_t i) {
                               TaskNT<X, W>(x, w, y, M, K, N, i * rows,
                                            std::min(rows, N - i * rows));
                             }});
  } else if (N <= kMaxCols) {
    // whole rows of w, contiguous in memory, split by K: each task sums its rows into its own
    // partial output, then the partials are added (M x N floats each, a few KB). A task's rows
    // are a multiple of 8 (the bfloat16 block's 4 pairs) where K allows.
    const int64_t split = std::min<int64_t>(threads, std::max<int64_t>(1, K / 64));
    const int64_t rows = ((K + split - 1) / split + 7) / 8 * 8;
    const int64_t parts = (K + rows - 1) / rows;
    float* partial = jobs.partials.emplace_back(parts * M * N).data();
    jobs.segments.push_back({parts, [=](int64_t i) {
                               TaskNN<X, W>(x, w, partial + i * M * N, M, K, N, 0, N, i * rows,
                                            std::min(K, (i + 1) * rows));
                             }});
    jobs.after.push_back([=] {
      for (int64_t j = 0; j < M * N; ++j) {
        float v = 0.0f;
        for (int64_t i = 0; i < parts; ++i) v += partial[i * M * N + j];
        y[j] = v;
      }
    });
  } else {
    jobs.segments.push_back({(N + kMaxCols - 1) / kMaxCols, [=](int64_t i) {
                               TaskNN<X, W>(x, w, y, M, K, N, i * kMaxCols,
                                            std::min(kMaxCols, N - i * kMaxCols), 0, K);
                             }});
  }
}

// The tasks of y = x @ w (or x @ w.T) for the 2-D weight of `dims` starting at `data`
ffi::Error Product(Jobs& jobs, int64_t threads, ffi::AnyBuffer x, const void* data,
                   ffi::DataType w_type, int64_t rows, int64_t cols, ffi::Buffer<ffi::F32>& y,
                   bool transposed) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D");
  const int64_t M = xd[0], K = xd[1];
  const int64_t N = transposed ? rows : cols;
  if ((transposed ? cols : rows) != K) return ffi::Error::InvalidArgument("K differs");
  if (N % 16 || (transposed && K % 16)) return ffi::Error::InvalidArgument("sizes not % 16");
  if (y.element_count() != M * N) return ffi::Error::InvalidArgument("y must be [M, N]");
  const auto* wf = static_cast<const float*>(data);
  const auto* wb = static_cast<const uint16_t*>(data);
  float* out = y.typed_data();
  if (x.element_type() == ffi::BF16) {
    if (w_type != ffi::BF16 || (!transposed && N % 32))
      return ffi::Error::InvalidArgument("bfloat16 x needs bfloat16 w (and N % 32 == 0 for nn)");
    Plan<uint16_t, uint16_t>(jobs, threads, transposed,
                             static_cast<const uint16_t*>(x.untyped_data()), wb, out, M, K, N);
  } else if (x.element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument("x must be float32 or bfloat16");
  } else if (w_type == ffi::F32) {
    Plan<float, float>(jobs, threads, transposed, static_cast<const float*>(x.untyped_data()), wf,
                       out, M, K, N);
  } else if (w_type == ffi::BF16) {
    Plan<float, uint16_t>(jobs, threads, transposed,
                          static_cast<const float*>(x.untyped_data()), wb, out, M, K, N);
  } else {
    return ffi::Error::InvalidArgument("weights must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

// ys[i] = x @ ws[i] (or x @ ws[i].T) for one or more weights, in one `Parallel`. layer < 0: each
// w is 2-D; else each is a stack [n, rows, cols] (a scanned model's layers) read at w[layer] in
// place (XLA would otherwise copy the layer's slice out of the stack before the call)
ffi::Error Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> layer,
                ffi::RemainingArgs ws, ffi::RemainingRets ys, bool transposed) {
  if (layer.element_count() != 1 || ws.size() != ys.size())
    return ffi::Error::InvalidArgument("layer must be a scalar, and one result per weight");
  const int64_t i = layer.typed_data()[0];
  Jobs jobs;
  for (size_t n = 0; n < ws.size(); ++n) {
    const auto w = ws.get<ffi::AnyBuffer>(n);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(n);
    if (!w.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("weights and results must be buffers (results float32)");
    const auto wd = w->dimensions();
    if (wd.size() != (i < 0 ? 2u : 3u))
      return ffi::Error::InvalidArgument("w must be 2-D (layer < 0) or a 3-D stack");
    if (i >= 0 && i >= wd[0]) return ffi::Error::InvalidArgument("layer outside the stack");
    const int64_t r = wd[wd.size() - 2], c = wd[wd.size() - 1];
    const auto* data = static_cast<const char*>(w->untyped_data()) +
                       std::max<int64_t>(i, 0) * r * c * ffi::ByteWidth(w->element_type());
    if (auto e = Product(jobs, std::max<int64_t>(1, pool.num_threads()), x, data,
                         w->element_type(), r, c, **y, transposed);
        e.failure())
      return e;
  }
  jobs.Run(pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSpecensSmallMatmul, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<bool>("transposed"));
