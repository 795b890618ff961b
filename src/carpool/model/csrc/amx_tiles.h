// AMX's tile state for the operator libraries that multiply on tiles (vnni_linear's AMX loop,
// fused_ops' int4_gemv): the process's request for it and the tile configuration's layout.
// Header-only, included by both translation units (each library its own copy); the kernel build
// hashes it with each source. Defines CARPOOL_AMX where the compiler targets AMX-BF16.

#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define CARPOOL_AMX 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace carpool_kernels {

// Linux hands out AMX's tile state to a process on request (oneDNN asks too, on its first
// brgemm; a small step can come before any brgemm, and either library may run first).
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// What _tile_loadconfig reads (palette 1): each tile's rows and bytes a row.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace carpool_kernels

#endif
