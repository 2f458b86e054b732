// Decode attention for all decode rows of a layer in one call (decode_attention.cpp).
#pragma once

#include <ATen/ATen.h>

namespace bul {

// query (1, q_heads, N, head_dim); layer (2, kv_heads, pool_tokens, head_dim); per row its KV range
// [starts[r], ends[r]) in the pool; float32: attend in float32 where SDPA computes it. Returns
// (1, N, q_heads, head_dim) in the query's dtype.
// `softcap`: scores soft-capped to softcap * tanh(score / softcap) before the softmax (Gemma 2's
// attention), 0 for none.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& layer, c10::IntArrayRef starts,
                            c10::IntArrayRef ends, double scaling, bool float32, double softcap = 0.0);

// Whether `decode_attention` has its own kernel for a pool of `dtype` with these heads (else it
// calls SDPA per row).
bool has_decode_kernel(at::ScalarType dtype, int64_t head_dim, int64_t groups);

}  // namespace bul
