// The residual add of a bfloat16 prompt chunk with the RMS norm after it, as one pass. In a 512-token
// chunk of SmolLM2-135M, ATen runs the norm as seven operations (to float32, pow, mean, add, rsqrt,
// mul, to bfloat16, mul by the weight), each a pass over a (N, hidden) tensor, most of them in
// float32, and the add as one more: about twice the time of this one read and one write per row.
//
// Bit for bit what ATen computes, on the CPUs where ATen runs its AVX2 sum kernel (its
// `get_cpu_capability` AVX2 or AVX512), which is what this reproduces:
//   - every product and sum rounded where ATen rounds it (float32 for the norm's arithmetic,
//     bfloat16 for every bfloat16 operator's result), no product fused into a sum (`opaque`);
//   - the mean's sum in ATen's order (`SumKernel.cpp`'s `vectorized_inner_sum`: 8-lane vectors in
//     four interleaved accumulators, cascaded in levels, then the lanes), divided by the row's size
//     as `mean` does on a CPU (`sum_out(...).div_(n)`).
// Anything else (another dtype or CPU capability, rows ATen would split) runs ATen's own sequence.
// (SiLU(gate) * up, fused the same way with ATen's SLEEF exp, was bit-identical but slower than
// ATen's two kernels here, so it is not done.)
//
//   x, residual, hidden, normed  (..., n) bfloat16, contiguous; weight (n,) bfloat16

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace bul {
namespace {

using namespace vec;
using BF16 = c10::BFloat16;

// A value the compiler may not look through: keeps a product from being contracted into the sum
// that follows it (ATen's pow and sum are separate kernels, each result rounded to float32).
inline float opaque(float v) {
  asm("" : "+v"(v));
  return v;
}

// ATen's AVX-512 conversion (`cvtfp32_bf16`), which these kernels stand in for, makes a NaN 0xFFFF.
constexpr uint32_t kNaN = 0xFFFFu;

inline u32x16 to_bf16_bits(f32x16 v) { return bf16_bits(v, kNaN); }

inline f32x16 rounded_bf16(f32x16 v) { return round_bf16(v, kNaN); }  // v rounded to bfloat16, as float32

inline void store_bf16(BF16* dst, f32x16 v) {
  const u16x16 narrow = __builtin_convertvector(to_bf16_bits(v), u16x16);
  std::memcpy(dst, &narrow, sizeof(narrow));
}

inline float rounded_bf16(float v) { return static_cast<float>(static_cast<BF16>(v)); }

// Whether ATen runs its AVX2 sum kernel here: at AVX2, and at AVX-512 too, where `sum_stub` has no
// AVX-512 kernel (`REGISTER_DISPATCH` leaves it out) and falls back to AVX2.
inline bool aten_avx2() {
#if defined(__AVX2__)
  static const bool avx2 = at::get_cpu_capability() == "AVX2" || at::get_cpu_capability() == "AVX512";
  return avx2;
#else
  return false;
#endif
}

// ATen's `CeilLog2` (native/cpu/utils.h).
inline int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

// ATen's `multi_row_sum<acc, 4>` (SumKernel.cpp): `size` groups of four values, `load(i, k)` the
// k-th of group i, summed in four accumulators, cascaded in levels so that no accumulator sums more
// than a level's step of values before it is passed up.
template <typename Acc, typename Load>
inline void multi_row_sum(Acc out[4], int64_t size, const Load& load) {
  constexpr int64_t levels = 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / levels);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  Acc acc[levels][4];
  for (auto& level : acc)
    for (auto& a : level) a = Acc{};
  int64_t i = 0;
  for (; i + level_step <= size;) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k] += load(i, k);
    for (int64_t j = 1; j < levels; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] += acc[j - 1][k];
        acc[j - 1][k] = Acc{};
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k] += load(i, k);
  for (int64_t j = 1; j < levels; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] += acc[j][k];
  for (int k = 0; k < 4; ++k) out[k] = acc[0][k];
}

// 8 lanes of bfloat16, widened exactly.
inline f32x8 load8(const BF16* p) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  u16x8 raw;
  std::memcpy(&raw, p, sizeof(raw));
  const u32x8 wide = __builtin_convertvector(raw, u32x8) << 16;
  f32x8 v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

inline f32x8 opaque(f32x8 v) {
  asm("" : "+v"(v));
  return v;
}

// `x.float().pow(2).sum(-1)` of one bfloat16 row of `n` values (n >= 8), in ATen's order: its AVX2
// sum kernel, which it runs on AVX-512 machines too (`sum_stub` has no AVX-512 registration):
// `vectorized_inner_sum` over 8-lane vectors, `row_sum`'s four interleaved groups of vectors, the
// scalar tail, then the lanes one by one.
inline float sum_of_squares(const BF16* row, int64_t n) {
  constexpr int64_t lanes = 8;
  const int64_t vectors = n / lanes;
  const int64_t groups = vectors / 4;
  f32x8 partial[4];
  multi_row_sum(partial, groups, [&](int64_t i, int k) {
    const f32x8 v = load8(row + (4 * i + k) * lanes);
    return opaque(v * v);
  });
  for (int64_t i = groups * 4; i < vectors; ++i) {
    const f32x8 v = load8(row + i * lanes);
    partial[0] += opaque(v * v);
  }
  for (int k = 1; k < 4; ++k) partial[0] += partial[k];
  float total = 0.0f;
  for (int64_t i = vectors * lanes; i < n; ++i) {
    const float v = static_cast<float>(row[i]);
    total += opaque(v * v);
  }
  for (int k = 0; k < lanes; ++k) total += partial[0][k];
  return total;
}

// transformers' LlamaRMSNorm as ATen runs it, op by op; `residual + x` first where there is one.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_aten(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                     const at::Tensor& weight, double eps) {
  at::Tensor hidden = residual.has_value() ? *residual + x : x;
  at::Tensor h = hidden.to(at::kFloat);
  at::Tensor variance = h.pow(2).mean({-1}, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return {hidden, weight * h.to(hidden.scalar_type())};
}

// Whether `add_rms_norm` reproduces ATen here: bfloat16 throughout, rows contiguous, ATen's AVX2
// sum over rows of at least its 8 lanes (shorter rows take its scalar sum), and rows whose sum ATen does not split over threads (under its grain size).
bool norm_exact(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight) {
  const int64_t n = x.size(-1);
  const bool rows = x.scalar_type() == at::kBFloat16 && x.stride(-1) == 1 && x.is_contiguous();
  const bool res = !residual.has_value() || (residual->scalar_type() == at::kBFloat16 &&
                                              residual->sizes() == x.sizes() && residual->is_contiguous());
  return rows && res && weight.scalar_type() == at::kBFloat16 && weight.dim() == 1 && weight.size(0) == n &&
         weight.is_contiguous() && n >= 8 && n < at::internal::GRAIN_SIZE && aten_avx2();
}

// (hidden, normed): hidden = residual + x (x itself without a residual), normed = the RMS norm of
// hidden times `weight`, each (..., n) bfloat16.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  if (!norm_exact(x, residual, weight)) return add_rms_norm_aten(x, residual, weight, eps);
  const int64_t n = x.size(-1), rows = x.numel() / n;
  at::Tensor hidden = residual.has_value() ? at::empty_like(x) : x;
  at::Tensor normed = at::empty_like(x);
  const BF16* xs = x.const_data_ptr<BF16>();
  const BF16* rs = residual.has_value() ? residual->const_data_ptr<BF16>() : nullptr;
  const BF16* w = weight.const_data_ptr<BF16>();
  BF16* hs = residual.has_value() ? hidden.data_ptr<BF16>() : nullptr;
  BF16* out = normed.data_ptr<BF16>();
  // ATen's `variance + eps` and `/ n`: a float32 tensor with a Python scalar, taken as float32.
  const float eps32 = static_cast<float>(eps), size = static_cast<float>(n);
  const int64_t grain = std::max<int64_t>(1, 8192 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const BF16* row = xs + r * n;
      if (rs != nullptr) {  // residual + x, rounded to bfloat16 as ATen's add rounds it
        const BF16* res = rs + r * n;
        BF16* dst = hs + r * n;
        int64_t i = 0;
        for (; i + kLanes <= n; i += kLanes) store_bf16(dst + i, load16(res + i) + load16(row + i));
        for (; i < n; ++i) dst[i] = static_cast<BF16>(static_cast<float>(res[i]) + static_cast<float>(row[i]));
        row = dst;
      }
      const float variance = opaque(sum_of_squares(row, n) / size);
      const float scale = 1.0f / std::sqrt(opaque(variance + eps32));  // rsqrt, as ATen's vector kernel
      const f32x16 scale16 = splat(scale);
      BF16* dst = out + r * n;
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes)
        store_bf16(dst + i, load16(w + i) * rounded_bf16(load16(row + i) * scale16));
      for (; i < n; ++i)
        dst[i] = static_cast<BF16>(static_cast<float>(w[i]) * rounded_bf16(static_cast<float>(row[i]) * scale));
    }
  });
  return {hidden, normed};
}

// For the tests: `x.float().pow(2).mean(-1)` as `add_rms_norm` computes it, (rows,) float32 from
// (rows, n) bfloat16, or an empty tensor where `add_rms_norm` takes ATen's sequence.
at::Tensor mean_square(const at::Tensor& x) {
  const int64_t n = x.size(-1);
  if (!norm_exact(x, std::nullopt, at::empty({n}, x.options()))) return at::empty({0}, x.options().dtype(at::kFloat));
  const int64_t rows = x.numel() / n;
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kFloat));
  const BF16* xs = x.const_data_ptr<BF16>();
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    o[r] = sum_of_squares(xs + r * n, n) / static_cast<float>(n);
  }
  return out;
}

}  // namespace
}  // namespace bul

TORCH_LIBRARY_FRAGMENT(bul, m) {
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)", &bul::add_rms_norm);
  m.def("mean_square(Tensor x) -> Tensor", &bul::mean_square);
}
