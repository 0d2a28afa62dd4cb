// Attention of the W (<= 16) new queries of a decode pass over a row's KV cache, reading each
// visible cache slot once: the XLA program for this (`models/attend.py`'s blocked loop) runs a
// dozen small ops per 512-slot block and layer, and copies each block into its einsum's layout.
//
// q[B, W, H, Dh] float32; k, v [B, S, K, Dh], or [n, B, S, K, Dh] (a stack of n layers' caches,
// read at `layer` in place), float32 or bfloat16 bits; positions[B, W]. Query (b, w) at position p, head h (kv head
// h / (H / K)) sees slot j iff j <= p and, with window > 0, j > p - window; out[b, w, h] is
// softmax_j(scale * q.k_j, soft-capped by softcap > 0) . v_j, in float32.
// Tasks: a (row, kv head, chunk of kChunk slots) each, on the calling thread and XLA's pool; a
// task keeps a running maximum, sum and output per query (online softmax over its chunk), and the
// chunks are merged in slot order. A query's result depends only on its own q, position and the
// cache: not on the other queries of the pass, so a W-token verification computes each token's
// attention exactly as W one-token passes would.
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

struct Shape {
  int64_t B, W, H, Dh, S, K, G;
};

// One (row b, kv head kh, chunk c) task: for each of the W x G queries, the maximum m, sum l and
// unnormalised output acc[Dh] over the visible slots of the chunk (m = -inf, l = 0 where none).
template <typename T>
void Chunk(const Shape& s, const float* q, const T* k, const T* v, const int32_t* pos,
           float scale, int64_t window, float softcap, int64_t b, int64_t kh, int64_t c,
           float* part) {
  const int64_t lo = c * kChunk, hi = std::min(s.S, lo + kChunk), D = s.Dh;
  std::vector<float> score(hi - lo);
  for (int64_t w = 0; w < s.W; ++w) {
    const int64_t p = pos[b * s.W + w];
    const int64_t first = std::max(lo, window > 0 ? p - window + 1 : int64_t{0});
    const int64_t last = std::min(hi - 1, p);  // inclusive
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t h = kh * s.G + g;
      const float* qv = q + ((b * s.W + w) * s.H + h) * D;
      float* out = part + (w * s.G + g) * (D + 2);  // [m, l, acc[D]]
      float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
      std::fill(out + 2, out + 2 + D, 0.0f);
      for (int64_t j = first; j <= last; ++j) {
        const T* kr = k + ((b * s.S + j) * s.K + kh) * D;
        __m512 a = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) a = _mm512_fmadd_ps(Load16(qv + d), Load16(kr + d), a);
        float x = _mm512_reduce_add_ps(a) * scale;
        if (softcap > 0.0f) x = std::tanh(x / softcap) * softcap;
        score[j - lo] = x;
        m = std::max(m, x);
      }
      for (int64_t j = first; j <= last; ++j) {
        const float e = std::exp(score[j - lo] - m);
        l += e;
        const T* vr = v + ((b * s.S + j) * s.K + kh) * D;
        const __m512 ev = _mm512_set1_ps(e);
        for (int64_t d = 0; d < D; d += 16)
          _mm512_storeu_ps(out + 2 + d, _mm512_fmadd_ps(ev, Load16(vr + d),
                                                        _mm512_loadu_ps(out + 2 + d)));
      }
      out[0] = m;
      out[1] = l;
    }
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
  Parallel(pool, s.B * s.K * chunks, [&](int64_t t) {
    const int64_t b = t / (s.K * chunks), kh = t / chunks % s.K, c = t % chunks;
    Chunk<T>(s, q, k, v, pos, scale, window, softcap, b, kh, c, part.data() + t * per);
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
  if (kd[r - 4] != s.B || kd[r - 1] != s.Dh || s.H % s.K || s.Dh % 16)
    return ffi::Error::InvalidArgument("shapes differ (or Dh % 16 != 0, H % K != 0)");
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
