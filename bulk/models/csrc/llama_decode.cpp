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
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<c10::string_view>)>();
  at::Tensor flat = x.reshape({-1, x.size(-1)}).contiguous();
  at::Tensor y = op.call(flat, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(y.size(-1));
  return y.view(shape);
}

// `WeightOnlyLinear.forward` (no bias): the quantized kernel over fewer than `dense_from_rows` rows,
// the dense copy over more.
at::Tensor linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& dense,
                  int64_t bits, int64_t group_size, int64_t dense_from_rows) {
  const int64_t in_features = x.size(-1);
  const int64_t rows = x.numel() / in_features;
  if (rows >= dense_from_rows) {
    if (dense.is_mkldnn()) return packed_linear(x, dense);  // prepacked (`weight_quant.pack_dense`)
    if (dense.scalar_type() != x.scalar_type()) return at::linear(x.to(dense.scalar_type()), dense).to(x.scalar_type());
    return at::linear(x, dense);
  }
  at::Tensor flat = x.reshape({rows, in_features});
  at::Tensor y = bits == 8 ? at::_weight_int8pack_mm(flat, qweight, scales)
                           : at::_weight_int4pack_mm_for_cpu(flat, qweight, group_size, scales);
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

at::Tensor decode_layers(const at::Tensor& hidden_in, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& pool, const at::Tensor& write_at, c10::IntArrayRef starts,
                         c10::IntArrayRef ends, at::TensorList norms, at::TensorList weights,
                         at::TensorList dense, c10::IntArrayRef bits, int64_t group_size, int64_t dense_from_rows, int64_t q_heads, int64_t kv_heads,
                         int64_t head_dim, int64_t gate_size, double eps, double scaling,
                         bool float32_attention) {
  const int64_t layers = pool.size(0);
  const int64_t n = hidden_in.size(1);
  const int64_t qk_heads = q_heads + kv_heads;
  const int64_t tokens = write_at.size(0);
  TORCH_CHECK(norms.size() == static_cast<size_t>(2 * layers), "two norms a layer");
  TORCH_CHECK(weights.size() == static_cast<size_t>(8 * layers), "four (qweight, scales) pairs a layer");
  TORCH_CHECK(bits.size() == static_cast<size_t>(4 * layers), "four bit widths a layer");
  TORCH_CHECK(dense.size() == static_cast<size_t>(4 * layers), "four dense copies a layer");
  TORCH_CHECK(starts.size() == static_cast<size_t>(n) && ends.size() == static_cast<size_t>(n),
              "one KV range per row");
  at::Tensor hidden = hidden_in;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = weights.data() + 8 * i;  // qkv, o, gate_up, down: (qweight, scales) each
    const at::Tensor* d = dense.data() + 4 * i;    // qkv, o, gate_up, down
    const int64_t* b = bits.data() + 4 * i;
    at::Tensor residual = hidden;
    at::Tensor h = rms_norm(hidden, norms[2 * i], eps);
    // qkv: one fused layer; the query and key heads rotated together
    at::Tensor x = heads(linear(h, w[0], w[1], d[0], b[0], group_size, dense_from_rows), head_dim);  // (1, q + 2 kv, N, hd)
    at::Tensor qk = rotate(x.slice(1, 0, qk_heads), cos, sin);
    at::Tensor query = qk.slice(1, 0, q_heads);
    at::Tensor kv = at::cat({qk.slice(1, q_heads), x.slice(1, qk_heads)}, 1);  // (1, 2 kv, N, hd)
    // write_kv
    at::Tensor layer = pool.select(0, i);  // (2, kv_heads, pool_tokens, head_dim)
    at::Tensor layer_heads = layer.view({-1, layer.size(2), layer.size(3)});
    layer_heads.index_copy_(1, write_at, kv.select(0, 0).slice(1, 0, tokens).to(layer.scalar_type()));
    // attend: every row in one call (decode_attention.cpp), as the Python loop calls it
    at::Tensor attn = decode_attention(query, layer, starts, ends, scaling, float32_attention);
    hidden = residual + linear(attn.reshape({1, n, -1}).contiguous(), w[2], w[3], d[1], b[1], group_size, dense_from_rows);
    residual = hidden;
    h = rms_norm(hidden, norms[2 * i + 1], eps);
    at::Tensor gate_up = linear(h, w[4], w[5], d[2], b[2], group_size, dense_from_rows);
    auto parts = gate_up.split_with_sizes({gate_size, gate_up.size(-1) - gate_size}, -1);
    hidden = residual + linear(at::silu(parts[0]) * parts[1], w[6], w[7], d[3], b[3], group_size, dense_from_rows);
  }
  return hidden;
}

}  // namespace
}  // namespace bul

TORCH_LIBRARY_FRAGMENT(bul, m) {
  m.def(
      "llama_decode_layers(Tensor hidden, Tensor cos, Tensor sin, Tensor pool, Tensor write_at, "
      "int[] starts, int[] ends, Tensor[] norms, Tensor[] weights, Tensor[] dense, int[] bits, int group_size, "
      "int dense_from_rows, "
      "int q_heads, int kv_heads, int head_dim, int gate_size, float eps, float scaling, "
      "bool float32_attention) -> Tensor",
      &bul::decode_layers);
}
