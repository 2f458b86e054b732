// 16-lane float32 vectors for the native code (decode_attention.cpp, decode_layers.cpp, greedy.cpp):
// GCC's vector extensions, which the compiler lowers to AVX-512, AVX2 or NEON, whichever
// `-march=native` offers, and the loads every kernel needs (a bfloat16 row widened exactly).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace bul {
namespace vec {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

constexpr int kLanes = 16;

inline f32x16 splat(float x) { return f32x16{} + x; }

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32x16 load16(const c10::BFloat16* p) {
  // bfloat16 is the top half of a float32: widen and shift.
  u16x16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  const u32x16 wide = __builtin_convertvector(raw, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

// float32 -> bfloat16 bits (in the low half of each lane), rounded to nearest even as ATen rounds;
// a NaN becomes `nan_bits`: ATen's scalar conversion makes it 0x7FC0, its AVX-512 conversion
// (`cvtfp32_bf16`) 0xFFFF, and each caller matches the ATen path it stands in for.
inline u32x16 bf16_bits(f32x16 v, uint32_t nan_bits) {
  u32x16 u;
  std::memcpy(&u, &v, sizeof(u));
  const u32x16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const i32x16 nan = v != v;
  return nan ? u32x16{} + nan_bits : rounded;
}

// v rounded to bfloat16, as float32 (a NaN's bits as `bf16_bits` makes them).
inline f32x16 round_bf16(f32x16 v, uint32_t nan_bits) {
  const u32x16 bits = bf16_bits(v, nan_bits) << 16;
  f32x16 out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

}  // namespace vec
}  // namespace bul
