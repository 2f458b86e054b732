// Decode attention for every decode row of a step in one call: each row's one query over its
// request's keys and values in the KV pool (softmax of scaled dot products, grouped query heads, as
// transformers' SDPA attention computes it), for all rows of a layer at once. Built with the native
// decode layers by `bulk/models/native.py`; `bulk/models/batched_attention.py` says when it is used.
//
// Why not one SDPA call per row: a decode row's attention is a few microseconds of arithmetic over
// its request's keys and values, and SDPA's own setup per call (buffers, its thread split over the
// row's few key heads) cost more than the arithmetic; with the calls from Python, 16 rows x 30
// layers of them were a third of a 16-row step of SmolLM2. Here the work is cut into tasks of one
// row, one key head and one slice of `kSlice` keys, spread over the threads; a task reads each key
// and value once, converts it to float32 in registers (a bfloat16 pool is read as it is, half the
// bytes of float32), and serves every query head of its group with it, keeping a running softmax
// (flash attention's) in registers. The slices' partial softmaxes are merged per row afterwards, as
// flash-decoding does. A step reads a pool far larger than the caches, so what sets the speed is how
// fast the keys and values arrive: the task asks for the rows ahead of the block it computes
// (`prefetch_rows`), widens bfloat16 without moving lanes (`Row`), and scores 16 keys with one
// packed reduction (`sums16`), so that both threads stream the pool at the memory's speed. A row's result depends on its own keys only (the slices are fixed, not
// sized by how many rows run), so a row computes the same bits in any batch.
//
// On a CPU with AVX512-BF16, a bfloat16 pool's slices take the pair dot product instead
// (`attend_slice_pairs`): no widening, probabilities rounded to bfloat16 as the prompt kernel rounds
// them; 16 rows over 256 tokens 203 -> 178 us a layer on one Zen 4 thread.
//
// The arithmetic is float32 whatever the pool holds, summed in another order than SDPA's, so the
// outputs differ from SDPA's in the last bits; the engine's two forwards (transformers' modules and
// `llama_step`'s loop) both call this for decode rows and stay bit-identical to each other. Shapes
// it has no kernel for (a head size other than 32, 64, 80, 96, 128 or 256, more than 8 query heads
// per key head, a half-precision pool) take SDPA, one call per row, the rows spread over the
// threads.
//
// GCC's vector extensions (16 floats, `vec.h`) keep it portable: the compiler lowers them to AVX-512,
// AVX2 or NEON, whichever `-march=native` offers.
//
//   query    (1, q_heads, N, head_dim)            after rotary
//   layer    (2, kv_heads, pool_tokens, head_dim) one layer of the pool: keys, then values
//   starts, ends                                  per row: its KV range in the pool (this step's
//                                                 token included)
//   float32  the SDPA path only: attend in float32 (`batched_attention.attends_in_float32`)
//   returns  (1, N, q_heads, head_dim), in the query's dtype

#include "decode_attention.h"
#include "tiles.h"
#include "vec.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace bul {
namespace {

using namespace vec;

constexpr int kBlock = 32;         // keys scored at a time, before their values are summed
constexpr int64_t kSlice = 256;    // keys per task

inline float sum16(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// e^x for x <= 0 (scores minus their maximum), within 2 ulp; anything below -87 counts as -87 (a
// padded score's -inf adds about 1e-38 to its sum, nothing to the values): x = n ln 2 + r, e^r by
// Cephes' expf polynomial, 2^n written into the exponent bits.
inline f32x16 exp16(f32x16 x) {
  x = x > splat(-87.f) ? x : splat(-87.f);  // also NaN -> -87: converting NaN to int is undefined
  const f32x16 t = x * splat(1.44269504088896341f) + splat(0.5f);
  i32x16 n = __builtin_convertvector(t, i32x16);  // truncation: rounds negative t up
  n = n + (__builtin_convertvector(n, f32x16) > t);  // ... so step those down: floor(t)
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  f32x16 r = x - nf * splat(0.693359375f);
  r = r - nf * splat(-2.12194440e-4f);
  f32x16 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.f);
  const i32x16 bits = (n + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// A row of keys or values, D elements, read as D / 16 float32 vectors. A float32 row is loaded as
// it is. A bfloat16 row is widened: 32 elements loaded as 16 32-bit lanes hold an even element in
// each lane's low half and an odd one in its high half, so a shift and a mask give the evens and
// the odds as two float32 vectors (bfloat16 is the top half of a float32), two operations and no
// movement across lanes. A dot product does not care in which order its terms come, so the query is
// laid out in the same order once per task (`Row::dim`), and the weighted sum of the values is kept
// in that order and put back in place at the end. (A head size that is not a multiple of 32 widens
// 16 elements at a time, in place.)
template <typename T, int D>
struct Row {
  static constexpr int V = D / kLanes;
  static constexpr bool kPairs = false;
  static void load(const T* p, f32x16* out) {
    for (int v = 0; v < V; ++v) out[v] = load16(p + v * kLanes);
  }
  static int dim(int v, int lane) { return v * kLanes + lane; }  // the element in vector v's lane
};

template <int D>
struct Row<c10::BFloat16, D> {
  static constexpr int V = D / kLanes;
  static constexpr bool kPairs = D % (2 * kLanes) == 0;
  static void load(const c10::BFloat16* p, f32x16* out) {
    if constexpr (kPairs) {
      for (int c = 0; c < V / 2; ++c) {
        u32x16 raw;
        std::memcpy(&raw, p + c * 2 * kLanes, sizeof(raw));
        const u32x16 even = raw << 16, odd = raw & 0xFFFF0000u;
        std::memcpy(&out[2 * c], &even, sizeof(even));
        std::memcpy(&out[2 * c + 1], &odd, sizeof(odd));
      }
    } else {
      for (int v = 0; v < V; ++v) out[v] = load16(p + v * kLanes);
    }
  }
  static int dim(int v, int lane) { return kPairs ? (v / 2) * 2 * kLanes + 2 * lane + v % 2 : v * kLanes + lane; }
};

// Lane t of the result is the sum of d[t]'s lanes: 16 horizontal sums at once, by halving (each step
// adds the two halves of every vector's partial sums and packs two vectors' into one), 15 additions
// instead of 16 reductions of 4 steps each and 16 scalar stores.
inline f32x16 sums16(const f32x16* d) {
  f32x16 e[8], f[4], g[2];
  for (int j = 0; j < 8; ++j) {  // lanes 0-7: 8 partial sums of d[2j]; 8-15: of d[2j+1]
    const f32x16 a = d[2 * j], b = d[2 * j + 1];
    e[j] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int j = 0; j < 4; ++j) {  // 4 partial sums of each of d[4j .. 4j+3]
    const f32x16 a = e[2 * j], b = e[2 * j + 1];
    f[j] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int j = 0; j < 2; ++j) {  // 2 partial sums of each of d[8j .. 8j+7]
    const f32x16 a = f[2 * j], b = f[2 * j + 1];
    g[j] = __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(g[0], g[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(g[0], g[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Asks the memory for the rows of keys and values `ahead` rows on while this block is computed: a
// step reads a pool far larger than the caches (16 rows of 256 tokens are 94 MB over SmolLM2's 30
// layers), and two threads that wait for each block in turn read it at a third of the memory's speed.
template <int D, typename T>
inline void prefetch_rows(const T* keys, const T* values, int64_t stride, int64_t first, int64_t last) {
  constexpr int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t t = first; t < last; ++t) {
    const char* k = reinterpret_cast<const char*>(keys + t * stride);
    const char* v = reinterpret_cast<const char*>(values + t * stride);
    for (int64_t at = 0; at < bytes; at += 64) {
      __builtin_prefetch(k + at);
      __builtin_prefetch(v + at);
    }
  }
}

// A slice's partial softmax for the G query heads of one key head: the largest score, the sum of
// e^(score - largest), and the values weighted by those.
struct Partial {
  float* max;  // (G)
  float* sum;  // (G)
  float* acc;  // (G, D)
};

constexpr int64_t kAhead = 2 * kBlock;  // rows prefetched ahead of the block being computed

// tanh(x) for 16 lanes, from e^(-2|x|) (`exp16` takes x <= 0): (1 - e) / (1 + e), the sign put back.
inline f32x16 tanh16(f32x16 x) {
  const f32x16 magnitude = x < splat(0.f) ? -x : x;
  const f32x16 e = exp16(splat(-2.f) * magnitude);
  const f32x16 t = (splat(1.f) - e) / (splat(1.f) + e);
  return x < splat(0.f) ? -t : t;
}

// 16 keys' scores from their dot products' lanes (`sums16`), times `scale` (1: the queries came
// scaled), soft-capped where `softcap` > 0 (Gemma 2's softcap * tanh(score / softcap)), into `s`.
inline void store_scores(const f32x16* dots, float scale, float softcap, float* s) {
  f32x16 scores = sums16(dots);
  if (scale != 1.f) scores = scores * splat(scale);
  if (softcap > 0.f) scores = splat(softcap) * tanh16(scores / splat(softcap));
  std::memcpy(s, &scores, sizeof(scores));
}

// q: (G, D) float32, already scaled; keys and values: `len` rows `stride` elements apart; `softcap`:
// scores soft-capped to softcap * tanh(score / softcap) (Gemma 2's), 0 for none.
template <int D, int G, typename T>
void attend_slice(const float* q, const T* keys, const T* values, int64_t stride, int64_t len, float softcap,
                  Partial out) {
  using R = Row<T, D>;
  constexpr int V = R::V;
  f32x16 qv[G][V], acc[G][V];
  float m[G], l[G];
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < V; ++v) {
      alignas(64) float lanes[kLanes];
      for (int i = 0; i < kLanes; ++i) lanes[i] = q[g * D + R::dim(v, i)];
      qv[g][v] = load16(lanes);
      acc[g][v] = splat(0.f);
    }
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
  }
  prefetch_rows<D>(keys, values, stride, 0, std::min(kAhead, len));
  alignas(64) float s[G][kBlock];
  alignas(64) f32x16 dots[G][kLanes];
  for (int64_t b = 0; b < len; b += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, len - b));
    prefetch_rows<D>(keys, values, stride, std::min(b + kAhead, len), std::min(b + kAhead + kBlock, len));
    for (int h = 0; h < n; h += kLanes) {  // scores, 16 keys at a time: each key read once for the G queries
      const int keys_here = std::min(kLanes, n - h);
      for (int t = 0; t < keys_here; ++t) {
        f32x16 kv[V];
        R::load(keys + (b + h + t) * stride, kv);
        for (int g = 0; g < G; ++g) {
          f32x16 d = qv[g][0] * kv[0];
          for (int v = 1; v < V; ++v) d += qv[g][v] * kv[v];
          dots[g][t] = d;
        }
      }
      for (int t = keys_here; t < kLanes; ++t) {
        for (int g = 0; g < G; ++g) dots[g][t] = splat(0.f);
      }
      for (int g = 0; g < G; ++g) store_scores(dots[g], 1.f, softcap, &s[g][h]);  // q came scaled
    }
    for (int g = 0; g < G; ++g) {  // the running softmax, rescaled to the block's new maximum
      float top = m[g];
      for (int t = 0; t < n; ++t) top = std::max(top, s[g][t]);
      const float rescale = std::exp(m[g] - top);  // 0 before the first block
      for (int t = n; t < kBlock; ++t) s[g][t] = -std::numeric_limits<float>::infinity();
      f32x16 total = splat(0.f);
      for (int t = 0; t < kBlock; t += kLanes) {
        const f32x16 e = exp16(load16(&s[g][t]) - splat(top));
        std::memcpy(&s[g][t], &e, sizeof(e));
        total += e;
      }
      l[g] = l[g] * rescale + sum16(total);
      m[g] = top;
      for (int v = 0; v < V; ++v) acc[g][v] *= splat(rescale);
    }
    for (int t = 0; t < n; ++t) {  // values: each read once for the G queries
      f32x16 vv[V];
      R::load(values + (b + t) * stride, vv);
      for (int g = 0; g < G; ++g) {
        const f32x16 p = splat(s[g][t]);
        for (int v = 0; v < V; ++v) acc[g][v] += p * vv[v];
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    out.max[g] = m[g];
    out.sum[g] = l[g];
    for (int v = 0; v < V; ++v) {
      alignas(64) float lanes[kLanes];
      std::memcpy(lanes, &acc[g][v], sizeof(lanes));
      for (int i = 0; i < kLanes; ++i) out.acc[g * D + R::dim(v, i)] = lanes[i];
    }
  }
}

#ifdef BUL_BF16_DOT
// The same slice for a bfloat16 pool on a CPU with AVX512-BF16, both products by the pair dot
// product (`vdpbf16ps`) instead of widening every key and value to float32: a score is the query
// (bfloat16, as the model gave it) dotted with the key in float32 sums of pairs, then scaled; the
// probabilities are rounded to bfloat16, as the prompt kernel's are (`prompt_attention.cpp`), and a
// pair of keys' values is interleaved (`unpacklo/hi`) so that one instruction weighs both. The
// running softmax sums the rounded probabilities, the weights the values get. About half the
// instructions a key of the float32 path; the same bits for a row in any batch.
//   q16: (G, D) bfloat16, unscaled; D a multiple of 32
template <int D, int G>
void attend_slice_pairs(const uint16_t* q16, float scale, const c10::BFloat16* keys, const c10::BFloat16* values,
                        int64_t stride, int64_t len, float softcap, Partial out) {
  constexpr int Z = D / 32;  // 512-bit vectors a row: 32 bfloat16 each
  __m512bh qz[G][Z];
  __m512 acc[G][2 * Z];  // vector 2c + h: dims 32c + 8 (lane / 4) + 4h + lane % 4 (`unpack`'s order)
  float m[G], l[G];
  for (int g = 0; g < G; ++g) {
    for (int c = 0; c < Z; ++c) qz[g][c] = (__m512bh)_mm512_loadu_si512(q16 + g * D + 32 * c);
    for (int v = 0; v < 2 * Z; ++v) acc[g][v] = _mm512_setzero_ps();
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
  }
  const uint16_t* k16 = reinterpret_cast<const uint16_t*>(keys);
  const uint16_t* v16 = reinterpret_cast<const uint16_t*>(values);
  prefetch_rows<D>(keys, values, stride, 0, std::min(kAhead, len));
  alignas(64) float s[G][kBlock];
  alignas(64) uint16_t p[G][kBlock];
  alignas(64) f32x16 dots[G][kLanes];
  for (int64_t b = 0; b < len; b += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, len - b));
    prefetch_rows<D>(keys, values, stride, std::min(b + kAhead, len), std::min(b + kAhead + kBlock, len));
    for (int h = 0; h < n; h += kLanes) {  // scores, 16 keys at a time
      const int keys_here = std::min(kLanes, n - h);
      for (int t = 0; t < keys_here; ++t) {
        const uint16_t* k = k16 + (b + h + t) * stride;
        __m512bh kz[Z];
        for (int c = 0; c < Z; ++c) kz[c] = (__m512bh)_mm512_loadu_si512(k + 32 * c);
        for (int g = 0; g < G; ++g) {
          __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), qz[g][0], kz[0]);
          for (int c = 1; c < Z; ++c) d = _mm512_dpbf16_ps(d, qz[g][c], kz[c]);
          std::memcpy(&dots[g][t], &d, sizeof(d));
        }
      }
      for (int t = keys_here; t < kLanes; ++t) {
        for (int g = 0; g < G; ++g) dots[g][t] = splat(0.f);
      }
      for (int g = 0; g < G; ++g) store_scores(dots[g], scale, softcap, &s[g][h]);
    }
    for (int g = 0; g < G; ++g) {  // the running softmax, rescaled to the block's new maximum
      float top = m[g];
      for (int t = 0; t < n; ++t) top = std::max(top, s[g][t]);
      const float rescale = std::exp(m[g] - top);  // 0 before the first block
      __m512 total = _mm512_setzero_ps();
      for (int t = 0; t < kBlock; t += kLanes) {
        const int valid = std::clamp(n - t, 0, kLanes);
        const __mmask16 inside = static_cast<__mmask16>((1u << valid) - 1u);
        f32x16 e = exp16(load16(&s[g][t]) - splat(top));
        __m512 ez;
        std::memcpy(&ez, &e, sizeof(ez));
        const __m256bh narrow = _mm512_cvtneps_pbh(_mm512_maskz_mov_ps(inside, ez));
        std::memcpy(&p[g][t], &narrow, sizeof(narrow));
        total = _mm512_add_ps(total, _mm512_cvtpbh_ps(narrow));  // the rounded weights the values get
      }
      l[g] = l[g] * rescale + _mm512_reduce_add_ps(total);
      m[g] = top;
      const __m512 r = _mm512_set1_ps(rescale);
      for (int v = 0; v < 2 * Z; ++v) acc[g][v] = _mm512_mul_ps(acc[g][v], r);
    }
    for (int t = 0; t < n; t += 2) {  // values, two keys at a time: each read once for the G queries
      const uint16_t* v0 = v16 + (b + t) * stride;
      const uint16_t* v1 = t + 1 < n ? v0 + stride : v0;  // an odd last key: weighed by p = 0
      for (int c = 0; c < Z; ++c) {
        const __m512i a = _mm512_loadu_si512(v0 + 32 * c), bb = _mm512_loadu_si512(v1 + 32 * c);
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, bb), hi = (__m512bh)_mm512_unpackhi_epi16(a, bb);
        for (int g = 0; g < G; ++g) {
          int32_t pair;  // (p_t, p_t+1), p_t in the low half as `unpack` puts v_t
          std::memcpy(&pair, &p[g][t], sizeof(pair));
          const __m512bh pp = (__m512bh)_mm512_set1_epi32(pair);
          acc[g][2 * c] = _mm512_dpbf16_ps(acc[g][2 * c], pp, lo);
          acc[g][2 * c + 1] = _mm512_dpbf16_ps(acc[g][2 * c + 1], pp, hi);
        }
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    out.max[g] = m[g];
    out.sum[g] = l[g];
    for (int v = 0; v < 2 * Z; ++v) {
      alignas(64) float lanes[kLanes];
      _mm512_store_ps(lanes, acc[g][v]);
      for (int i = 0; i < kLanes; ++i) out.acc[g * D + 32 * (v / 2) + 8 * (i / 4) + 4 * (v % 2) + i % 4] = lanes[i];
    }
  }
}
#endif

// A slice kernel: q (G, D) float32, scaled; q16 the same queries in bfloat16, unscaled (for the
// pair kernel: nullptr where the query is not bfloat16).
using SliceKernel = void (*)(const float*, const uint16_t*, float, const void*, const void*, int64_t, int64_t, float,
                             Partial);

template <int D, int G, typename T>
void slice_kernel(const float* q, const uint16_t*, float, const void* keys, const void* values, int64_t stride,
                  int64_t len, float softcap, Partial out) {
  attend_slice<D, G, T>(q, static_cast<const T*>(keys), static_cast<const T*>(values), stride, len, softcap, out);
}

#ifdef BUL_BF16_DOT
template <int D, int G>
void pair_kernel(const float*, const uint16_t* q16, float scale, const void* keys, const void* values,
                 int64_t stride, int64_t len, float softcap, Partial out) {
  attend_slice_pairs<D, G>(q16, scale, static_cast<const c10::BFloat16*>(keys),
                           static_cast<const c10::BFloat16*>(values), stride, len, softcap, out);
}
#endif

template <int D, typename T>
SliceKernel kernel_for_groups(int64_t groups) {
#ifdef BUL_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16> && D % 32 == 0) {
    switch (groups) {
      case 1: return pair_kernel<D, 1>;
      case 2: return pair_kernel<D, 2>;
      case 3: return pair_kernel<D, 3>;
      case 4: return pair_kernel<D, 4>;
      case 5: return pair_kernel<D, 5>;
      case 6: return pair_kernel<D, 6>;
      case 7: return pair_kernel<D, 7>;
      case 8: return pair_kernel<D, 8>;
      default: return nullptr;
    }
  }
#endif
  switch (groups) {
    case 1: return slice_kernel<D, 1, T>;
    case 2: return slice_kernel<D, 2, T>;
    case 3: return slice_kernel<D, 3, T>;
    case 4: return slice_kernel<D, 4, T>;
    case 5: return slice_kernel<D, 5, T>;
    case 6: return slice_kernel<D, 6, T>;
    case 7: return slice_kernel<D, 7, T>;
    case 8: return slice_kernel<D, 8, T>;
    default: return nullptr;
  }
}

template <typename T>
SliceKernel kernel_for(int64_t head_dim, int64_t groups) {
  switch (head_dim) {
    case 32: return kernel_for_groups<32, T>(groups);
    case 64: return kernel_for_groups<64, T>(groups);
    case 80: return kernel_for_groups<80, T>(groups);
    case 96: return kernel_for_groups<96, T>(groups);
    case 128: return kernel_for_groups<128, T>(groups);
    case 256: return kernel_for_groups<256, T>(groups);
    default: return nullptr;
  }
}

SliceKernel find_kernel(at::ScalarType dtype, int64_t head_dim, int64_t groups) {
  if (dtype == at::kFloat) return kernel_for<float>(head_dim, groups);
  if (dtype == at::kBFloat16) return kernel_for<c10::BFloat16>(head_dim, groups);
  return nullptr;
}

at::Tensor attend_with_kernel(SliceKernel kernel, const at::Tensor& query, const at::Tensor& layer,
                              const std::vector<int64_t>& starts, const std::vector<int64_t>& ends, float scale,
                              float softcap) {
  const int64_t q_heads = query.size(1), rows = query.size(2), head_dim = query.size(3);
  const int64_t kv_heads = layer.size(1), groups = q_heads / kv_heads;
  const int64_t head_stride = layer.stride(1), token_stride = layer.stride(2);
  const char* keys = static_cast<const char*>(layer.select(0, 0).const_data_ptr());
  const char* values = static_cast<const char*>(layer.select(0, 1).const_data_ptr());
  const int64_t item = layer.element_size();
  // (N, q_heads, head_dim) float32, scaled, and (for the pair kernel of a bfloat16 pool) bfloat16,
  // unscaled: a few kilobytes, gathered here rather than by ATen operations, whose calls cost more
  // than a short row's attention (about 14 us a layer for one row).
  const int64_t n_q = rows * q_heads * head_dim;
  std::vector<float> q(static_cast<size_t>(n_q));
  std::vector<uint16_t> q_half;
  const bool pairs = layer.scalar_type() == at::kBFloat16;
  if (pairs) q_half.resize(static_cast<size_t>(n_q));
  const at::Tensor source = query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kFloat
                                ? query
                                : query.to(at::kFloat);  // half precision: through float32
  const int64_t sh = source.stride(1), sr = source.stride(2), sd = source.stride(3);
  auto gather = [&](auto* src) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t h = 0; h < q_heads; ++h) {
        const int64_t at = (r * q_heads + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) {
          const auto x = src[h * sh + r * sr + d * sd];
          q[at + d] = static_cast<float>(x) * scale;
          if (pairs) {
            const c10::BFloat16 half(x);
            std::memcpy(&q_half[at + d], &half, sizeof(half));
          }
        }
      }
    }
  };
  if (source.scalar_type() == at::kBFloat16) {
    gather(source.const_data_ptr<c10::BFloat16>());
  } else {
    gather(source.const_data_ptr<float>());
  }
  const float* qp = q.data();
  const uint16_t* q16 = pairs ? q_half.data() : nullptr;
  // Tasks row by row, key head by key head, slice by slice; task_first[r]: row r's first.
  std::vector<int64_t> task_first(static_cast<size_t>(rows + 1), 0), slices(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    slices[r] = (ends[r] - starts[r] + kSlice - 1) / kSlice;
    task_first[r + 1] = task_first[r] + slices[r] * kv_heads;
  }
  const int64_t tasks = task_first[rows];
  const int64_t part = groups * (head_dim + 2);
  std::vector<float> partials(static_cast<size_t>(tasks * part));
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    int64_t r = std::upper_bound(task_first.begin(), task_first.end(), first) - task_first.begin() - 1;
    for (int64_t task = first; task < last; ++task) {
      while (task >= task_first[r + 1]) ++r;
      const int64_t local = task - task_first[r];
      const int64_t h = local / slices[r], slice = local % slices[r];
      const int64_t begin = starts[r] + slice * kSlice, end = std::min(ends[r], begin + kSlice);
      const int64_t offset = (h * head_stride + begin * token_stride) * item;
      float* base = partials.data() + task * part;
      const int64_t q_at = (r * q_heads + h * groups) * head_dim;
      kernel(qp + q_at, q16 == nullptr ? nullptr : q16 + q_at, scale, keys + offset, values + offset, token_stride,
             end - begin, softcap, Partial{base, base + groups, base + 2 * groups});
    }
  });
  // Merge each (row, head) pair's slices: rescale each to the largest maximum, then normalise.
  std::vector<float> merged(static_cast<size_t>(n_q));
  float* op = merged.data();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < kv_heads; ++h) {
      const float* first = partials.data() + (task_first[r] + h * slices[r]) * part;
      for (int64_t g = 0; g < groups; ++g) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < slices[r]; ++s) top = std::max(top, first[s * part + g]);
        float* dst = op + (r * q_heads + h * groups + g) * head_dim;
        std::fill(dst, dst + head_dim, 0.f);
        float total = 0.f;
        for (int64_t s = 0; s < slices[r]; ++s) {
          const float* base = first + s * part;
          const float w = std::exp(base[g] - top);
          total += base[groups + g] * w;
          const float* acc = base + 2 * groups + g * head_dim;
          for (int64_t i = 0; i < head_dim; ++i) dst[i] += w * acc[i];
        }
        const float inv = 1.f / total;
        for (int64_t i = 0; i < head_dim; ++i) dst[i] *= inv;
      }
    }
  }
  // (1, N, q_heads, head_dim) in the query's dtype, rounded as ATen's conversion rounds
  at::Tensor out = at::empty({1, rows, q_heads, head_dim}, query.options());
  if (out.scalar_type() == at::kBFloat16) {
    c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < n_q; ++i) o[i] = c10::BFloat16(merged[i]);
  } else if (out.scalar_type() == at::kFloat) {
    std::memcpy(out.data_ptr<float>(), merged.data(), n_q * sizeof(float));
  } else {
    out.copy_(at::from_blob(merged.data(), out.sizes(), at::kFloat));
  }
  return out;
}

// Shapes without a kernel: SDPA, one call per row (transformers' call for one query and no mask),
// the rows spread over the threads when there are as many as threads.
// Soft-capped scores (`softcap` > 0), which SDPA has no option for, as the models' eager attention
// computes them: the scores, capped, a float32 softmax, the values.
at::Tensor attend_with_sdpa(const at::Tensor& query, const at::Tensor& layer, const std::vector<int64_t>& starts,
                            const std::vector<int64_t>& ends, double scaling, bool float32, double softcap) {
  const int64_t rows = query.size(2);
  const bool gqa = query.size(1) != layer.size(1);
  const at::ScalarType work = layer.scalar_type() == at::kFloat || float32 ? at::kFloat : query.scalar_type();
  std::vector<at::Tensor> outputs(static_cast<size_t>(rows));
  auto attend_row = [&](int64_t r) {
    at::Tensor q = query.slice(2, r, r + 1).to(work);
    at::Tensor k = layer.select(0, 0).slice(1, starts[r], ends[r]).unsqueeze(0).to(work);
    at::Tensor v = layer.select(0, 1).slice(1, starts[r], ends[r]).unsqueeze(0).to(work);
    if (softcap > 0) {
      const int64_t groups = query.size(1) / layer.size(1);
      k = k.repeat_interleave(groups, 1);
      v = v.repeat_interleave(groups, 1);
      at::Tensor scores = at::matmul(q, k.transpose(2, 3)) * scaling;
      scores = at::tanh(scores / softcap) * softcap;
      at::Tensor weights = at::softmax(scores, -1, at::kFloat).to(work);
      outputs[r] = at::matmul(weights, v).transpose(1, 2).to(query.scalar_type());
      return;
    }
    outputs[r] = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/std::nullopt, /*dropout_p=*/0.0,
                                                  /*is_causal=*/false, scaling, gqa)
                     .transpose(1, 2)
                     .to(query.scalar_type());  // (1, 1, heads, head_dim)
  };
  if (rows < at::get_num_threads()) {
    for (int64_t r = 0; r < rows; ++r) attend_row(r);  // each SDPA spreads its heads over the threads
  } else {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) attend_row(r);
    });
  }
  return rows == 1 ? outputs[0] : at::cat(outputs, 1);
}

}  // namespace

bool has_decode_kernel(at::ScalarType dtype, int64_t head_dim, int64_t groups) {
  return find_kernel(dtype, head_dim, groups) != nullptr;
}

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& layer, c10::IntArrayRef starts,
                            c10::IntArrayRef ends, double scaling, bool float32, double softcap) {
  TORCH_CHECK(query.dim() == 4 && query.size(0) == 1, "query: (1, q_heads, N, head_dim)");
  TORCH_CHECK(layer.dim() == 4 && layer.size(0) == 2, "layer: (2, kv_heads, pool_tokens, head_dim)");
  TORCH_CHECK(query.device().is_cpu() && layer.device().is_cpu(), "decode_attention runs on the CPU");
  const int64_t q_heads = query.size(1), rows = query.size(2), head_dim = query.size(3);
  TORCH_CHECK(layer.size(3) == head_dim, "query and pool head_dim differ");
  TORCH_CHECK(q_heads % layer.size(1) == 0, "query heads must be a multiple of key heads");
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == rows && static_cast<int64_t>(ends.size()) == rows,
              "one KV range per row");
  const std::vector<int64_t> first(starts.begin(), starts.end()), last(ends.begin(), ends.end());
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(0 <= first[r] && first[r] < last[r] && last[r] <= layer.size(2),
                "a row's KV range is outside the pool");
  }
  SliceKernel kernel = layer.stride(3) == 1 ? find_kernel(layer.scalar_type(), head_dim, q_heads / layer.size(1))
                                            : nullptr;
  if (kernel == nullptr) return attend_with_sdpa(query, layer, first, last, scaling, float32, softcap);
  return attend_with_kernel(kernel, query, layer, first, last, static_cast<float>(scaling),
                            static_cast<float>(softcap));
}

}  // namespace bul

TORCH_LIBRARY_FRAGMENT(bul, m) {
  m.def(
      "decode_attention(Tensor query, Tensor layer, int[] starts, int[] ends, float scaling, bool float32, "
      "float softcap=0.0) -> Tensor",
      &bul::decode_attention);
  m.def("has_decode_kernel(ScalarType dtype, int head_dim, int groups) -> bool", &bul::has_decode_kernel);
}
