// Quantized matrix products for a few rows on AMX tiles (`tile_linear.cpp`): what the native decode
// layers call for a projection whose weights are in the tile layout.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace bul {

// x (M, K) bfloat16 times the quantized weight (N, K) in the tile layout, plus `bias`: (M, N) bfloat16.
//   bits 4: qweight (N / 16, K / 32, 16, 16) uint8, scales (N / 16, K / 32, 2, 16) bfloat16
//   bits 8: qweight (N / 16, K / 32, 16, 32) int8,  scales (N / 16, 16) bfloat16
at::Tensor tile_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t bits,
                       const std::optional<at::Tensor>& bias);

// Whether tile_linear runs on this CPU (AMX tiles or AVX512-BF16 in this build).
bool tile_linear_available();

}  // namespace bul
