// The decode step's 30-odd layers of a Llama model with quantized weights, as one call: the same
// ATen operations, with the same arguments, in the same order as `bulk/models/llama_step.py`'s
// Python loop (whose docstring says why each one is there), so the outputs are bit-identical;
// what this saves is the Python between them (about a microsecond an operation, 65 operations a
// layer) and the interpreter lock, released for the whole call so that the server's event loop
// streams the previous token meanwhile. Built on first use by `bulk/models/native.py`.
//
//   hidden   (1, N, hidden)                      one decode row per request
//   cos, sin (1, 1, N, head_dim)                 sin with its first half negated
//   pool     (layers, 2, kv_heads, pool_tokens, head_dim)
//   starts, ends                                 per row: its request's KV range in the pool,
//                                                after this step's token

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "decode_attention.h"
#include "tile_linear.h"
#include "vec.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace bul {
namespace {

// transformers' LlamaRMSNorm, op for op.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor variance = h.pow(2).mean({-1}, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(x.scalar_type());
}

// `weight_quant.dense_product` over a weight prepacked for oneDNN: x (..., in) -> (..., out).
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<c10::string_view>)>();
  at::Tensor flat = x.reshape({-1, x.size(-1)}).contiguous();
  at::Tensor y = op.call(flat, packed, bias, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(y.size(-1));
  return y.view(shape);
}

// The thresholds of `WeightOnlyLinear.forward`: from `dense_from_rows` rows on the dense copy, from
// `tiles_from_rows` the tile kernel where the layer has its weights in the tile layout.
struct RowSplit {
  int64_t dense_from, tiles_from;
};

// `WeightOnlyLinear.forward`: the dense copy over `dense_from` rows or more, the tile kernel
// (`tile_linear.cpp`) over `tiles_from` or more where the layer has tiles (`tiles`: empty where
// not), torch's quantized kernel over fewer; its bias (Qwen2's q/k/v) added as the Python layer adds
// it on each path.
at::Tensor linear(const at::Tensor& x, const at::Tensor* w, const at::Tensor& dense,
                  const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, RowSplit split) {
  const at::Tensor &qweight = w[0], &scales = w[1], &tiles = w[2], &tile_scales = w[3];
  const int64_t in_features = x.size(-1);
  const int64_t rows = x.numel() / in_features;
  if (rows >= split.dense_from) {
    if (dense.is_mkldnn()) return packed_linear(x, dense, bias);  // prepacked (`weight_quant.pack_dense`)
    if (dense.scalar_type() != x.scalar_type()) {
      const std::optional<at::Tensor> cast =
          bias.has_value() ? std::optional<at::Tensor>(bias->to(dense.scalar_type())) : std::nullopt;
      return at::linear(x.to(dense.scalar_type()), dense, cast).to(x.scalar_type());
    }
    return at::linear(x, dense, bias);
  }
  if (tiles.numel() > 0 && rows >= split.tiles_from) return tile_linear(x, tiles, tile_scales, bits, bias);
  at::Tensor flat = x.reshape({rows, in_features});
  at::Tensor y = bits == 8 ? at::_weight_int8pack_mm(flat, qweight, scales)
                           : at::_weight_int4pack_mm_for_cpu(flat, qweight, group_size, scales);
  if (bias.has_value()) y = y + *bias;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(y.size(-1));
  return y.view(shape);
}

// (1, N, heads * head_dim) -> (1, heads, N, head_dim)
at::Tensor heads(const at::Tensor& x, int64_t head_dim) {
  return x.view({x.size(0), x.size(1), -1, head_dim}).transpose(1, 2);
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  return (x * cos) + (x.roll({x.size(-1) / 2}, {-1}) * signed_sin);
}

using namespace vec;

// float32 -> bfloat16 bits, rounded to nearest even as ATen rounds (a NaN stays a NaN).
inline u32x16 bf16_bits(f32x16 v) {
  u32x16 u;
  std::memcpy(&u, &v, sizeof(u));
  const u32x16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const i32x16 nan = v != v;
  return nan ? u32x16{} + 0x7FC0u : rounded;
}

inline f32x16 round_bf16(f32x16 v) {  // the float32 value of v rounded to bfloat16
  const u32x16 bits = bf16_bits(v) << 16;
  f32x16 out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename P>
inline void store16(P* dst, u32x16 bits);

template <>
inline void store16(c10::BFloat16* dst, u32x16 bits) {
  const u16x16 narrow = __builtin_convertvector(bits, u16x16);
  std::memcpy(dst, &narrow, sizeof(narrow));
}

template <>
inline void store16(float* dst, u32x16 bits) {  // a float32 pool takes the bfloat16 value exactly
  const u32x16 wide = bits << 16;
  std::memcpy(dst, &wide, sizeof(wide));
}

// `rotate`, the query's slice, `cat` and `index_copy_` of the Python loop in one pass over the fused
// q/k/v output, for bfloat16 activations: each product and each sum rounded to bfloat16 as ATen's
// bfloat16 operators round them, so the query and the pool's keys and values are bit for bit what
// those four operations write, without their intermediate tensors (about 10 operations a layer,
// each a few microseconds of dispatch and allocation around less than one of arithmetic). float32
// activations keep the operations: there a sum of products written in C++ may be contracted into a
// fused multiply-add, which ATen's separate kernels never do.
//   qkv (1, N, (q + 2 kv) * hd) bfloat16; cos, sin (1, 1, N, hd) bfloat16; layer (2, kv, pool, hd)
//   returns the query after rotary, (1, q_heads, N, hd)
template <typename P>
at::Tensor rotary_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& layer,
                           const at::Tensor& write_at, int64_t q_heads, int64_t kv_heads, int64_t head_dim) {
  using BF16 = c10::BFloat16;
  const int64_t n = qkv.size(1), all_heads = q_heads + 2 * kv_heads, rotated = q_heads + kv_heads;
  const int64_t half = head_dim / 2, tokens = write_at.size(0);
  at::Tensor query = at::empty({1, n, q_heads, head_dim}, qkv.options());
  const BF16* x = qkv.const_data_ptr<BF16>();
  const BF16* c = cos.const_data_ptr<BF16>();
  const BF16* s = sin.const_data_ptr<BF16>();
  const int64_t* at_pos = write_at.const_data_ptr<int64_t>();
  BF16* q = query.data_ptr<BF16>();
  P* pool = layer.data_ptr<P>();
  const int64_t kind_stride = layer.stride(0), head_stride = layer.stride(1), token_stride = layer.stride(2);
  BF16 rolled[256];
  for (int64_t r = 0; r < n; ++r) {
    const BF16* row = x + r * all_heads * head_dim;
    const BF16* cr = c + r * head_dim;
    const BF16* sr = s + r * head_dim;
    for (int64_t j = 0; j < rotated; ++j) {
      const BF16* in = row + j * head_dim;
      std::memcpy(rolled, in + half, half * sizeof(BF16));  // roll by half: [x2, x1]
      std::memcpy(rolled + half, in, half * sizeof(BF16));
      P* key = j >= q_heads && r < tokens ? pool + (j - q_heads) * head_stride + at_pos[r] * token_stride : nullptr;
      for (int64_t d = 0; d < head_dim; d += 16) {
        const f32x16 a = round_bf16(load16(in + d) * load16(cr + d));
        const f32x16 b = round_bf16(load16(rolled + d) * load16(sr + d));
        const u32x16 bits = bf16_bits(a + b);
        if (j < q_heads) {
          store16(q + (r * q_heads + j) * head_dim + d, bits);
        } else if (key != nullptr) {
          store16(key + d, bits);
        }
      }
    }
    if (r < tokens) {  // the values, as they are
      for (int64_t j = 0; j < kv_heads; ++j) {
        const BF16* in = row + (rotated + j) * head_dim;
        P* value = pool + kind_stride + j * head_stride + at_pos[r] * token_stride;
        for (int64_t d = 0; d < head_dim; d += 16) store16(value + d, bf16_bits(load16(in + d)));
      }
    }
  }
  return query.transpose(1, 2);
}

// Whether `rotary_write_kv` takes this step (else the ATen operations run).
bool fused_rotary(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& layer,
                  int64_t head_dim) {
  return qkv.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
         sin.scalar_type() == at::kBFloat16 && qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() &&
         (layer.scalar_type() == at::kBFloat16 || layer.scalar_type() == at::kFloat) && layer.stride(3) == 1 &&
         head_dim % 16 == 0 && head_dim <= 256 && head_dim % 2 == 0;
}

// The Python loop's prompt chunks (`llama_step.LlamaStep`): the same pass for one layer, where
// `fused_rotary` holds (the caller checks the dtypes; anything else is refused).
at::Tensor rotary_write_kv_op(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor layer,
                              const at::Tensor& write_at, int64_t q_heads, int64_t kv_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(0) == 1 && qkv.size(2) == (q_heads + 2 * kv_heads) * head_dim,
              "qkv: (1, N, (q_heads + 2 kv_heads) head_dim)");
  TORCH_CHECK(layer.dim() == 4 && layer.size(0) == 2 && layer.size(1) == kv_heads && layer.size(3) == head_dim,
              "layer: (2, kv_heads, pool_tokens, head_dim)");
  TORCH_CHECK(cos.numel() == qkv.size(1) * head_dim && sin.numel() == cos.numel(), "cos, sin: (1, 1, N, head_dim)");
  TORCH_CHECK(write_at.scalar_type() == at::kLong && write_at.dim() == 1 && write_at.size(0) <= qkv.size(1),
              "write_at: (tokens,) int64");
  TORCH_CHECK(fused_rotary(qkv, cos, sin, layer, head_dim), "bfloat16 activations, contiguous, a known head size");
  return layer.scalar_type() == at::kFloat
             ? rotary_write_kv<float>(qkv, cos, sin, layer, write_at, q_heads, kv_heads, head_dim)
             : rotary_write_kv<c10::BFloat16>(qkv, cos, sin, layer, write_at, q_heads, kv_heads, head_dim);
}

at::Tensor decode_layers(const at::Tensor& hidden_in, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& pool, const at::Tensor& write_at, c10::IntArrayRef starts,
                         c10::IntArrayRef ends, at::TensorList norms, at::TensorList weights,
                         at::TensorList dense, const c10::List<std::optional<at::Tensor>>& biases,
                         c10::IntArrayRef bits, int64_t group_size, int64_t dense_from_rows, int64_t tiles_from_rows,
                         int64_t q_heads, int64_t kv_heads,
                         int64_t head_dim, int64_t gate_size, double eps, double scaling,
                         bool float32_attention) {
  const int64_t layers = pool.size(0);
  const int64_t n = hidden_in.size(1);
  const int64_t qk_heads = q_heads + kv_heads;
  const int64_t tokens = write_at.size(0);
  TORCH_CHECK(norms.size() == static_cast<size_t>(2 * layers), "two norms a layer");
  TORCH_CHECK(weights.size() == static_cast<size_t>(16 * layers), "four (qweight, scales, tiles, tile scales) a layer");
  TORCH_CHECK(bits.size() == static_cast<size_t>(4 * layers), "four bit widths a layer");
  TORCH_CHECK(dense.size() == static_cast<size_t>(4 * layers), "four dense copies a layer");
  TORCH_CHECK(biases.size() == static_cast<size_t>(4 * layers), "four biases (or none) a layer");
  TORCH_CHECK(starts.size() == static_cast<size_t>(n) && ends.size() == static_cast<size_t>(n),
              "one KV range per row");
  at::Tensor hidden = hidden_in;
  const RowSplit split{dense_from_rows, tiles_from_rows};
  for (int64_t i = 0; i < layers; ++i) {
    // qkv, o, gate_up, down: (qweight, scales, tiles, tile scales) each
    const at::Tensor* w = weights.data() + 16 * i;
    const at::Tensor* d = dense.data() + 4 * i;    // qkv, o, gate_up, down
    const int64_t* b = bits.data() + 4 * i;
    const std::optional<at::Tensor> bias[4] = {biases.get(4 * i), biases.get(4 * i + 1), biases.get(4 * i + 2),
                                                biases.get(4 * i + 3)};  // qkv, o, gate_up, down
    at::Tensor residual = hidden;
    at::Tensor h = rms_norm(hidden, norms[2 * i], eps);
    // qkv: one fused layer; the query and key heads rotated together
    at::Tensor fused = linear(h, w, d[0], bias[0], b[0], group_size, split);  // (1, N, (q + 2 kv) hd)
    at::Tensor layer = pool.select(0, i);  // (2, kv_heads, pool_tokens, head_dim)
    at::Tensor query;
    if (fused_rotary(fused, cos, sin, layer, head_dim)) {
      query = layer.scalar_type() == at::kFloat
                  ? rotary_write_kv<float>(fused, cos, sin, layer, write_at, q_heads, kv_heads, head_dim)
                  : rotary_write_kv<c10::BFloat16>(fused, cos, sin, layer, write_at, q_heads, kv_heads, head_dim);
    } else {
      at::Tensor x = heads(fused, head_dim);  // (1, q + 2 kv, N, hd)
      at::Tensor qk = rotate(x.slice(1, 0, qk_heads), cos, sin);
      query = qk.slice(1, 0, q_heads);
      at::Tensor kv = at::cat({qk.slice(1, q_heads), x.slice(1, qk_heads)}, 1);  // (1, 2 kv, N, hd)
      // write_kv
      at::Tensor layer_heads = layer.view({-1, layer.size(2), layer.size(3)});
      layer_heads.index_copy_(1, write_at, kv.select(0, 0).slice(1, 0, tokens).to(layer.scalar_type()));
    }
    // attend: every row in one call (decode_attention.cpp), as the Python loop calls it
    at::Tensor attn = decode_attention(query, layer, starts, ends, scaling, float32_attention);
    hidden = residual + linear(attn.reshape({1, n, -1}).contiguous(), w + 4, d[1], bias[1], b[1], group_size, split);
    residual = hidden;
    h = rms_norm(hidden, norms[2 * i + 1], eps);
    at::Tensor gate_up = linear(h, w + 8, d[2], bias[2], b[2], group_size, split);
    auto parts = gate_up.split_with_sizes({gate_size, gate_up.size(-1) - gate_size}, -1);
    hidden = residual + linear(at::silu(parts[0]) * parts[1], w + 12, d[3], bias[3], b[3], group_size, split);
  }
  return hidden;
}

}  // namespace
}  // namespace bul

TORCH_LIBRARY_FRAGMENT(bul, m) {
  m.def(
      "llama_decode_layers(Tensor hidden, Tensor cos, Tensor sin, Tensor pool, Tensor write_at, "
      "int[] starts, int[] ends, Tensor[] norms, Tensor[] weights, Tensor[] dense, Tensor?[] biases, int[] bits, "
      "int group_size, "
      "int dense_from_rows, int tiles_from_rows, "
      "int q_heads, int kv_heads, int head_dim, int gate_size, float eps, float scaling, "
      "bool float32_attention) -> Tensor",
      &bul::decode_layers);
  m.def(
      "rotary_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) layer, Tensor write_at, int q_heads, "
      "int kv_heads, int head_dim) -> Tensor",
      &bul::rotary_write_kv_op);
}
