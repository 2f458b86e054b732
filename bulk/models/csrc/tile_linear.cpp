// Quantized matrix products for a few rows (decode steps: 1 to a few dozen) on AMX tiles: each block
// of weights is dequantized once, into bfloat16 exactly as the layer's dense copy holds it, and
// multiplied with every row at once by the tile unit. Built with the native decode code by
// `bulk/models/native.py`; `weight_quant.WeightOnlyLinear` and the native decode layers call it.
//
// Why: torch's CPU kernels for 4- and 8-bit weights (`_weight_int4pack_mm_for_cpu`,
// `_weight_int8pack_mm`) dequantize the weights again for every row: SmolLM2's gate/up projection
// (3,072 x 576) took 106 us for 1 row, 733 us for 16 (one thread, Intel Xeon with AMX-BF16), so a
// batch of 12 or more rows went through the dense bfloat16 copy instead, whose 7 MB a layer are read
// from memory at every step (361 us for 16 rows). Here the 4-bit weights (0.9 MB) are read once
// and the arithmetic is the tile unit's, so a step's cost barely grows with its rows. And each row's
// sums run in the same order whatever the number of rows, so a request's logits do not depend on
// what is batched with it.
//
// Layout (made by `weight_quant`): the weight (N, K) as tiles of 16 outputs by 32 inputs, each tile's
// 16 rows holding the input pairs (2r, 2r + 1) of its 16 outputs side by side, which is the pair
// ("VNNI") layout the tile unit reads:
//   bits 4: qweight (N/16, K/32, 16, 16) uint8: a row's 32 values v[p] (p = 2 * output + input
//           parity), byte j holding v[j] in its low and v[j + 16] in its high half; scales (N/16,
//           K/32, 2, 16) bfloat16: the tile's 16 scales, then its 16 zeros; w = (q - 8) * s + z, in
//           float32 and rounded to bfloat16, as `_quantize_int4` computes the dense copy
//   bits 8: qweight (N/16, K/32, 16, 32) int8, v[p] in byte p; scales (N/16, 16) bfloat16; w = q * s
//
// Where the CPU has no tile unit but AVX512-BF16 (AMD's Zen 4), the same tiles are dequantized the
// same way and multiplied a row at a time by the vector pair dot product (`vdpbf16ps`, which reads
// the pair layout as the tile unit does): the weights are still read and dequantized once for up to
// 16 rows. Where the compiler has neither (another CPU) the library still builds:
// `tile_linear_available` says False and the layers keep torch's kernels.

#include "tile_linear.h"
#include "tiles.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <utility>
#include <cstdint>
#include <cstring>


namespace bul {

#ifdef BUL_BF16_DOT
namespace {

constexpr int kRowsPerTile = 16;
constexpr int64_t kInputsPerTile = 32;

// A value the compiler may not look through: keeps a product from being contracted into the sum after
// it (the dense copy is a product rounded to float32, then a sum rounded to float32).
inline __m512 opaque(__m512 v) {
  asm("" : "+v"(v));
  return v;
}

inline __m512 widen_bf16(const uint16_t* p) {  // 16 bfloat16 -> float32, exactly
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The per-output values of a tile spread over a row's 32 positions (p = 2 * output + parity): the
// first 16 positions hold outputs 0-7, the last 16 outputs 8-15.
struct Spread {
  __m512i first, last;
  Spread() {
    alignas(64) int32_t a[16], b[16];
    for (int p = 0; p < 16; ++p) a[p] = p / 2, b[p] = 8 + p / 2;
    first = _mm512_load_si512(a);
    last = _mm512_load_si512(b);
  }
};

// One tile of 4-bit weights, a row of 32 bfloat16 (16 outputs' input pair) at a time.
struct Tile4 {
  const uint8_t* q;
  __m512 s0, s1, z0, z1;
  Tile4(const uint8_t* q_, const uint16_t* scales, const Spread& spread) : q(q_) {
    const __m512 s = widen_bf16(scales), z = widen_bf16(scales + 16);
    s0 = _mm512_permutexvar_ps(spread.first, s), s1 = _mm512_permutexvar_ps(spread.last, s);
    z0 = _mm512_permutexvar_ps(spread.first, z), z1 = _mm512_permutexvar_ps(spread.last, z);
  }
  __m512i row(int r) const {
    // q - 8 by table: the permute reads only an index's low four bits, so the high nibble needs no mask.
    const __m512 centred = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * r)));
    const __m512 v0 = _mm512_permutexvar_ps(bytes, centred);
    const __m512 v1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), centred);
    const __m512 w0 = _mm512_add_ps(opaque(_mm512_mul_ps(v0, s0)), z0);
    const __m512 w1 = _mm512_add_ps(opaque(_mm512_mul_ps(v1, s1)), z1);
    return (__m512i)_mm512_cvtne2ps_pbh(w1, w0);
  }
};

// One tile of 8-bit weights, a row at a time (s0, s1: the spread scales).
struct Tile8 {
  const int8_t* q;
  __m512 s0, s1;
  __m512i row(int r) const {
    const __m512i a = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 32 * r)));
    const __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 32 * r + 16)));
    const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(a), s0);
    const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(b), s1);
    return (__m512i)_mm512_cvtne2ps_pbh(w1, w0);
  }
};

struct Weights {
  const uint8_t* q;
  const uint16_t* scales;
  int64_t groups;  // K / 32
  int bits;
  const Spread& spread;

  Tile4 tile4(int64_t block, int64_t group) const {
    const int64_t index = block * groups + group;
    return Tile4(q + index * 256, scales + index * 32, spread);
  }

  Tile8 tile8(int64_t block, int64_t group) const {
    const __m512 s = widen_bf16(scales + block * 16);
    return Tile8{reinterpret_cast<const int8_t*>(q) + (block * groups + group) * 512,
                 _mm512_permutexvar_ps(spread.first, s), _mm512_permutexvar_ps(spread.last, s)};
  }

  // Tile (block, group) of the weight, dequantized into `out`: 16 rows of 32 bfloat16.
  void tile(int64_t block, int64_t group, uint16_t* out) const {
    if (bits == 4) {
      const Tile4 t = tile4(block, group);
      for (int r = 0; r < kRowsPerTile; ++r) _mm512_store_si512(out + 32 * r, t.row(r));
    } else {
      const Tile8 t = tile8(block, group);
      for (int r = 0; r < kRowsPerTile; ++r) _mm512_store_si512(out + 32 * r, t.row(r));
    }
  }
};

// A block's sums for `rows` rows (16 outputs each), plus the bias, rounded to bfloat16 into out's
// columns [first, first + 16) of those rows.
inline void store_block(const __m512* sums, int rows, const float* bias, int64_t first, uint16_t* out,
                        int64_t n) {
  for (int r = 0; r < rows; ++r) {
    __m512 v = sums[r];
    if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + first));
    const __m256bh narrow = _mm512_cvtneps_pbh(v);
    std::memcpy(out + r * n + first, &narrow, sizeof(narrow));
  }
}

// Rows [0, R) of x (row stride k) times output block `block` on the vector unit: each weight row of a
// tile (16 outputs' input pair) dequantized once, in a register, and multiplied into every row's 16
// sums, a row's pair of inputs broadcast. A row's sums run in the same order for any R.
template <int R, typename Tile>
inline void block_rows(const uint16_t* x, int64_t k, const Tile& tile, int64_t g, __m512* sums) {
  const uint16_t* xg = x + g * kInputsPerTile;
  for (int r = 0; r < kRowsPerTile; ++r) {
    const __m512bh w = (__m512bh)tile.row(r);
    for (int m = 0; m < R; ++m) {
      int32_t pair;  // inputs 2r and 2r + 1 of row m
      std::memcpy(&pair, xg + m * k + 2 * r, sizeof(pair));
      sums[m] = _mm512_dpbf16_ps(sums[m], (__m512bh)_mm512_set1_epi32(pair), w);
    }
  }
}

template <int R>
void block_dot(const uint16_t* x, int64_t k, int64_t block, const Weights& weights, const float* bias,
               uint16_t* out, int64_t n) {
  __m512 sums[R];
  for (int m = 0; m < R; ++m) sums[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < weights.groups; ++g) {
    if (weights.bits == 4) {
      block_rows<R>(x, k, weights.tile4(block, g), g, sums);
    } else {
      block_rows<R>(x, k, weights.tile8(block, g), g, sums);
    }
  }
  store_block(sums, R, bias, block * 16, out, n);
}

using BlockDot = void (*)(const uint16_t*, int64_t, int64_t, const Weights&, const float*, uint16_t*, int64_t);

// block_dot for 1 to 16 rows, by row count: the sums stay in registers.
template <int... R>
constexpr std::array<BlockDot, sizeof...(R)> block_dots(std::integer_sequence<int, R...>) {
  return {&block_dot<R + 1>...};
}
constexpr auto kBlockDots = block_dots(std::make_integer_sequence<int, kRowsPerTile>{});

// x (m, k) times the weight into out (m, n) on the vector unit: 16 rows at a time, output blocks over
// the threads.
void vector_linear(const uint16_t* xs, int64_t m, int64_t k, int64_t blocks, const Weights& weights,
                   const float* bias, uint16_t* ys, int64_t n) {
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t row = 0; row < m; row += kRowsPerTile) {
      const BlockDot dot = kBlockDots[std::min<int64_t>(kRowsPerTile, m - row) - 1];
      for (int64_t block = begin; block < end; ++block) dot(xs + row * k, k, block, weights, bias, ys + row * n, n);
    }
  });
}

#ifdef BUL_TILES
// Tiles: 0, 1 the sums of output block 0 for rows 0-15 and 16-31; 2, 3 those of output block 1;
// 4, 5 the two row blocks of x; 6, 7 the dequantized weights of the two output blocks.
void configure(int rows0, int rows1) {
  TileConfig config;
  for (int t : {0, 2, 4}) config.rows[t] = rows0, config.colsb[t] = 64;
  if (rows1 > 0) {
    for (int t : {1, 3, 5}) config.rows[t] = rows1, config.colsb[t] = 64;
  }
  for (int t : {6, 7}) config.rows[t] = kRowsPerTile, config.colsb[t] = 64;
  _tile_loadconfig(&config);
}

// Rows [row, row + rows0 + rows1) of x times output blocks `block` and `block + 1` (when `two`),
// into `out` (bfloat16, row stride n), plus the bias.
void block_pair(const uint16_t* x, int64_t k, int64_t row, int rows0, int rows1, int64_t block, bool two,
                const Weights& weights, const float* bias, uint16_t* out, int64_t n) {
  alignas(64) uint16_t b0[kRowsPerTile * 32], b1[kRowsPerTile * 32];
  alignas(64) float sums[32 * 32];  // (rows, 32 outputs)
  _tile_zero(0);
  _tile_zero(2);
  if (rows1 > 0) {
    _tile_zero(1);
    _tile_zero(3);
  }
  const uint16_t* x0 = x + row * k;
  const uint16_t* x1 = x0 + kRowsPerTile * k;
  const int64_t stride = k * static_cast<int64_t>(sizeof(uint16_t));
  for (int64_t g = 0; g < weights.groups; ++g) {
    _tile_loadd(4, x0 + g * kInputsPerTile, stride);
    if (rows1 > 0) _tile_loadd(5, x1 + g * kInputsPerTile, stride);
    weights.tile(block, g, b0);
    _tile_loadd(6, b0, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (rows1 > 0) _tile_dpbf16ps(1, 5, 6);
    if (two) {
      weights.tile(block + 1, g, b1);
      _tile_loadd(7, b1, 64);
      _tile_dpbf16ps(2, 4, 7);
      if (rows1 > 0) _tile_dpbf16ps(3, 5, 7);
    }
  }
  constexpr int64_t kSumStride = 32 * sizeof(float);
  _tile_stored(0, sums, kSumStride);
  _tile_stored(2, sums + 16, kSumStride);
  if (rows1 > 0) {
    _tile_stored(1, sums + 16 * 32, kSumStride);
    _tile_stored(3, sums + 16 * 32 + 16, kSumStride);
  }
  const int columns = two ? 32 : 16;
  const int64_t first = block * 16;
  for (int r = 0; r < rows0 + rows1; ++r) {
    for (int c = 0; c < columns; c += 16) {
      __m512 v = _mm512_load_ps(sums + r * 32 + c);
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + first + c));
      const __m256bh narrow = _mm512_cvtneps_pbh(v);
      std::memcpy(out + (row + r) * n + first + c, &narrow, sizeof(narrow));
    }
  }
}

#endif  // BUL_TILES

}  // namespace

at::Tensor tile_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t bits,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(tile_linear_available(), "tile_linear: this CPU has neither AMX tiles nor AVX512-BF16");
  TORCH_CHECK(bits == 4 || bits == 8, "tile_linear: bits must be 4 or 8");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), "tile_linear: x is bfloat16 on the CPU");
  TORCH_CHECK(qweight.dim() == 4 && qweight.is_contiguous() && scales.is_contiguous(), "tile_linear: tile layout");
  const int64_t k = x.size(-1), blocks = qweight.size(0), groups = qweight.size(1);
  TORCH_CHECK(groups * kInputsPerTile == k, "tile_linear: x has ", k, " inputs, the weight ", groups * 32);
  TORCH_CHECK(qweight.size(3) == (bits == 4 ? 16 : 32), "tile_linear: qweight's tiles are not ", bits, "-bit");
  const int64_t n = blocks * 16;
  at::Tensor flat = x.reshape({-1, k}).contiguous();
  const int64_t m = flat.size(0);
  at::Tensor out = at::empty({m, n}, x.options());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(n);
  if (m == 0) return out.view(shape);
  at::Tensor bias32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n, "tile_linear: bias has ", bias->numel(), " values for ", n, " outputs");
    bias32 = bias->to(at::kFloat).contiguous();
  }
  static const Spread spread;
  const Weights weights{static_cast<const uint8_t*>(qweight.const_data_ptr()),
                        reinterpret_cast<const uint16_t*>(scales.const_data_ptr<c10::BFloat16>()), groups,
                        static_cast<int>(bits), spread};
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(flat.const_data_ptr<c10::BFloat16>());
  uint16_t* ys = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const float* b = bias.has_value() ? bias32.const_data_ptr<float>() : nullptr;
#ifdef BUL_TILES
  if (!tiles_permitted()) {
    vector_linear(xs, m, k, blocks, weights, b, ys, n);
    return out.view(shape);
  }
  const int64_t pairs = (blocks + 1) / 2;
  // Output block pairs over the threads; each thread configures its own tiles.
  at::parallel_for(0, pairs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = 0; row < m; row += 2 * kRowsPerTile) {
      const int rows0 = static_cast<int>(std::min<int64_t>(kRowsPerTile, m - row));
      const int rows1 = static_cast<int>(std::clamp<int64_t>(m - row - kRowsPerTile, 0, kRowsPerTile));
      configure(rows0, rows1);
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t block = 2 * pair;
        block_pair(xs, k, row, rows0, rows1, block, block + 1 < blocks, weights, b, ys, n);
      }
    }
    _tile_release();
  });
#else
  vector_linear(xs, m, k, blocks, weights, b, ys, n);
#endif
  return out.view(shape);
}

#else  // neither AMX nor AVX512-BF16 in this build

at::Tensor tile_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                       const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "tile_linear: this build has neither AMX tiles nor AVX512-BF16");
}

#endif

bool tile_linear_available() {
#ifdef BUL_BF16_DOT
  return true;  // on the tile unit, or on the vector unit where there is none or Linux withholds it
#else
  return false;
#endif
}

}  // namespace bul

TORCH_LIBRARY_FRAGMENT(bul, m) {
  m.def("tile_linear(Tensor x, Tensor qweight, Tensor scales, int bits, Tensor? bias) -> Tensor", &bul::tile_linear);
  m.def("tile_linear_available() -> bool", &bul::tile_linear_available);
}
