// What every AMX kernel (`tile_linear.cpp`, `prompt_attention.cpp`) needs before it touches a tile:
// whether this build has the instructions (`BUL_TILES`), Linux's permission for the tile registers'
// state, and the tile configuration's layout. And whether this build has AVX512-BF16's pair dot
// product (`BUL_BF16_DOT`), which multiplies the same tile layout a vector at a time where there is
// no tile unit (AMD's Zen 4, an Intel CPU whose kernel or hypervisor withholds the tiles).
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define BUL_BF16_DOT 1
#include <immintrin.h>
#endif

// The tile kernels' AMX paths sit beside their vector paths: a build with tiles has both.
#if defined(BUL_BF16_DOT) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define BUL_TILES 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace bul {

// A process must ask Linux for the tile registers' state once before using them (as oneDNN does);
// false where it refuses (an old kernel, a hypervisor that hides AMX).
inline bool tiles_permitted() {
  static const bool permitted = [] {
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

// `_tile_loadconfig`'s 64 bytes: palette 1, then each tile's bytes a row and rows (0: unused).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace bul

#endif
