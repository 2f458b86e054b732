// Greedy decoding's choice for every row of a step's logits: the index of each row's largest value,
// as `torch.argmax(logits, dim=-1)` gives it (the first of equal largest values; a row holding a NaN
// gives its first NaN). Built with the native decode code by `bulk/models/native.py`.
//
// Why: ATen's argmax walks a row one element at a time, keeping an index beside the value; over 16
// rows of a 49,152-token vocabulary (a 16-row step of SmolLM2) that took about 1.5 ms a step on 2
// cores, a twentieth of the step. Here a row is read twice at vector width: its largest value (and
// whether it holds a NaN), then the first index holding it; the rows are spread over the threads.
//
//   logits   (rows, vocab) float32 or bfloat16, rows contiguous
//   returns  (rows,) int64

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace bul {
namespace {

using namespace vec;

inline float as_float(float x) { return x; }
inline float as_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
int64_t argmax_row(const T* row, int64_t n) {
  const int64_t body = n - n % kLanes;
  f32x16 top = f32x16{} - std::numeric_limits<float>::infinity();
  i32x16 nan = i32x16{};
  for (int64_t i = 0; i < body; i += kLanes) {
    const f32x16 v = load16(row + i);
    nan |= v != v;
    top = v > top ? v : top;
  }
  float best = -std::numeric_limits<float>::infinity();
  bool has_nan = false;
  for (int l = 0; l < kLanes; ++l) {
    best = std::max(best, top[l]);
    has_nan = has_nan || nan[l] != 0;
  }
  for (int64_t i = body; i < n; ++i) {
    const float v = as_float(row[i]);
    has_nan = has_nan || std::isnan(v);
    best = std::max(best, v);
  }
  for (int64_t i = 0; i < n; ++i) {  // the first index holding it: usually found well before the end
    const float v = as_float(row[i]);
    if (has_nan ? std::isnan(v) : v == best) return i;
  }
  return 0;  // a row of -inf: its first index, as argmax gives
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "logits: (rows, vocab)");
  const bool known = logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16;
  if (!known || !logits.device().is_cpu() || logits.stride(1) != 1 || logits.size(1) == 0) {
    return logits.argmax(-1);
  }
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* index = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      index[r] = logits.scalar_type() == at::kFloat
                     ? argmax_row(logits.const_data_ptr<float>() + r * stride, n)
                     : argmax_row(logits.const_data_ptr<c10::BFloat16>() + r * stride, n);
    }
  });
  return out;
}

}  // namespace
}  // namespace bul

TORCH_LIBRARY_FRAGMENT(bul, m) { m.def("argmax_rows(Tensor logits) -> Tensor", &bul::argmax_rows); }
