// The decode step's 30-odd decoder layers of a model with quantized weights, as one call, for every
// family `bulk/models/llama_step.py` runs (Llama, Mistral, Qwen 2 and 3, Phi-3, SmolLM3, Gemma 2
// and 3): one loop over a small description of the family (`Family`) and of each layer (its norms,
// its rotary angles or none, its sliding window), rather than a copy per family. The same ATen
// operations, with the same arguments, in the same order as `llama_step.py`'s Python loop (whose
// docstring says why each one is there), so the outputs are bit-identical; what this saves is the
// Python between them (about a microsecond an operation, 65 operations a layer) and the
// interpreter lock, released for the whole call so that the server's event loop streams the
// previous token meanwhile. Built on first use by `bulk/models/native.py`.
//
//   hidden   (1, N, hidden)                      one decode row per request
//   angles   (cos, sin) pairs, (1, 1, N, head_dim) each, sin with its first half negated: one pair
//            for all layers, or one per layer type (Gemma 3's local and global rotary)
//   pool     (layers, 2, kv_heads, pool_tokens, head_dim)
//   starts, ends                                 per row: its request's KV range in the pool,
//                                                after this step's token

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "decode_attention.h"
#include "tile_linear.h"
#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
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

// ATen's bfloat16 operators round through its scalar conversion: a NaN becomes 0x7FC0.
constexpr uint32_t kNaN = 0x7FC0u;

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
        const f32x16 a = round_bf16(load16(in + d) * load16(cr + d), kNaN);
        const f32x16 b = round_bf16(load16(rolled + d) * load16(sr + d), kNaN);
        const u32x16 bits = bf16_bits(a + b, kNaN);
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
        for (int64_t d = 0; d < head_dim; d += 16) store16(value + d, bf16_bits(load16(in + d), kNaN));
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

// What a family's decoder layer does beyond Llama's, as `llama_step.Layout` describes it: one loop
// runs every family from these few fields and each layer's own (its norms, rotary, window).
struct Family {
  int64_t activation;               // the MLP's gate: 0 SiLU (Llama), 1 GELU with tanh (Gemma)
  bool one_plus_norms;              // Gemma's norms: their weights are the float32 factor 1 + weight
  bool head_norms_after_transpose;  // q/k norms on (1, heads, N, hd) (Gemma 3), not (1, N, heads, hd)
  double softcap;                   // attention scores soft-capped (Gemma 2), 0 for none
  double eps;
};

// A norm as the family's module computes it: Llama's RMS norm, or Gemma's over its factor
// (`llama_step._one_plus_norm`: `(h * (1 + weight)).type_as(x)`, the factor in float32).
at::Tensor norm(const at::Tensor& x, const at::Tensor& weight, const Family& family) {
  if (!family.one_plus_norms) return rms_norm(x, weight, family.eps);
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean({-1}, /*keepdim=*/true) + family.eps);
  return (h * weight).to(x.scalar_type());
}

at::Tensor activation(const at::Tensor& gate, const Family& family) {
  return family.activation == 1 ? at::gelu(gate, "tanh") : at::silu(gate);
}

// Qwen 3's and Gemma 3's norm of each query and key head, in place in the fused q/k/v output (a
// fresh tensor of this step's): the rotation and the pool write then run as for any layer.
//   fused (1, N, (q + 2 kv) * hd)
void norm_heads(at::Tensor& fused, const at::Tensor& q_norm, const at::Tensor& k_norm, int64_t q_heads,
                int64_t kv_heads, int64_t head_dim, const Family& family) {
  const int64_t n = fused.size(1);
  const std::pair<const at::Tensor*, at::Tensor> parts[2] = {
      {&q_norm, fused.slice(-1, 0, q_heads * head_dim).view({1, n, q_heads, head_dim})},
      {&k_norm, fused.slice(-1, q_heads * head_dim, (q_heads + kv_heads) * head_dim).view({1, n, kv_heads, head_dim})},
  };
  for (const auto& [weight, x] : parts) {
    if (weight->numel() == 0) continue;
    if (family.head_norms_after_transpose) {
      at::Tensor view = x.transpose(1, 2);  // (1, heads, N, hd), where the model norms its heads
      view.copy_(norm(view, *weight, family));
    } else {
      x.copy_(norm(x, *weight, family));
    }
  }
}

// Per layer, its projections in seven slots (`Slot`): q/k/v as one fused projection with the k and v
// slots empty, or as three (an unquantized model's, whose layers are not fused, so that it computes
// what transformers computes; int4 parts whose packed blocks do not line up, `weight_quant.fuse`);
// gate/up likewise. Each slot is (qweight, scales, tiles, tile scales),
// a dense weight, a bias or none and a bit width; an empty slot has an empty dense weight.
enum Slot : int64_t { kQ = 0, kK, kV, kO, kGate, kUp, kDown, kSlots };

// Per layer, after its six norms (input, MLP input, attention output, MLP output, query heads, key
// heads; an empty tensor where the layer has none), two numbers: which of the step's rotary angles
// it takes (-1: none, SmolLM3's layers without rotary) and its sliding window in tokens (0: none).
constexpr int64_t NORMS = 6, SHAPES = 2;

at::Tensor decode_layers(const at::Tensor& hidden_in, at::TensorList angles, const at::Tensor& pool,
                         const at::Tensor& write_at, c10::IntArrayRef starts, c10::IntArrayRef ends,
                         at::TensorList norms, c10::IntArrayRef layer_shapes, at::TensorList weights,
                         at::TensorList dense, const c10::List<std::optional<at::Tensor>>& biases,
                         c10::IntArrayRef bits, int64_t group_size, int64_t dense_from_rows, int64_t tiles_from_rows,
                         int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t gate_size, double eps,
                         double scaling, int64_t activation_kind, bool one_plus_norms,
                         bool head_norms_after_transpose, double softcap, bool float32_attention) {
  const int64_t layers = pool.size(0);
  const int64_t n = hidden_in.size(1);
  const int64_t qk_heads = q_heads + kv_heads;
  const int64_t tokens = write_at.size(0);
  const auto count = [](int64_t k) { return static_cast<size_t>(k); };
  TORCH_CHECK(!angles.empty() && angles.size() % 2 == 0, "angles: (cos, signed sin) pairs");
  TORCH_CHECK(norms.size() == count(NORMS * layers), "six norms (or empty tensors) a layer");
  TORCH_CHECK(layer_shapes.size() == count(SHAPES * layers), "a rotary index and a window a layer");
  TORCH_CHECK(weights.size() == count(4 * kSlots * layers), "(qweight, scales, tiles, tile scales) a slot");
  TORCH_CHECK(bits.size() == count(kSlots * layers), "a bit width a slot");
  TORCH_CHECK(dense.size() == count(kSlots * layers), "a dense weight (or an empty one) a slot");
  TORCH_CHECK(biases.size() == count(kSlots * layers), "a bias (or none) a slot");
  TORCH_CHECK(starts.size() == count(n) && ends.size() == count(n), "one KV range per row");
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t rotary = layer_shapes[SHAPES * i];
    TORCH_CHECK(rotary >= -1 && rotary < static_cast<int64_t>(angles.size() / 2), "a rotary index out of range");
  }
  const Family family{activation_kind, one_plus_norms, head_norms_after_transpose, softcap, eps};
  // cos and sin of the zero angle, for layers without rotary on the fused pass (`_identity_rotation`).
  at::Tensor ones, zeros;
  // Each sliding window's starts (max(start, end - window)), made once per window size.
  std::vector<std::pair<int64_t, std::vector<int64_t>>> windowed;
  at::Tensor hidden = hidden_in;
  const RowSplit split{dense_from_rows, tiles_from_rows};
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = weights.data() + 4 * kSlots * i;  // a slot's (qweight, scales, tiles, tile scales)
    const at::Tensor* d = dense.data() + kSlots * i;
    const at::Tensor* nw = norms.data() + NORMS * i;  // input, MLP input, attention out, MLP out, q, k
    const int64_t* b = bits.data() + kSlots * i;
    const int64_t rotary = layer_shapes[SHAPES * i], window = layer_shapes[SHAPES * i + 1];
    const auto project = [&](const at::Tensor& x, int64_t slot) {
      return linear(x, w + 4 * slot, d[slot], biases.get(kSlots * i + slot), b[slot], group_size, split);
    };
    at::Tensor residual = hidden;
    at::Tensor h = norm(hidden, nw[0], family);
    // q/k/v side by side, (1, N, (q + 2 kv) hd): one fused layer, or three; the query and key heads
    // normed where the family norms them, then rotated together
    at::Tensor fused = d[kK].numel() == 0 ? project(h, kQ) : at::cat({project(h, kQ), project(h, kK), project(h, kV)}, -1);
    if (nw[4].numel() > 0 || nw[5].numel() > 0) {
      fused = fused.contiguous();
      norm_heads(fused, nw[4], nw[5], q_heads, kv_heads, head_dim, family);
    }
    at::Tensor layer = pool.select(0, i);  // (2, kv_heads, pool_tokens, head_dim)
    const at::Tensor& cos_any = angles[0];
    at::Tensor query;
    if (fused_rotary(fused, cos_any, angles[1], layer, head_dim)) {
      if (rotary < 0 && !ones.defined()) {
        ones = at::ones_like(cos_any);
        zeros = at::zeros_like(cos_any);
      }
      const at::Tensor& cos = rotary < 0 ? ones : angles[2 * rotary];
      const at::Tensor& sin = rotary < 0 ? zeros : angles[2 * rotary + 1];
      query = layer.scalar_type() == at::kFloat
                  ? rotary_write_kv<float>(fused, cos, sin, layer, write_at, q_heads, kv_heads, head_dim)
                  : rotary_write_kv<c10::BFloat16>(fused, cos, sin, layer, write_at, q_heads, kv_heads, head_dim);
    } else {
      at::Tensor x = heads(fused, head_dim);  // (1, q + 2 kv, N, hd)
      at::Tensor qk = x.slice(1, 0, qk_heads);
      if (rotary >= 0) qk = rotate(qk, angles[2 * rotary], angles[2 * rotary + 1]);
      query = qk.slice(1, 0, q_heads);
      at::Tensor kv = at::cat({qk.slice(1, q_heads), x.slice(1, qk_heads)}, 1);  // (1, 2 kv, N, hd)
      // write_kv
      at::Tensor layer_heads = layer.view({-1, layer.size(2), layer.size(3)});
      layer_heads.index_copy_(1, write_at, kv.select(0, 0).slice(1, 0, tokens).to(layer.scalar_type()));
    }
    // attend: every row in one call (decode_attention.cpp), as `batched_attention.attend` calls it,
    // a sliding layer's rows over their last `window` keys
    c10::IntArrayRef from = starts;
    if (window > 0) {
      auto found = std::find_if(windowed.begin(), windowed.end(), [&](const auto& w) { return w.first == window; });
      if (found == windowed.end()) {
        std::vector<int64_t> cut(starts.begin(), starts.end());
        for (int64_t r = 0; r < n; ++r) cut[r] = std::max(starts[r], ends[r] - window);
        windowed.emplace_back(window, std::move(cut));
        found = windowed.end() - 1;
      }
      from = found->second;
    }
    at::Tensor attn = decode_attention(query, layer, from, ends, scaling, float32_attention, softcap);
    at::Tensor out = project(attn.reshape({1, n, -1}).contiguous(), kO);
    if (nw[2].numel() > 0) out = norm(out, nw[2], family);  // Gemma's sandwich norm
    hidden = residual + out;
    residual = hidden;
    h = norm(hidden, nw[1], family);
    at::Tensor gate, up;
    if (d[kUp].numel() == 0) {  // gate/up as one layer
      const at::Tensor gate_up = project(h, kGate);
      auto parts = gate_up.split_with_sizes({gate_size, gate_up.size(-1) - gate_size}, -1);
      gate = parts[0], up = parts[1];
    } else {
      gate = project(h, kGate), up = project(h, kUp);
    }
    out = project(activation(gate, family) * up, kDown);
    if (nw[3].numel() > 0) out = norm(out, nw[3], family);
    hidden = residual + out;
  }
  return hidden;
}

}  // namespace
}  // namespace bul

TORCH_LIBRARY_FRAGMENT(bul, m) {
  m.def(
      "decode_layers(Tensor hidden, Tensor[] angles, Tensor pool, Tensor write_at, int[] starts, int[] ends, "
      "Tensor[] norms, int[] layer_shapes, Tensor[] weights, Tensor[] dense, Tensor?[] biases, int[] bits, "
      "int group_size, int dense_from_rows, int tiles_from_rows, int q_heads, int kv_heads, int head_dim, "
      "int gate_size, float eps, float scaling, int activation, bool one_plus_norms, "
      "bool head_norms_after_transpose, float softcap, bool float32_attention) -> Tensor",
      &bul::decode_layers);
  m.def(
      "rotary_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) layer, Tensor write_at, int q_heads, "
      "int kv_heads, int head_dim) -> Tensor",
      &bul::rotary_write_kv_op);
}
