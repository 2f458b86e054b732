// The decode step's 30-odd layers of a Llama model with quantized weights, as one call: the same
// ATen operations, with the same arguments, in the same order as `bulk/models/llama_step.py`'s
// Python loop (whose docstring says why each one is there), so the outputs are bit-identical;
// what this saves is the Python between them (about a microsecond an operation, 65 operations a
// layer) and the interpreter lock, released for the whole call so that the server's event loop
// streams the previous token meanwhile. Built on first use by `bulk/models/native.py`.
//
//   hidden   (1, N, hidden)                      one decode row per request, N < DENSE_FROM_ROWS
//   cos, sin (1, 1, N, head_dim)                 sin with its first half negated
//   pool     (layers, 2, kv_heads, pool_tokens, head_dim)
//   starts, ends                                 per row: its request's KV range in the pool,
//                                                after this step's token

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

namespace {

// transformers' LlamaRMSNorm, op for op.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor variance = h.pow(2).mean({-1}, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  return weight * h.to(x.scalar_type());
}

// `WeightOnlyLinear.forward` below its dense threshold: the quantized kernel over the rows.
at::Tensor linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t bits,
                  int64_t group_size) {
  const int64_t in_features = x.size(-1);
  const int64_t rows = x.numel() / in_features;
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
                         c10::IntArrayRef bits, int64_t group_size, int64_t q_heads, int64_t kv_heads,
                         int64_t head_dim, int64_t gate_size, double eps, double scaling,
                         bool float32_attention) {
  const int64_t layers = pool.size(0);
  const int64_t n = hidden_in.size(1);
  const int64_t qk_heads = q_heads + kv_heads;
  const int64_t tokens = write_at.size(0);
  const bool gqa = q_heads != kv_heads;
  const at::ScalarType work = float32_attention ? at::kFloat : hidden_in.scalar_type();
  TORCH_CHECK(norms.size() == static_cast<size_t>(2 * layers), "two norms a layer");
  TORCH_CHECK(weights.size() == static_cast<size_t>(8 * layers), "four (qweight, scales) pairs a layer");
  TORCH_CHECK(bits.size() == static_cast<size_t>(4 * layers), "four bit widths a layer");
  TORCH_CHECK(starts.size() == static_cast<size_t>(n) && ends.size() == static_cast<size_t>(n),
              "one KV range per row");
  at::Tensor hidden = hidden_in;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = weights.data() + 8 * i;  // qkv, o, gate_up, down: (qweight, scales) each
    const int64_t* b = bits.data() + 4 * i;
    at::Tensor residual = hidden;
    at::Tensor h = rms_norm(hidden, norms[2 * i], eps);
    // qkv: one fused layer; the query and key heads rotated together
    at::Tensor x = heads(linear(h, w[0], w[1], b[0], group_size), head_dim);  // (1, q + 2 kv, N, hd)
    at::Tensor qk = rotate(x.slice(1, 0, qk_heads), cos, sin);
    at::Tensor query = qk.slice(1, 0, q_heads);
    at::Tensor kv = at::cat({qk.slice(1, q_heads), x.slice(1, qk_heads)}, 1);  // (1, 2 kv, N, hd)
    // write_kv
    at::Tensor layer = pool.select(0, i);  // (2, kv_heads, pool_tokens, head_dim)
    at::Tensor layer_heads = layer.view({-1, layer.size(2), layer.size(3)});
    layer_heads.index_copy_(1, write_at, kv.select(0, 0).slice(1, 0, tokens).to(layer.scalar_type()));
    // attend: one SDPA per row, as transformers' SDPA attention calls it for one query
    const at::ScalarType dtype = layer.scalar_type() == at::kFloat ? at::kFloat : work;
    std::vector<at::Tensor> outputs;
    outputs.reserve(n);
    for (int64_t r = 0; r < n; ++r) {
      at::Tensor q = query.slice(2, r, r + 1).to(dtype);
      at::Tensor k = layer.select(0, 0).slice(1, starts[r], ends[r]).unsqueeze(0).to(dtype);
      at::Tensor v = layer.select(0, 1).slice(1, starts[r], ends[r]).unsqueeze(0).to(dtype);
      at::Tensor out = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/std::nullopt,
                                                        /*dropout_p=*/0.0, /*is_causal=*/false, scaling,
                                                        gqa)
                           .transpose(1, 2);
      outputs.push_back(out.to(query.scalar_type()));  // (1, 1, heads, head_dim)
    }
    at::Tensor attn = outputs.size() == 1 ? outputs[0] : at::cat(outputs, 1);
    hidden = residual + linear(attn.reshape({1, n, -1}).contiguous(), w[2], w[3], b[1], group_size);
    residual = hidden;
    h = rms_norm(hidden, norms[2 * i + 1], eps);
    at::Tensor gate_up = linear(h, w[4], w[5], b[2], group_size);
    auto parts = gate_up.split_with_sizes({gate_size, gate_up.size(-1) - gate_size}, -1);
    hidden = residual + linear(at::silu(parts[0]) * parts[1], w[6], w[7], b[3], group_size);
  }
  return hidden;
}

}  // namespace

TORCH_LIBRARY(bul, m) {
  m.def(
      "llama_decode_layers(Tensor hidden, Tensor cos, Tensor sin, Tensor pool, Tensor write_at, "
      "int[] starts, int[] ends, Tensor[] norms, Tensor[] weights, int[] bits, int group_size, "
      "int q_heads, int kv_heads, int head_dim, int gate_size, float eps, float scaling, "
      "bool float32_attention) -> Tensor",
      &decode_layers);
}
