// Attention of the W (<= 16) new queries of a decode pass over a row's KV cache, reading each
// visible cache slot once: the XLA program for this (`models/attend.py`'s blocked loop) runs a
// dozen small ops per 512-slot block and layer, and copies each block into its einsum's layout.
//
// q[B, W, H, Dh] float32 (Dh a multiple of 16, at most 256); k, v [B, S, K, Dh], or
// [n, B, S, K, Dh] (a stack of n layers' caches, read at `layer` in place), float32 or bfloat16
// bits; positions[B, W]. Query (b, w) at position p, head h (kv head h / (H / K)) sees slot j iff
// j <= p and, with window > 0, j > p - window; out[b, w, h] is
// softmax_j(scale * q.k_j, soft-capped by softcap > 0) . v_j, in float32.
// Tasks: a (row, kv head, chunk of kChunk slots) each, on the calling thread and XLA's pool; a
// task computes a maximum, sum and output per query over its chunk, 16 slots at a time in vector
// lanes (`Query`), and the chunks are merged in slot order. A query's result depends only on its
// own q, position and the cache: not on the other queries of the pass, so a W-token verification
// computes each token's attention exactly as W one-token passes would.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "common.h"

namespace ffi = xla::ffi;

namespace {

using jax_specens::Load16;
using jax_specens::Parallel;

constexpr int64_t kChunk = 256;  // slots per task
constexpr int kMaxBlocks = 16;   // Dh <= 16 * kMaxBlocks: a query's output stays in registers

struct Shape {
  int64_t B, W, H, Dh, S, K, G;
};

// r[i] = the sum of the 16 lanes of a[i]: pairs added within 128-bit lanes, then across them
inline __m512 Sum16(const __m512* a) {
  __m512 t[4];  // t[g], 128-bit lane L: the sums over lane L of a[4g], ..., a[4g + 3]
  for (int g = 0; g < 4; ++g) {
    const __m512* b = a + 4 * g;
    const __m512 s01 =
        _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
    const __m512 s23 =
        _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
    const __m512d x = _mm512_castps_pd(s01), y = _mm512_castps_pd(s23);
    t[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x44),
                                   _mm512_shuffle_f32x4(t[0], t[1], 0xEE));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x44),
                                   _mm512_shuffle_f32x4(t[2], t[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xDD));
}

// exp(x) for x <= 0 in 16 lanes (Cephes' expf: x = n ln2 + r, a degree-7 polynomial for e^r,
// scaled by 2^n; relative error ~1e-7). Lanes below -104 underflow to (nearly) 0.
inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                        5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Lanes i of the 16 slots from j0 with first <= j0 + i <= last
inline __mmask16 Live(int64_t j0, int64_t first, int64_t last) {
  const __m512i j = _mm512_add_epi32(_mm512_set1_epi32(int32_t(j0)),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                       13, 14, 15));
  return _mm512_cmpge_epi32_mask(j, _mm512_set1_epi32(int32_t(first))) &
         _mm512_cmple_epi32_mask(j, _mm512_set1_epi32(int32_t(last)));
}

// One query over the slots first <= j <= last of a chunk (indices from the chunk's start; slot
// j's key at k0 + j * stride, its value at v0 + j * stride): out = [m, l, acc[D]], the maximum
// score, the sum of the weights exp(score - m) and the unnormalised output (m = -inf, l = 0 where
// no slot is visible). Slots go 16 at a time, in groups aligned to the chunk's start (so a query's
// groups depend only on its own position): 16 dot products with q, summed across lanes together
// (`Sum16`), then their exponentials (`Exp16`); a group's slots outside the view weigh 0.
template <typename T, int DB>
void Query(const float* qr, const T* k0, const T* v0, int64_t stride, int64_t first, int64_t last,
           float scale, float softcap, bool prefetch, float* out) {
  constexpr int64_t D = 16 * DB, kAhead = 32;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(64) float score[kChunk], weight[16];
  __m512 o[DB], mv = ninf, lv = _mm512_setzero_ps();
  for (int d = 0; d < DB; ++d) o[d] = _mm512_setzero_ps();
  const int64_t g0 = first / 16 * 16;
  for (int64_t j0 = g0; j0 <= last; j0 += 16) {
    const T* row[16];  // slots past `last` read its row (their lanes are not live)
    for (int i = 0; i < 16; ++i) row[i] = k0 + std::min(j0 + i, last) * stride;
    if (prefetch)  // keys kAhead slots on (to L1), this group's values (to L2, read next)
      for (int i = 0; i < 16; ++i)
        for (int64_t byte = 0; byte < D * int64_t(sizeof(T)); byte += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(k0 + std::min(j0 + kAhead + i, last) * stride)
                       + byte, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(v0 + std::min(j0 + i, last) * stride) + byte,
                       _MM_HINT_T1);
        }
    __m512 a[16];
    for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
    for (int d = 0; d < DB; ++d) {
      const __m512 qd = _mm512_loadu_ps(qr + 16 * d);
      for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps(qd, Load16(row[i] + 16 * d), a[i]);
    }
    __m512 x = _mm512_mul_ps(Sum16(a), _mm512_set1_ps(scale));
    if (softcap > 0.0f) {
      _mm512_store_ps(weight, x);
      for (float& y : weight) y = std::tanh(y / softcap) * softcap;
      x = _mm512_load_ps(weight);
    }
    x = _mm512_mask_blend_ps(Live(j0, first, last), ninf, x);
    _mm512_store_ps(score + j0, x);
    mv = _mm512_max_ps(mv, x);
  }
  const float m = first <= last ? _mm512_reduce_max_ps(mv) : mv[0];
  const __m512 mb = _mm512_set1_ps(m);
  for (int64_t j0 = g0; j0 <= last; j0 += 16) {
    const __m512 e = _mm512_maskz_mov_ps(Live(j0, first, last),
                                         Exp16(_mm512_sub_ps(_mm512_load_ps(score + j0), mb)));
    lv = _mm512_add_ps(lv, e);
    _mm512_store_ps(weight, e);
    for (int64_t i = std::max<int64_t>(0, first - j0); i < std::min<int64_t>(16, last + 1 - j0);
         ++i) {
      const __m512 ei = _mm512_set1_ps(weight[i]);
      const T* vr = v0 + (j0 + i) * stride;
      for (int d = 0; d < DB; ++d) o[d] = _mm512_fmadd_ps(ei, Load16(vr + 16 * d), o[d]);
    }
  }
  out[0] = m;
  out[1] = _mm512_reduce_add_ps(lv);
  for (int d = 0; d < DB; ++d) _mm512_storeu_ps(out + 2 + 16 * d, o[d]);
}

// One (row b, kv head kh, chunk c) task: `Query` for each of the W x G queries that read this kv
// head, into part[w * G + g]. The first reads the chunk from memory, prefetching ahead; the
// others find it in cache.
template <typename T, int DB>
void Chunk(const Shape& s, const float* q, const T* k, const T* v, const int32_t* pos,
           float scale, int64_t window, float softcap, int64_t b, int64_t kh, int64_t c,
           float* part) {
  constexpr int64_t D = 16 * DB;
  const int64_t lo = c * kChunk, hi = std::min(s.S, lo + kChunk), stride = s.K * D;
  const T* k0 = k + ((b * s.S + lo) * s.K + kh) * D;  // the chunk's first slot
  const T* v0 = v + ((b * s.S + lo) * s.K + kh) * D;
  for (int64_t w = 0; w < s.W; ++w) {
    const int64_t p = pos[b * s.W + w];
    const int64_t first = std::max(lo, window > 0 ? p - window + 1 : int64_t{0}) - lo;
    const int64_t last = std::min(hi - 1, p) - lo;
    for (int64_t g = 0; g < s.G; ++g)
      Query<T, DB>(q + ((b * s.W + w) * s.H + kh * s.G + g) * D, k0, v0, stride, first, last,
                   scale, softcap, w == 0 && g == 0, part + (w * s.G + g) * (D + 2));
  }
}

template <typename T>
using ChunkFn = void (*)(const Shape&, const float*, const T*, const T*, const int32_t*, float,
                         int64_t, float, int64_t, int64_t, int64_t, float*);

// Chunk for Dh = 16 * blocks (1 <= blocks <= kMaxBlocks)
template <typename T, int DB = 1>
ChunkFn<T> ChunkFor(int64_t blocks) {
  if constexpr (DB == kMaxBlocks) {
    return &Chunk<T, DB>;
  } else {
    return blocks == DB ? &Chunk<T, DB> : ChunkFor<T, DB + 1>(blocks);
  }
}

template <typename T>
void Run(ffi::ThreadPool& pool, const Shape& s, const float* q, const T* k, const T* v,
         const int32_t* pos, float scale, int64_t window, float softcap, float* out) {
  int64_t top = 0;  // chunks up to the largest position of the batch (clipped to the cache)
  for (int64_t i = 0; i < s.B * s.W; ++i) top = std::max<int64_t>(top, pos[i]);
  const int64_t chunks = std::min(s.S - 1, top) / kChunk + 1;
  const int64_t per = s.W * s.G * (s.Dh + 2);  // floats of one task's partials
  std::vector<float> part(s.B * s.K * chunks * per);
  const ChunkFn<T> chunk = ChunkFor<T>(s.Dh / 16);
  Parallel(pool, s.B * s.K * chunks, [&](int64_t t) {
    const int64_t b = t / (s.K * chunks), kh = t / chunks % s.K, c = t % chunks;
    chunk(s, q, k, v, pos, scale, window, softcap, b, kh, c, part.data() + t * per);
  });
  for (int64_t b = 0; b < s.B; ++b)  // merge the chunks in slot order
    for (int64_t kh = 0; kh < s.K; ++kh)
      for (int64_t i = 0; i < s.W * s.G; ++i) {
        const int64_t w = i / s.G, h = kh * s.G + i % s.G;
        float* o = out + ((b * s.W + w) * s.H + h) * s.Dh;
        float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
        std::fill(o, o + s.Dh, 0.0f);
        for (int64_t c = 0; c < chunks; ++c) {
          const float* pc = part.data() + ((b * s.K + kh) * chunks + c) * per + i * (s.Dh + 2);
          if (pc[1] == 0.0f) continue;  // no visible slot in this chunk
          const float mn = std::max(m, pc[0]);
          const float fo = std::exp(m - mn), fc = std::exp(pc[0] - mn);
          l = l * fo + pc[1] * fc;
          for (int64_t d = 0; d < s.Dh; ++d) o[d] = o[d] * fo + pc[2 + d] * fc;
          m = mn;
        }
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t d = 0; d < s.Dh; ++d) o[d] *= inv;
      }
}

ffi::Error AttendImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                      ffi::AnyBuffer v, ffi::Buffer<ffi::S32> layer,
                      ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out,
                      float scale, int64_t window, float softcap) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const size_t r = kd.size();  // 4: one layer's cache; 5: a stack of n
  if (qd.size() != 4 || (r != 4 && r != 5) ||
      !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()))
    return ffi::Error::InvalidArgument("q must be [B, W, H, Dh], k and v [(n,) B, S, K, Dh]");
  Shape s{qd[0], qd[1], qd[2], qd[3], kd[r - 3], kd[r - 2], 0};
  if (kd[r - 4] != s.B || kd[r - 1] != s.Dh || s.H % s.K || s.Dh % 16 || s.Dh > 16 * kMaxBlocks)
    return ffi::Error::InvalidArgument("shapes differ (or Dh % 16 != 0 or > 256, H % K != 0)");
  s.G = s.H / s.K;
  if (positions.element_count() != s.B * s.W || layer.element_count() != 1)
    return ffi::Error::InvalidArgument("positions must be [B, W] and layer a scalar");
  const int64_t i = layer.typed_data()[0];
  if (i < 0 || i >= (r == 5 ? kd[0] : 1))
    return ffi::Error::InvalidArgument("layer outside the stack");
  if (k.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("k and v must have one dtype");
  const int64_t n = s.B * s.S * s.K * s.Dh;  // elements of one layer
  const int32_t* pos = positions.typed_data();
  if (k.element_type() == ffi::F32) {
    Run<float>(pool, s, q.typed_data(), static_cast<const float*>(k.untyped_data()) + i * n,
               static_cast<const float*>(v.untyped_data()) + i * n, pos, scale, window, softcap,
               out->typed_data());
  } else if (k.element_type() == ffi::BF16 || k.element_type() == ffi::U16) {
    Run<uint16_t>(pool, s, q.typed_data(), static_cast<const uint16_t*>(k.untyped_data()) + i * n,
                  static_cast<const uint16_t*>(v.untyped_data()) + i * n, pos, scale, window,
                  softcap, out->typed_data());
  } else {
    return ffi::Error::InvalidArgument("k and v must be float32, bfloat16 or its uint16 bits");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSpecensAttend, AttendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap"));
