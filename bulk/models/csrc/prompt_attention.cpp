// A prompt chunk's attention over its request's keys and values in the pool, for bfloat16 models on
// CPUs with AMX tiles: the two products on the tile unit, the softmax in float32 between them. On a
// CPU with AVX512-BF16 and no tile unit (AMD's Zen 4) the same code runs with each tile product done
// by the vector pair dot product (`VectorTiles`): torch's flash attention there computes in float32
// (0.66 s of a 1,000-token prompt's 1.8 s on SmolLM2, one thread). Built
// with the native decode code by `bulk/models/native.py`; `batched_attention.attend` calls it for
// the prompt chunks of every batched bfloat16 model whose heads it fits (without it, SDPA's).
//
// Why: torch's CPU flash attention took 0.56-0.79 ms a layer for a 190-token chunk over 206 keys
// (SmolLM2's 9 query and 3 key heads of 64, one thread, Intel Xeon with AMX-BF16), 15 % of a
// prompt step: its exponentials (Sleef's, accurate to an ulp) were about half of that, and the
// causal mask with a cached prefix an explicit tensor. Here the mask is each query's key range,
// blocks of keys past it are skipped, the exponential is a polynomial accurate to a few parts in
// 10^7 (the probabilities are rounded to bfloat16, 2^-9, before they multiply the values), and the
// keys and values are laid out for the tile unit once per key head and shared by the query heads
// of its group.
//
//   query    (1, heads, L, head_dim) bfloat16: the chunk's queries after rotary
//   layer    (2, kv_heads, pool_tokens, head_dim) bfloat16: the layer's pool, keys then values
//   first, end   the keys attended: pool slots [first, end)
//   position     the pool slot of the chunk's first query: query t sees slots up to position + t
//   window       a sliding window of W keys (query t sees no slot before position + t - W + 1), or 0
//   returns  (1, L, heads, head_dim) bfloat16, as SDPA's output transposed

#include "tiles.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>


namespace bul {
namespace {

#ifdef BUL_BF16_DOT

constexpr int64_t kBlock = 16;  // query rows and keys a score tile holds

// The tiles the kernel uses: 0-3: sums (rows x 16 float32); 4: the rows' queries or probabilities
// (rows x 32 bfloat16); 6: keys or values in pairs (16 x 16 pairs). Two units run them:

#ifdef BUL_TILES
// The tile unit itself.
struct AmxTiles {
  explicit AmxTiles(int rows) { configure(rows); }
  ~AmxTiles() { _tile_release(); }
  void configure(int rows) {
    TileConfig config;
    for (int t : {0, 1, 2, 3, 4}) config.rows[t] = rows, config.colsb[t] = 64;
    config.rows[6] = 16, config.colsb[6] = 64;
    _tile_loadconfig(&config);
  }
  // The intrinsics are macros that paste their tile number into the instruction's text, so each
  // number is written out: a template parameter would be pasted as its name.
  template <int T>
  void zero() {
    static_assert(T < 4, "a sum tile");
    if constexpr (T == 0) _tile_zero(0);
    if constexpr (T == 1) _tile_zero(1);
    if constexpr (T == 2) _tile_zero(2);
    if constexpr (T == 3) _tile_zero(3);
  }
  template <int T>
  void load(const void* p, int64_t stride) {
    static_assert(T == 4 || T == 6, "tile 4 or 6");
    if constexpr (T == 4) _tile_loadd(4, p, stride);
    if constexpr (T == 6) _tile_loadd(6, p, stride);
  }
  template <int C, int A, int B>
  void dot() {
    static_assert(A == 4 && B == 6 && C < 4, "sums += tile 4 . tile 6");
    if constexpr (C == 0) _tile_dpbf16ps(0, 4, 6);
    if constexpr (C == 1) _tile_dpbf16ps(1, 4, 6);
    if constexpr (C == 2) _tile_dpbf16ps(2, 4, 6);
    if constexpr (C == 3) _tile_dpbf16ps(3, 4, 6);
  }
  template <int T>
  void store(void* p, int64_t stride) {
    static_assert(T < 4, "a sum tile");
    if constexpr (T == 0) _tile_stored(0, p, stride);
    if constexpr (T == 1) _tile_stored(1, p, stride);
    if constexpr (T == 2) _tile_stored(2, p, stride);
    if constexpr (T == 3) _tile_stored(3, p, stride);
  }
};
#endif

// The same products on the vector unit: the sum tiles in memory (4 KB, in L1), the bfloat16 tiles
// read where they lie; each row's sums gather a weight row's 16 pairs at a time by `vdpbf16ps`, in
// the same order whatever the rows, so a query's bits do not depend on its chunk.
struct VectorTiles {
  int rows;
  alignas(64) float sums[4][kBlock][16];
  const uint8_t* a = nullptr;  // tile 4: rows of 16 pairs, a_stride bytes apart
  int64_t a_stride = 0;
  const uint8_t* b = nullptr;  // tile 6: 16 rows of 16 pairs, 64 bytes apart

  explicit VectorTiles(int rows_) : rows(rows_) {}
  void configure(int rows_) { rows = rows_; }
  template <int T>
  void zero() { std::memset(sums[T], 0, sizeof(sums[T])); }
  template <int T>
  void load(const void* p, int64_t stride) {
    static_assert(T == 4 || T == 6, "tile 4 or 6");
    if constexpr (T == 4) {
      a = static_cast<const uint8_t*>(p), a_stride = stride;
    } else {
      b = static_cast<const uint8_t*>(p);
    }
  }
  template <int C, int A, int B>
  void dot() {
    static_assert(A == 4 && B == 6 && C < 4, "sums += tile 4 . tile 6");
    if (rows == kBlock) {
      dot_rows<kBlock>(sums[C]);  // a full block: its sums stay in registers
    } else {
      dot_rows<0>(sums[C]);
    }
  }
  // R rows (0: `rows`, a chunk's last block)
  template <int R>
  void dot_rows(float (*c)[16]) {
    const int n = R > 0 ? R : rows;
    __m512 acc[kBlock];
    for (int i = 0; i < n; ++i) acc[i] = _mm512_load_ps(c[i]);
    for (int r = 0; r < 16; ++r) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(b + 64 * r);  // a std::vector: 4-byte aligned
      for (int i = 0; i < n; ++i) {
        int32_t pair;
        std::memcpy(&pair, a + i * a_stride + 4 * r, sizeof(pair));
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(pair), w);
      }
    }
    for (int i = 0; i < n; ++i) _mm512_store_ps(c[i], acc[i]);
  }
  template <int T>
  void store(void* p, int64_t stride) {
    for (int i = 0; i < rows; ++i) std::memcpy(static_cast<uint8_t*>(p) + i * stride, sums[T][i], 64);
  }
};

// e^x for x <= 0 (scores minus their row's maximum): 2^(x log2 e) as 2^n * p(f), n the nearest
// integer, |f| <= 1/2, p a degree-6 polynomial (relative error under 2e-7).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One key head's keys and values laid out for the tile unit, keys padded with zeros to whole blocks.
//   keys    (key blocks of 16, dims / 32, 16 dim pairs, 16 keys) pairs: B tiles of q . k
//   values  (key blocks of 32, dims / 16, 16 key pairs, 16 dims) pairs: B tiles of p . v
struct KeyHead {
  std::vector<uint32_t> keys, values;
};

KeyHead lay_out(const uint16_t* k, const uint16_t* v, int64_t stride, int64_t count, int64_t dims) {
  KeyHead out;
  const int64_t key_blocks = (count + kBlock - 1) / kBlock, halves = dims / 32, pairs = dims / 2;
  out.keys.assign(key_blocks * halves * 256, 0u);
  for (int64_t j = 0; j < count; ++j) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(k + j * stride);  // the key's dim pairs
    uint32_t* block = out.keys.data() + (j / kBlock) * halves * 256 + (j % kBlock);
    for (int64_t p = 0; p < pairs; ++p) block[(p / 16) * 256 + (p % 16) * 16] = row[p];
  }
  const int64_t value_blocks = (count + 31) / 32, dim_blocks = dims / 16;
  out.values.assign(value_blocks * dim_blocks * 256, 0u);
  for (int64_t j = 0; j < count; ++j) {
    const uint16_t* row = v + j * stride;
    uint16_t* block = reinterpret_cast<uint16_t*>(out.values.data() + (j / 32) * dim_blocks * 256);
    const int64_t pair = (j % 32) / 2, half = j % 2;
    for (int64_t d = 0; d < dims; ++d) block[((d / 16) * 256 + pair * 16 + d % 16) * 2 + half] = row[d];
  }
  return out;
}

struct Chunk {
  const uint16_t* query;  // (heads, L, dims)
  uint16_t* out;          // (L, heads, dims)
  int64_t heads, length, dims, first, end, position, window;
  float scaling;
};

// Query rows [t0, t0 + rows) of head h over its key head's `kv`, on `unit` (configured for `rows`).
template <typename Unit>
void attend_block(Unit& unit, const Chunk& c, const KeyHead& kv, int64_t h, int64_t t0, int rows,
                  std::vector<float>& scores, std::vector<uint16_t>& probs) {
  const int64_t count = c.end - c.first;
  // Each row's keys, relative to `first`: [lo(t), hi(t)).
  auto hi = [&](int64_t t) { return std::min(count, c.position + t + 1 - c.first); };
  auto lo = [&](int64_t t) { return c.window > 0 ? std::max<int64_t>(0, hi(t) - c.window) : int64_t{0}; };
  const int64_t lo_block = lo(t0) / 32 * 32, hi_key = hi(t0 + rows - 1);  // rows' union, 32-key aligned
  const int64_t width = (hi_key - lo_block + 31) / 32 * 32;
  if (static_cast<int64_t>(scores.size()) < kBlock * width) scores.resize(kBlock * width), probs.resize(kBlock * width);
  const int64_t halves = c.dims / 32;
  const uint16_t* q = c.query + (h * c.length + t0) * c.dims;
  // q . k for the 16-key blocks the rows see
  for (int64_t j = lo_block; j < hi_key; j += kBlock) {
    unit.template zero<0>();
    for (int64_t half = 0; half < halves; ++half) {
      unit.template load<4>(q + half * 32, c.dims * 2);
      unit.template load<6>(kv.keys.data() + ((j / kBlock) * halves + half) * 256, 64);
      unit.template dot<0, 4, 6>();
    }
    unit.template store<0>(scores.data() + (j - lo_block), width * 4);
  }
  // softmax per row over its own range; bfloat16 probabilities, zero outside it
  std::vector<float> sums(rows);
  const __m512 scale = _mm512_set1_ps(c.scaling);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int r = 0; r < rows; ++r) {
    const float* s = scores.data() + r * width;
    uint16_t* p = probs.data() + r * width;
    const int64_t a = lo(t0 + r) - lo_block, b = hi(t0 + r) - lo_block;
    const int64_t from = a / 16 * 16, to = (b + 15) / 16 * 16;  // the row's 16-key vectors
    // Keys outside [a, b) in the vectors at its ends.
    auto inside = [&](int64_t j) -> __mmask16 {
      const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j)), lanes);
      return _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(static_cast<int>(a))) &
             _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(static_cast<int>(b)));
    };
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = from; j < to; j += 16) {
      const __mmask16 m = (j >= a && j + 16 <= b) ? __mmask16(0xFFFF) : inside(j);
      top = _mm512_mask_max_ps(top, m, top, _mm512_loadu_ps(s + j));
    }
    // max(s) * scale is max(s * scale): rounding a product is monotonic in it
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(top) * c.scaling);
    std::memset(p, 0, from * sizeof(uint16_t));
    std::memset(p + to, 0, (width - to) * sizeof(uint16_t));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = from; j < to; j += 16) {
      const __mmask16 m = (j >= a && j + 16 <= b) ? __mmask16(0xFFFF) : inside(j);
      const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), scale, max)));
      const __m256bh narrow = _mm512_cvtneps_pbh(e);
      std::memcpy(p + j, &narrow, sizeof(narrow));
      total = _mm512_add_ps(total, _mm512_cvtpbh_ps(narrow));  // the rounded weights the values get
    }
    sums[r] = _mm512_reduce_add_ps(total);
  }
  // p . v, 64 dims (four sum tiles) at a time
  alignas(64) float acc[kBlock * 64];
  for (int64_t d0 = 0; d0 < c.dims; d0 += 64) {
    unit.template zero<0>();
    unit.template zero<1>();
    unit.template zero<2>();
    unit.template zero<3>();
    const int64_t dim_blocks = c.dims / 16;
    for (int64_t j = 0; j < width; j += 32) {
      const uint32_t* v = kv.values.data() + (((lo_block + j) / 32) * dim_blocks + d0 / 16) * 256;
      unit.template load<4>(probs.data() + j, width * 2);
      unit.template load<6>(v, 64);
      unit.template dot<0, 4, 6>();
      unit.template load<6>(v + 256, 64);
      unit.template dot<1, 4, 6>();
      unit.template load<6>(v + 512, 64);
      unit.template dot<2, 4, 6>();
      unit.template load<6>(v + 768, 64);
      unit.template dot<3, 4, 6>();
    }
    unit.template store<0>(acc, 256);
    unit.template store<1>(acc + 16, 256);
    unit.template store<2>(acc + 32, 256);
    unit.template store<3>(acc + 48, 256);
    for (int r = 0; r < rows; ++r) {
      const __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
      uint16_t* dst = c.out + ((t0 + r) * c.heads + h) * c.dims + d0;
      for (int d = 0; d < 64; d += 16) {
        const __m256bh narrow = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(acc + r * 64 + d), inv));
        std::memcpy(dst + d, &narrow, sizeof(narrow));
      }
    }
  }
}

// The chunk's query blocks, head by head, over the threads; each thread runs its own `Unit`.
template <typename Unit>
void attend_chunk(const Chunk& chunk, const std::vector<KeyHead>& laid, int64_t kv_heads) {
  const int64_t blocks = (chunk.length + kBlock - 1) / kBlock, group = chunk.heads / kv_heads;
  at::parallel_for(0, chunk.heads * blocks, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> scores;
    std::vector<uint16_t> probs;
    int configured = static_cast<int>(std::min(kBlock, chunk.length - (begin % blocks) * kBlock));
    Unit unit(configured);
    for (int64_t task = begin; task < stop; ++task) {
      const int64_t h = task / blocks, t0 = (task % blocks) * kBlock;
      const int rows = static_cast<int>(std::min(kBlock, chunk.length - t0));
      if (rows != configured) unit.configure(rows), configured = rows;
      attend_block(unit, chunk, laid[h / group], h, t0, rows, scores, probs);
    }
  });
}

#endif  // BUL_BF16_DOT

}  // namespace

bool prompt_attention_fits(const at::Tensor& query, const at::Tensor& layer) {
#ifdef BUL_BF16_DOT
  const int64_t dims = query.size(-1);
  return query.scalar_type() == at::kBFloat16 && layer.scalar_type() == at::kBFloat16 &&
         query.dim() == 4 && layer.dim() == 4 && dims % 64 == 0 && layer.size(-1) == dims &&
         layer.stride(-1) == 1 && layer.stride(-2) == dims && query.size(1) % layer.size(1) == 0;
#else
  (void)query;
  (void)layer;
  return false;
#endif
}

at::Tensor prompt_attention(const at::Tensor& query, const at::Tensor& layer, int64_t first, int64_t end,
                            int64_t position, int64_t window, double scaling) {
  TORCH_CHECK(prompt_attention_fits(query, layer), "prompt_attention: not for these shapes, dtypes or this CPU");
#ifdef BUL_BF16_DOT
  const int64_t heads = query.size(1), length = query.size(2), dims = query.size(3), kv_heads = layer.size(1);
  TORCH_CHECK(0 <= first && first < end && end <= layer.size(2), "prompt_attention: bad key range");
  TORCH_CHECK(position >= first && position + length <= end, "prompt_attention: queries outside the key range");
  at::Tensor q = query.contiguous();
  at::Tensor out = at::empty({1, length, heads, dims}, query.options());
  const uint16_t* base = reinterpret_cast<const uint16_t*>(layer.const_data_ptr<c10::BFloat16>());
  const int64_t kind_stride = layer.stride(0), head_stride = layer.stride(1);
  std::vector<KeyHead> laid(kv_heads);
  at::parallel_for(0, kv_heads, 1, [&](int64_t begin, int64_t stop) {
    for (int64_t g = begin; g < stop; ++g) {
      const uint16_t* k = base + g * head_stride + first * dims;
      laid[g] = lay_out(k, k + kind_stride, dims, end - first, dims);
    }
  });
  const Chunk chunk{reinterpret_cast<const uint16_t*>(q.const_data_ptr<c10::BFloat16>()),
                    reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()),
                    heads, length, dims, first, end, position, window, static_cast<float>(scaling)};
#ifdef BUL_TILES
  if (tiles_permitted()) {
    attend_chunk<AmxTiles>(chunk, laid, kv_heads);
    return out;
  }
#endif
  attend_chunk<VectorTiles>(chunk, laid, kv_heads);
  return out;
#else
  (void)first, (void)end, (void)position, (void)window, (void)scaling;
  return query;
#endif
}

}  // namespace bul

TORCH_LIBRARY_FRAGMENT(bul, m) {
  m.def("prompt_attention_fits(Tensor query, Tensor layer) -> bool", &bul::prompt_attention_fits);
  m.def(
      "prompt_attention(Tensor query, Tensor layer, int first, int end, int position, int window, float scaling) "
      "-> Tensor",
      &bul::prompt_attention);
}
