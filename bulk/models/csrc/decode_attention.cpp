// Decode attention for every decode row of a step in one call: each row's one query over its
// request's keys and values in the KV pool, the SDPA call transformers' SDPA attention makes for
// one query and no mask, for all rows of a layer at once. Built with the native decode layers by
// `bulk/models/native.py`; `bulk/models/batched_attention.py` says when it is used.
//
// Why: a row's SDPA call is tens of microseconds, mostly its own setup, and from Python each call
// costs a few more; a step of 16 rows makes 16 x layers of them. Here they are made from C++, and
// with as many rows as threads or more, the rows are spread over the threads (each row's SDPA then
// runs on one thread: torch runs a parallel section inside another serially), where a row alone
// splits only its few key heads. Each row's call is the one the Python loop makes, with the same
// arguments, so the outputs are bit-identical to it: its computation does not depend on the thread.
//
//   query    (1, q_heads, N, head_dim)            after rotary
//   layer    (2, kv_heads, pool_tokens, head_dim) one layer of the pool: keys, then values
//   starts, ends                                  per row: its KV range in the pool (this step's
//                                                 token included)
//   float32  attend in float32 (`batched_attention.attends_in_float32`), converting what is not
//   returns  (1, N, q_heads, head_dim), in the query's dtype

#include "decode_attention.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace bul {

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& layer, c10::IntArrayRef starts,
                            c10::IntArrayRef ends, double scaling, bool float32) {
  TORCH_CHECK(query.dim() == 4 && query.size(0) == 1, "query: (1, q_heads, N, head_dim)");
  TORCH_CHECK(layer.dim() == 4 && layer.size(0) == 2, "layer: (2, kv_heads, pool_tokens, head_dim)");
  const int64_t q_heads = query.size(1), rows = query.size(2);
  TORCH_CHECK(layer.size(3) == query.size(3), "query and pool head_dim differ");
  TORCH_CHECK(q_heads % layer.size(1) == 0, "query heads must be a multiple of key heads");
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == rows && static_cast<int64_t>(ends.size()) == rows,
              "one KV range per row");
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(0 <= starts[r] && starts[r] < ends[r] && ends[r] <= layer.size(2),
                "a row's KV range is outside the pool");
  }
  const bool gqa = q_heads != layer.size(1);
  const at::ScalarType work = layer.scalar_type() == at::kFloat || float32 ? at::kFloat : query.scalar_type();
  const std::vector<int64_t> first(starts.begin(), starts.end()), last(ends.begin(), ends.end());
  std::vector<at::Tensor> outputs(static_cast<size_t>(rows));
  auto attend_row = [&](int64_t r) {
    at::Tensor q = query.slice(2, r, r + 1).to(work);
    at::Tensor k = layer.select(0, 0).slice(1, first[r], last[r]).unsqueeze(0).to(work);
    at::Tensor v = layer.select(0, 1).slice(1, first[r], last[r]).unsqueeze(0).to(work);
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

}  // namespace bul

TORCH_LIBRARY_FRAGMENT(bul, m) {
  m.def(
      "decode_attention(Tensor query, Tensor layer, int[] starts, int[] ends, float scaling, bool float32) "
      "-> Tensor",
      &bul::decode_attention);
}
