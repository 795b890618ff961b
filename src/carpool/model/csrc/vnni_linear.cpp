// bf16 linear layers over one weight layout for every row count, on CPUs with AMX: our own AMX
// loop, 32 rows at a time with the weights prefetched, or (K not a multiple of 32) oneDNN's AMX
// micro-kernel through ATen's cpublas::brgemm, with the next column block prefetched into L2.
// Both issue the same instructions in the same order: a row's result is the same bits whatever
// rows share the call (tested), so batched greedy tokens equal a request's alone. Without AMX
// (an AMD Zen 4 or 5, say), a prefetching AVX-512 BF16 matrix-vector kernel at every row count,
// six rows per pass over a column block (7-36 rows: over 16 KiB chunks of it, each chunk in L1
// for all the passes; above 36 rows the passes bring the next block into L2): also the same
// bits at every row count, and 1.0-2.2x oneDNN's packed linear there at 1-32 rows, level at
// 64-512 (BENCHMARKS.md, issue 11, ninth, tenth and seventeenth passes). Its pairs'
// products are ordered differently from AMX's, so the two are never mixed on one machine.
// Registers torch.ops.carpool.vnni_linear.
//
// The layout ("VNNI", what the dot-product instructions read): a [N, K] weight becomes
// [ceil(N / 64), K / 2, 64, 2]; block b holds output columns 64b..64b+63, and for each pair of
// input elements (2p, 2p+1) the 64 columns' two weights side by side. Why this layout:
//  - it is exactly the B operand of a bf16 brgemm with ld_b = 64, and 16 pairs of a 16-column
//    slice are one AMX tile (16 rows of 64 bytes, stride 256): one copy of each weight;
//  - each thread reads one contiguous run of blocks, which a software prefetch a few KiB
//    ahead keeps streaming (oneDNN's own linear on its packed layout reads ~11 GB/s at one
//    row on an AMX Xeon with 2 threads; BENCHMARKS.md "Fourth pass" has this kernel's).
// Sums are float32, rounded once to bf16 (round to nearest even), with the bias added in
// float32 before the rounding, as oneDNN's bf16 linear does; only the order of the sums
// differs from oneDNN's linear (results within a bf16 rounding of each other).
//
// On AVX2 CPUs without AVX-512 (AMD Zen 2/3), where torch's bf16 GEMM takes its generic loops,
// the same layout goes through float32 FMA loops (dot_pair8: each pair's 8 columns one load,
// widened by a shift and a mask; up to six rows a pass): 1.4-1.7x fused_ops' bf16_linear on
// plain weights at 4-32 rows of the small model's layers from memory, ~1.05x at 1-2 rows (a
// Zen 2, issue 11, twenty-second pass), and 1.35-1.4x more at 48-512 rows with six-row passes
// (twenty-seventh pass), again the same bits for a row at every row count.
//
// Built with -march=native: the AMX loop only where the compiler targets AMX, the
// matrix-vector kernel a plain loop without AVX-512 BF16 or AVX2 (same sums).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "amx_tiles.h"
#include "int4_vnni.h"
#include "vec_math.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using B16 = c10::BFloat16;
constexpr int64_t kBlockN = 64;  // output columns per block: four vectors of 16 float32 sums
constexpr int64_t kBlockM = 32;  // input rows per AMX call (two 16-row tiles)
// The input rows as the matrix-vector loops read them: bf16 pairs (AVX-512 BF16, plain loops),
// or widened once to float32 per call (AVX2, which broadcasts each value from memory: a bf16
// value broadcast took a load, a shift, a move to a vector register and a shuffle, and those
// bounded the loop at ~70 GFLOP/s of 2 Zen 2 cores).
#if defined(CARPOOL_AVX2)
using XT = float;
#else
using XT = B16;
#endif
// Software prefetch distance of the matrix-vector kernel, in K pairs (256 bytes each): 16
// pairs = 4 KiB ahead measured fastest of 0/4/8/16/32 with the weights in L3 (0: ~14 GB/s,
// 16: ~34 GB/s) on the AMX Xeon; 32 pairs = 8 KiB from memory on the Zen 4: 1.04-1.16x at 1-4
// rows on small's weights, 1.00-1.02x on medium's, 64 no better (issue 11, tenth pass).
constexpr int64_t kPrefetchPairs = 32;

// Address ranges of weights on transparent huge pages (pages.move_weights' arena, registered
// through vnni_linear.stream_from_huge_pages). A pass of 1-6 rows over a block there asks for
// nothing ahead and leaves the streaming to the hardware prefetcher, which follows a stream
// across a 2 MiB page but stops at every 4 KiB one: the software prefetch that pays on 4 KiB
// pages (above) costs there. Small's linears at 1 row, the Zen 4 VM (issue 11, fourteenth
// pass): without it 1.10-1.19x on huge pages, 0.91-0.97x on 4 KiB pages.
std::mutex huge_mutex;
std::vector<std::pair<uintptr_t, uintptr_t>> huge_ranges;  // [start, end)

bool on_huge_pages(const void* p, int64_t nbytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(huge_mutex);
  for (const auto& [lo, hi] : huge_ranges)
    if (lo <= a && a + static_cast<uintptr_t>(nbytes) <= hi) return true;
  return false;
}

// Registers (on) or forgets (off) the range [start, start + nbytes).
void vnni_linear_huge_pages(int64_t start, int64_t nbytes, bool on) {
  TORCH_CHECK(start > 0 && nbytes > 0, "vnni_linear_huge_pages: an empty range");
  const auto lo = static_cast<uintptr_t>(start), hi = lo + static_cast<uintptr_t>(nbytes);
  std::lock_guard<std::mutex> lock(huge_mutex);
  auto it = std::find(huge_ranges.begin(), huge_ranges.end(), std::make_pair(lo, hi));
  if (on && it == huge_ranges.end()) huge_ranges.emplace_back(lo, hi);
  if (!on && it != huge_ranges.end()) huge_ranges.erase(it);
}

bool vnni_linear_on_huge_pages(int64_t start, int64_t nbytes) {
  return on_huge_pages(reinterpret_cast<const void*>(start), nbytes);
}

// Paths (the operator's `path` argument): automatic, or one forced (tests and benchmarks
// compare them).
constexpr int64_t kPathAuto = 0, kPathGemv = 1, kPathBrgemm = 2;

bool has_amx_brgemm() { return at::native::cpublas::could_pack(at::kBFloat16); }

#if defined(CARPOOL_AMX)
using carpool_kernels::amx_permitted;
using carpool_kernels::TileConfig;

// Up to 32 rows of x times one 64-column block with AMX, into float32 c [rows, 64]. Tiles:
// 0-3 sums (one row tile x four 16-column slices, or two row tiles x two slices per pass),
// 4-5 the row tiles' next 32 inputs, 6 a slice's 16 pairs of weights. The same instruction in
// the same K order as oneDNN's brgemm for every sum, so the same bits (tested); but no
// per-call kernel lookup (~1 us each, and a step makes ~1,000 calls at batch 1), and the
// weights prefetched two K steps ahead.
void amx_tile_rows(const B16* x, int64_t rows, int64_t k, const B16* wb, float* c) {
  const int row_tiles = rows > 16 ? 2 : 1;
  const int slices = 4 / row_tiles;  // 16-column slices per pass over K
  const int64_t r0 = std::min<int64_t>(rows, 16), r1 = rows - r0;
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = (t / slices == 0 ? r0 : r1), cfg.colsb[t] = 64;
  cfg.rows[4] = r0, cfg.colsb[4] = 64;
  cfg.rows[5] = r1 > 0 ? r1 : 1, cfg.colsb[5] = 64;
  cfg.rows[6] = 16, cfg.colsb[6] = 64;
  _tile_loadconfig(&cfg);
  const int64_t steps = k / 32;
  constexpr int64_t kStepBytes = 16 * kBlockN * 2 * sizeof(B16);  // 16 pairs of 64 columns
  constexpr int64_t kLdb = kBlockN * 2 * sizeof(B16), kLdc = kBlockN * sizeof(float);
  const int64_t lda = k * sizeof(B16);
  for (int pass = 0; pass < row_tiles; ++pass) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t col0 = pass * slices * 16;  // first column of this pass
    for (int64_t t = 0; t < steps; ++t) {
      const B16* w = wb + t * 16 * kBlockN * 2 + col0 * 2;
      if (pass == 0) {  // the whole step's rows (both passes' columns) two steps ahead
        const char* ahead = reinterpret_cast<const char*>(wb + t * 16 * kBlockN * 2) +
                            2 * kStepBytes;
        for (int64_t o = 0; o < kStepBytes; o += 64) _mm_prefetch(ahead + o, _MM_HINT_T0);
      }
      _tile_loadd(4, x + 32 * t, lda);
      if (row_tiles == 1) {
        _tile_loadd(6, w, kLdb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(6, w + 32, kLdb);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(6, w + 64, kLdb);
        _tile_dpbf16ps(2, 4, 6);
        _tile_loadd(6, w + 96, kLdb);
        _tile_dpbf16ps(3, 4, 6);
      } else {
        _tile_loadd(5, x + 16 * k + 32 * t, lda);
        _tile_loadd(6, w, kLdb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        _tile_loadd(6, w + 32, kLdb);
        _tile_dpbf16ps(1, 4, 6);
        _tile_dpbf16ps(3, 5, 6);
      }
    }
    if (row_tiles == 1) {
      _tile_stored(0, c, kLdc);
      _tile_stored(1, c + 16, kLdc);
      _tile_stored(2, c + 32, kLdc);
      _tile_stored(3, c + 48, kLdc);
    } else {
      _tile_stored(0, c + col0, kLdc);
      _tile_stored(1, c + col0 + 16, kLdc);
      _tile_stored(2, c + 16 * kBlockN + col0, kLdc);
      _tile_stored(3, c + 16 * kBlockN + col0 + 16, kLdc);
    }
  }
}
#endif

#if defined(CARPOOL_AMX) && defined(__AVX512BF16__)
// Rows up to which an int8 weight's blocks (vnni_linear_int8) multiply on amx_int8_rows: the
// rows are one B tile's columns (16 at most). The small model's 32 int8 layer matrices from
// memory (benchmarks/int8_tiles.py, the AMX Xeon of issue 11's forty-eighth pass): 1.13-1.27x
// the widened blocks at 1-16 rows.
constexpr int64_t kInt8SwapRows = 16;

// x [rows, K] bf16 as amx_int8_rows' B tiles: its 32-bit words (pairs of inputs) transposed
// to [K / 2, rows], so that the 16 pairs of a 32-input step are a tile of 16 rows of `rows`
// words.
void int8_swap_inputs(const B16* x, int64_t rows, int64_t k, std::vector<uint32_t>& xt) {
  const int64_t pairs = k / 2;
  xt.resize(pairs * rows);
  const auto* w = reinterpret_cast<const uint32_t*>(x);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t p = 0; p < pairs; ++p) xt[p * rows + r] = w[r * pairs + p];
}

// amx_tile_rows of up to 16 rows times block b of int8 codes [N, K] (its widened block), the
// same bits: with the operands' roles swapped. amx_tile_rows multiplies the rows (A) by the
// block's weights in VNNI pairs (B), which row-major codes become only through a transpose
// (Int8Words::pack16). Here the codes are A as they lie: each 32-input step's codes of the
// block's 64 weight rows widened to bf16 (two conversions and a VCVTNE2PS2BF16 per row) into
// abuf two steps ahead of the tile unit's products; the rows are B (xt, int8_swap_inputs).
// The sums come out as [column][row], with the same products added in the same order for
// every sum (TDPBF16PS adds an element's pairs in one order whichever operand holds which:
// tested against amx_tile_rows, which is the widened block's vnni_linear). `valid`: the
// block's columns inside N (rows past them zero). abuf: 3 x 64 x 32 bf16, tbuf: 64 x 16
// floats, both 64-byte aligned; ahead: a later block's codes (64 k contiguous bytes) to bring
// into L2 meanwhile, or null. Into float32 c [rows, 64], as amx_tile_rows.
void amx_int8_rows(const uint32_t* xt, int64_t rows, int64_t k, const int8_t* codes,
                   int64_t valid, float* c, B16* abuf, float* tbuf, const char* ahead) {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(rows * 4);
  for (int t = 5; t < 7; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  const int64_t steps = k / 32;
  // Step s's 32 codes of each of the block's 64 weight rows widened into abuf[s % 3].
  auto widen = [&](int64_t s) {
    // 32 lines of the later block a step: the 64 rows' reads of 32 bytes a step are 64
    // streams, more than the hardware's prefetchers follow.
    if (ahead != nullptr)
      for (int64_t l = 32 * s; l < 32 * s + 32; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T1);
    B16* a = abuf + s % 3 * kBlockN * 32;
    for (int64_t j = 0; j < kBlockN; ++j) {
      __m512i v = _mm512_setzero_si512();
      if (j < valid) {
        const int8_t* q = codes + j * k + 32 * s;
        const __m512 lo = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
        const __m512 hi = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
        v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // exact: every int8 is a bf16
      }
      _mm512_store_si512(a + j * 32, v);
    }
  };
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  widen(0);
  if (steps > 1) widen(1);
  const int64_t ldb = rows * 4;
  for (int64_t s = 0; s < steps; ++s) {
    const B16* a = abuf + s % 3 * kBlockN * 32;
    _tile_loadd(4, xt + s * 16 * rows, ldb);
    _tile_loadd(5, a, 64);
    _tile_dpbf16ps(0, 5, 4);
    _tile_loadd(6, a + 16 * 32, 64);
    _tile_dpbf16ps(1, 6, 4);
    _tile_loadd(5, a + 32 * 32, 64);
    _tile_dpbf16ps(2, 5, 4);
    _tile_loadd(6, a + 48 * 32, 64);
    _tile_dpbf16ps(3, 6, 4);
    // Two steps ahead: a tile load reads a store only once the store retires, after the
    // products before it (one step ahead, each step's products waited for the widening).
    if (s + 2 < steps) widen(s + 2);
  }
  if (rows == 1) {  // [column][1]: the row's 64 sums in order
    _tile_stored(0, c, 4);
    _tile_stored(1, c + 16, 4);
    _tile_stored(2, c + 32, 4);
    _tile_stored(3, c + 48, 4);
    return;
  }
  _tile_stored(0, tbuf, ldb);
  _tile_stored(1, tbuf + 16 * rows, ldb);
  _tile_stored(2, tbuf + 32 * rows, ldb);
  _tile_stored(3, tbuf + 48 * rows, ldb);
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(rows)));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < 4; ++j)
      _mm512_store_ps(c + r * kBlockN + 16 * j,
                      _mm512_i32gather_ps(idx, tbuf + 16 * j * rows + r, 4));
}
#endif

#if defined(__AVX512BF16__)
// acc[m][j] += pair p of x's row m (row stride k) times the four 16-column vectors of weights at
// `row` (one pair of the block): one VDPBF16PS per sum, the pair broadcast once per row.
template <int MR>
__attribute__((always_inline)) inline void dot_pair(__m512 (&acc)[MR][4], const char* row,
                                                    const B16* x, int64_t k, int64_t p) {
  const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row);
  const __m512bh w1 = (__m512bh)_mm512_loadu_si512(row + 64);
  const __m512bh w2 = (__m512bh)_mm512_loadu_si512(row + 128);
  const __m512bh w3 = (__m512bh)_mm512_loadu_si512(row + 192);
  for (int m = 0; m < MR; ++m) {
    int32_t xpair;
    std::memcpy(&xpair, x + m * k + 2 * p, sizeof(xpair));
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(xpair);
    acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xv);
    acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xv);
    acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, xv);
    acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, xv);
  }
}
#endif

#if defined(CARPOOL_AVX2)
// The AVX2 loops (AMD Zen 2/3: no AVX-512, no bf16 instructions; torch's bf16 GEMM there takes
// its generic loops). A pair's 8 columns are one 32-byte load: each column's two bf16 weights
// side by side in a 32-bit word, widened exactly to float32 by a shift (the even element) and a
// mask (the odd one). Every sum takes, pair by pair, fma(w_even, x_even) then fma(w_odd,
// x_odd) into one float32 accumulator, whatever the rows, passes or column tiles: the same bits
// for a row at every row count. Rows per pass: up to 6 (kPassRows), over tiles of NV vectors of
// 8 columns with MR * NV accumulators (NV = 8 at one row, 4 at two, 2 at three to six): at most
// 15 of the 16 vector registers, so nothing spills. The loads per multiply-add are what bound
// bf16_linear on plain [N, K] weights (one input load per FMA): here 4 weight loads and 12
// broadcasts feed 24 FMAs at six rows. Six rows keep 12 sums in flight: each takes two
// dependent FMAs a pair (5 cycles each on a Zen 2), so 8 of them (four rows) can issue at most
// 1.6 of the 2 FMAs a cycle.
inline void widen_pair8(const B16* w, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// acc[m][v] += pair p of x's rows [0, MR) (row stride k) times columns [8 * (v0 + v),
// 8 * (v0 + v) + 8) of block wb.
template <int MR, int NV>
__attribute__((always_inline)) inline void dot_pair8(__m256 (&acc)[MR][NV], const B16* wb,
                                                     const float* x, int64_t k, int64_t p,
                                                     int v0) {
  // (The loops over rows and vectors fully unrolled: gcc left some as loops, and then spilt
  // accumulators, without the pragmas.)
  const B16* row = wb + p * kBlockN * 2 + v0 * 16;
  if constexpr (MR <= 2) {  // the inputs held, one weight vector at a time
    __m256 xe[MR], xo[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      xe[m] = _mm256_broadcast_ss(x + m * k + 2 * p);
      xo[m] = _mm256_broadcast_ss(x + m * k + 2 * p + 1);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      __m256 we, wo;
      widen_pair8(row + v * 16, we, wo);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        acc[m][v] = _mm256_fmadd_ps(we, xe[m], acc[m][v]);
        acc[m][v] = _mm256_fmadd_ps(wo, xo[m], acc[m][v]);
      }
    }
  } else if constexpr (MR <= 4) {  // the weights held, one input row at a time
    __m256 we[NV], wo[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) widen_pair8(row + v * 16, we[v], wo[v]);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 xe = _mm256_broadcast_ss(x + m * k + 2 * p);
      const __m256 xo = _mm256_broadcast_ss(x + m * k + 2 * p + 1);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        acc[m][v] = _mm256_fmadd_ps(we[v], xe, acc[m][v]);
        acc[m][v] = _mm256_fmadd_ps(wo[v], xo, acc[m][v]);
      }
    }
  } else {  // five or six rows: the even halves for every row, then the odd ones
    // 2 * MR accumulators, NV = 2 weight vectors and a broadcast: 15 of the 16 registers at
    // six rows (holding both halves, as above, would take 17 and spill). Each accumulator
    // still takes its pair's even product before its odd one: the same sums.
    __m256 w[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      w[v] = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + v * 16)), 16));
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 xe = _mm256_broadcast_ss(x + m * k + 2 * p);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(w[v], xe, acc[m][v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      w[v] = _mm256_castsi256_ps(
          _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + v * 16)),
                           _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 xo = _mm256_broadcast_ss(x + m * k + 2 * p + 1);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(w[v], xo, acc[m][v]);
    }
  }
}

// Pairs between a tile's prefetch requests (8: 2 KiB of the block).
constexpr int64_t kAskPairs = 8;

// What a tile asks for ahead while it runs: before its s-th run of kAskPairs pairs, the lines
// [line0 + want * (s0 + s) / steps, line0 + want * (s0 + s + 1) / steps) of `base` (64 bytes
// each), so that `want` lines spread evenly over `steps` runs (over several tiles, their
// runs numbered on from s0).
struct Ask {
  const char* base = nullptr;
  int64_t line0 = 0, want = 0, s0 = 0, steps = 1;
};

// Walks an Ask's runs in order without a division per run (two idivs a run cost the one-row
// loop ~15%): `line` is run s's first line, `frac` the remainder want * s % steps.
struct AskCursor {
  const char* base;
  int64_t line, frac, q, r, steps;
  explicit AskCursor(const Ask& a)
      : base(a.base),
        line(a.line0 + a.want * a.s0 / a.steps),
        frac(a.want * a.s0 % a.steps),
        q(a.want / a.steps),
        r(a.want % a.steps),
        steps(a.steps) {}
};

// Prefetch localities (__builtin_prefetch's third argument): into L1 (as _MM_HINT_T0), L2 (T1).
constexpr int kToL1 = 3, kToL2 = 2;

// The cursor's next run of lines asked for, locality H. (A function: the same loop in a lambda
// lost its prefetches to gcc 12, which kept the rest of the lambda's code.)
template <int H>
__attribute__((always_inline)) inline void ask_next(AskCursor& a) {
  int64_t end = a.line + a.q;
  a.frac += a.r;
  if (a.frac >= a.steps) {
    a.frac -= a.steps;
    ++end;
  }
  for (; a.line < end; ++a.line) __builtin_prefetch(a.base + 64 * a.line, 0, H);
}

// acc[m][v] += pairs [p0, p1) of x's rows times the tile's columns (dot_pair8), with `ask`'s
// lines asked for (locality H) before each run of kAskPairs pairs. The runs are unrolled and the
// loop over them is the only one: with a run as a loop inside it, gcc kept the accumulator
// array in memory and stored every accumulator after every pair (six rows from L2, one Zen 2
// core: 72 GFLOP/s; 98-102 with the stores gone; issue 11, twenty-seventh pass).
template <int MR, int NV, int H>
__attribute__((always_inline)) inline void dot_pairs8(__m256 (&acc)[MR][NV], const B16* wb,
                                                      const float* x, int64_t k, int64_t p0,
                                                      int64_t p1, int v0, const Ask& ask) {
  AskCursor cursor(ask);
  int64_t p = p0;
  if constexpr (MR == 1) {
    // One row (a decode step alone; bound by the weights' stream, not the FMAs) keeps its pairs
    // as a loop: unrolled, its loads came out of order and the one-row pass over small's
    // layers on huge pages took 1.25x longer.
    for (; p < p1; p += kAskPairs) {
      ask_next<H>(cursor);
      const int64_t end = std::min<int64_t>(p1, p + kAskPairs);
      for (int64_t q = p; q < end; ++q) dot_pair8<MR, NV>(acc, wb, x, k, q, v0);
    }
  } else {
    for (; p + kAskPairs <= p1; p += kAskPairs) {
      ask_next<H>(cursor);
#pragma GCC unroll 8
      for (int64_t i = 0; i < kAskPairs; ++i) dot_pair8<MR, NV>(acc, wb, x, k, p + i, v0);
    }
    if (p < p1) ask_next<H>(cursor);
    for (; p < p1; ++p) dot_pair8<MR, NV>(acc, wb, x, k, p, v0);
  }
}

// Vectors of 8 columns per tile at MR rows (see above).
template <int MR>
constexpr int tile_vectors() {
  return MR == 1 ? 8 : MR == 2 ? 4 : 2;
}

// 8 float32 sums plus bias (columns [c0, c0 + cn)), rounded to bf16 (nearest even) into y.
inline void store8_bf16(__m256 v, const float* bias, B16* y, int64_t cn) {
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int64_t c = 0; c < cn; ++c) y[c] = B16(tmp[c] + (bias != nullptr ? bias[c] : 0.0f));
}
#endif

// Where a pass over a block asks for weights ahead of it (gemv_block's PF).
enum Prefetch {
  kNone = 0,   // nothing (the block is in L2 already)
  kAhead = 1,  // this block's rows kPrefetchPairs ahead (streaming it from memory in this pass)
  kNext = 2,   // lines [line0, line1) of the next block into L2, spread over this pass
};

// Rows [0, MR) of x (row stride k) times one 64-column block `wb` ([k/2, 64, 2]) into y (row
// stride ldy), columns [0, ncols) of the block kept. PF as above (kNext: the next block `nxt`).
template <int MR, Prefetch PF = kAhead>
void gemv_block(const XT* x, int64_t k, const B16* wb, const float* bias, B16* y, int64_t ldy,
                int64_t ncols, const char* nxt = nullptr, int64_t line0 = 0,
                int64_t line1 = 0) {
  const int64_t pairs = k / 2;
#if defined(__AVX512BF16__)
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  // kNext: (line1 - line0) lines over `pairs` iterations, Bresenham-style (no division).
  int64_t line = line0, debt = 0;
  const int64_t want = line1 - line0;
  for (int64_t p = 0; p < pairs; ++p) {
    const char* row = reinterpret_cast<const char*>(wb + p * kBlockN * 2);
    // Past the block's end this reads ahead into the next block (contiguous) or, at the
    // weight's end, nowhere: a prefetch never faults.
    const char* ahead = row + kPrefetchPairs * kBlockN * 2 * sizeof(B16);
    if constexpr (PF == kAhead) {
      for (int c = 0; c < 4; ++c) _mm_prefetch(ahead + 64 * c, _MM_HINT_T0);
    }
    if constexpr (PF == kNext) {
      for (debt += want; debt >= pairs; debt -= pairs) _mm_prefetch(nxt + 64 * line++, _MM_HINT_T1);
    }
    dot_pair<MR>(acc, row, x, k, p);
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < 4 && 16 * j < ncols; ++j) {
      const int64_t c0 = 16 * j, cn = std::min<int64_t>(16, ncols - c0);
      const __mmask16 mask = static_cast<__mmask16>((1u << cn) - 1);
      __m512 v = acc[m][j];
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + c0));
      _mm256_mask_storeu_epi16(y + m * ldy + c0, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
#elif defined(CARPOOL_AVX2)
  constexpr int NV = tile_vectors<MR>();
  for (int v0 = 0; v0 < kBlockN / 8 && 8 * v0 < ncols; v0 += NV) {
    __m256 acc[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
    // The first tile streams the block (kAhead: its whole pair rows kPrefetchPairs ahead,
    // which the other tiles then find in cache) or carries the next block's lines (kNext).
    Ask ask;
    ask.steps = (pairs + kAskPairs - 1) / kAskPairs;
    if (PF == kAhead && v0 == 0) {
      ask.base = reinterpret_cast<const char*>(wb + kPrefetchPairs * kBlockN * 2);
      ask.want = 4 * kAskPairs * ask.steps;  // the 4 lines of every pair
    }
    if (PF == kNext && v0 == 0) ask = Ask{nxt, line0, line1 - line0, 0, ask.steps};
    dot_pairs8<MR, NV, PF == kAhead ? kToL1 : kToL2>(acc, wb, x, k, 0, pairs, v0, ask);
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) {
        const int64_t c0 = 8 * (v0 + v);
        if (c0 < ncols)
          store8_bf16(acc[m][v], bias != nullptr ? bias + c0 : nullptr, y + m * ldy + c0,
                      std::min<int64_t>(8, ncols - c0));
      }
  }
#else
  for (int m = 0; m < MR; ++m) {
    for (int64_t c = 0; c < ncols; ++c) {
      float s = 0.0f;
      for (int64_t p = 0; p < pairs; ++p) {
        const B16* w = wb + (p * kBlockN + c) * 2;
        s += carpool_kernels::to_float(x[m * k + 2 * p]) * carpool_kernels::to_float(w[0]) +
             carpool_kernels::to_float(x[m * k + 2 * p + 1]) * carpool_kernels::to_float(w[1]);
      }
      y[m * ldy + c] = B16(s + (bias != nullptr ? bias[c] : 0.0f));
    }
  }
#endif
}

// One pass of MR rows over a block with the prefetch chosen at run time.
template <int MR>
void gemv_pass(Prefetch pf, const XT* x, int64_t k, const B16* wb, const float* bias, B16* y,
               int64_t ldy, int64_t ncols, const char* nxt, int64_t line0, int64_t line1) {
  switch (pf) {
    case kAhead: gemv_block<MR, kAhead>(x, k, wb, bias, y, ldy, ncols); break;
    case kNext: gemv_block<MR, kNext>(x, k, wb, bias, y, ldy, ncols, nxt, line0, line1); break;
    default: gemv_block<MR, kNone>(x, k, wb, bias, y, ldy, ncols);
  }
}

// Input rows per pass over a block: six (AVX-512: 24 accumulators of 32 registers; AVX2: 12
// of 16, see dot_pair8).
constexpr int64_t kPassRows = 6;

// Rows of pass `pass` when `rows` rows go in (rows + 5) / 6 passes, spread evenly (32 rows: 6,
// 6, 5, 5, 5, 5, not 6 x 5 + 2): a pass of one or two rows has too few sums in flight to hide
// the dot products' latency (small 1.13x at 20 rows; BENCHMARKS.md, issue 11, twentieth pass).
inline int64_t pass_rows(int64_t rows, int64_t pass) {
  const int64_t passes = (rows + kPassRows - 1) / kPassRows;
  return rows / passes + (pass < rows % passes ? 1 : 0);
}

// All rows of x times one block, six rows at a time (the block stays in L1/L2 between them):
// 24 accumulators and the block's 4 vectors in 32 registers. Six measured 1.04-1.08x four at
// 16-32 rows on a Zen 4 (BENCHMARKS.md, issue 11, ninth pass); each row's sums run in the same
// order either way.
// Prefetch: one pass (up to 6 rows) streams its block from memory (kAhead). With more passes,
// the passes over this block also ask for the next block `nxt` (nullptr: none) into L2, spread
// evenly over them, so no pass waits on memory while the others compute from L2: before, the
// first pass over each block streamed it alone (as slow as one row) and the rest computed
// (BENCHMARKS.md, issue 11, tenth pass). `first`: the first block of this thread's run, whose
// first pass streams it itself. `huge`: the weight lies on huge pages (on_huge_pages), where
// one pass (up to 6 rows) leaves the streaming to the hardware.
void gemv_rows(const XT* x, int64_t rows, int64_t k, const B16* wb, const float* bias, B16* y,
               int64_t ldy, int64_t ncols, const char* nxt, bool first, bool huge) {
  const int64_t passes = (rows + kPassRows - 1) / kPassRows;
  const bool spread = passes > 1 && nxt != nullptr;
  const int64_t lines = (k / 2) * kBlockN * 2 * static_cast<int64_t>(sizeof(B16)) / 64;
  // Passes that carry the next block's lines, and the first of them.
  const int64_t p0 = first ? 1 : 0, carriers = passes - p0;
  for (int64_t pass = 0, m = 0; pass < passes; m += pass_rows(rows, pass), ++pass) {
    Prefetch pf = kNone;
    int64_t line0 = 0, line1 = 0;
    if (pass == 0 && (first || !spread)) {
      pf = huge && passes == 1 ? kNone : kAhead;
    } else if (spread && pass >= p0) {
      pf = kNext;
      line0 = lines * (pass - p0) / carriers;
      line1 = lines * (pass - p0 + 1) / carriers;
    }
    const XT* xm = x + m * k;
    B16* ym = y + m * ldy;
    switch (pass_rows(rows, pass)) {
      case 6: gemv_pass<6>(pf, xm, k, wb, bias, ym, ldy, ncols, nxt, line0, line1); break;
      case 5: gemv_pass<5>(pf, xm, k, wb, bias, ym, ldy, ncols, nxt, line0, line1); break;
      case 4: gemv_pass<4>(pf, xm, k, wb, bias, ym, ldy, ncols, nxt, line0, line1); break;
      case 3: gemv_pass<3>(pf, xm, k, wb, bias, ym, ldy, ncols, nxt, line0, line1); break;
      case 2: gemv_pass<2>(pf, xm, k, wb, bias, ym, ldy, ncols, nxt, line0, line1); break;
      default: gemv_pass<1>(pf, xm, k, wb, bias, ym, ldy, ncols, nxt, line0, line1);
    }
  }
}

#if defined(__AVX512F__)
// 16 float32 values rounded to bf16 as c10::BFloat16(float) rounds them (to nearest even, a NaN
// to 0x7FC0, subnormals kept; VCVTNEPS2BF16 flushes them): the bits of torch's casts.
inline __m256i round16_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
#endif

// float32 values rounded to bf16 as torch's cast rounds them, into the calling thread's buffer
// (grows to the largest, kept): a float32 model's wide rows, which the fused products take as
// they are (the cast to a new bf16 tensor before them gone).
const B16* rounded_bf16(const float* x, int64_t count) {
  static thread_local std::vector<B16> buffer;
  if (buffer.size() < static_cast<size_t>(count)) buffer.resize(count);
  B16* out = buffer.data();
  at::parallel_for(0, count, 1 << 15, [&](int64_t a, int64_t b) {
    int64_t i = a;
#if defined(__AVX512F__)
    for (; i + 16 <= b; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), round16_bf16(_mm512_loadu_ps(x + i)));
#endif
    for (; i < b; ++i) out[i] = B16(x[i]);
  });
  return out;
}

// Where multiply puts its rounded sums: bf16 rows (vnni_linear; a bf16 model's wide rows), or
// float32 rows holding the bf16 values (a float32 model's wide rows, written straight into their
// rows of the layer's output: the cast and the copy after the product gone), in both cases
// optionally times a bf16 column scale (Int8Linear's row scales): the float32 sum times the
// scale, rounded once, as int8_dot's (issue 11, forty-eighth pass; before, the rounded sum times
// the scale rounded again, as `y * scales` in bf16: ~2x the error of one rounding).
struct Out {
  B16* bf16 = nullptr;  // one of the two
  float* f32 = nullptr;
  int64_t ld = 0;                // row stride
  const B16* scales = nullptr;  // [n], or null
  bool plain() const { return f32 == nullptr && scales == nullptr; }
};

// float32 sums of `rows` rows (stride ldc) plus bias, rounded to bf16 (VCVTNEPS2BF16 where the
// CPU has it) into `out`'s rows [row0, row0 + rows), columns [col, col + ncols).
void store_out(const float* c, int64_t ldc, int64_t rows, const float* bias, const Out& out,
               int64_t row0, int64_t col, int64_t ncols) {
  const B16* sc = out.scales != nullptr ? out.scales + col : nullptr;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t at = (row0 + i) * out.ld + col;
    int64_t j = 0;
#if defined(__AVX512BF16__)
    for (; j < ncols; j += 16) {
      const int64_t cn = std::min<int64_t>(16, ncols - j);
      const __mmask16 mask = static_cast<__mmask16>((1u << cn) - 1);
      __m512 v = _mm512_maskz_loadu_ps(mask, c + i * ldc + j);
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + j));
      if (sc != nullptr)  // the scaled sum rounded once (as int8_dot's)
        v = _mm512_mul_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(
                                 _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, sc + j)), 16)));
      const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
      if (out.f32 != nullptr)
        _mm512_mask_storeu_ps(out.f32 + at + j, mask,
                              _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
      else
        _mm256_mask_storeu_epi16(out.bf16 + at + j, mask, b);
    }
#endif
    for (; j < ncols; ++j) {
      const float v = c[i * ldc + j] + (bias != nullptr ? bias[j] : 0.0f);
      const B16 b(sc != nullptr ? v * static_cast<float>(sc[j]) : v);
      if (out.f32 != nullptr) out.f32[at + j] = static_cast<float>(b);
      else out.bf16[at + j] = b;
    }
  }
}

// Rows [0, MR) of x times pairs [p0, p1) of block `wb`, added to the float32 sums in c (row
// stride kBlockN; from zero when `init`). Lines [line0, line1) from `ahead` into L2 meanwhile.
// Each sum takes its pairs in the same order as gemv_block's (float32 through c is exact):
// the same bits.
template <int MR>
void gemv_chunk(const XT* x, int64_t k, const B16* wb, int64_t p0, int64_t p1, float* c,
                bool init, const char* ahead, int64_t line0, int64_t line1) {
#if defined(__AVX512BF16__)
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j)
      acc[m][j] = init ? _mm512_setzero_ps() : _mm512_load_ps(c + m * kBlockN + 16 * j);
  int64_t line = line0, debt = 0;
  const int64_t want = line1 - line0, n = p1 - p0;
  for (int64_t p = p0; p < p1; ++p) {
    for (debt += want; debt >= n; debt -= n) _mm_prefetch(ahead + 64 * line++, _MM_HINT_T1);
    const char* row = reinterpret_cast<const char*>(wb + p * kBlockN * 2);
    dot_pair<MR>(acc, row, x, k, p);
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) _mm512_store_ps(c + m * kBlockN + 16 * j, acc[m][j]);
#elif defined(CARPOOL_AVX2)
  constexpr int NV = tile_vectors<MR>();
  for (int v0 = 0; v0 < kBlockN / 8; v0 += NV) {
    __m256 acc[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v)
        acc[m][v] = init ? _mm256_setzero_ps() : _mm256_load_ps(c + m * kBlockN + 8 * (v0 + v));
    // The lines asked for ahead, spread evenly over the tiles' runs (a burst filled the miss
    // queues).
    const int64_t per_tile = (p1 - p0 + kAskPairs - 1) / kAskPairs;
    const Ask ask{ahead, line0, line1 - line0, per_tile * (v0 / NV), per_tile * (kBlockN / 8 / NV)};
    dot_pairs8<MR, NV, kToL2>(acc, wb, x, k, p0, p1, v0, ask);
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) _mm256_store_ps(c + m * kBlockN + 8 * (v0 + v), acc[m][v]);
  }
#else
  for (int m = 0; m < MR; ++m) {
    for (int64_t col = 0; col < kBlockN; ++col) {
      float s = init ? 0.0f : c[m * kBlockN + col];
      for (int64_t p = p0; p < p1; ++p) {
        const B16* w = wb + (p * kBlockN + col) * 2;
        s += carpool_kernels::to_float(x[m * k + 2 * p]) * carpool_kernels::to_float(w[0]) +
             carpool_kernels::to_float(x[m * k + 2 * p + 1]) * carpool_kernels::to_float(w[1]);
      }
      c[m * kBlockN + col] = s;
    }
  }
#endif
}

// 7 to kChunkedMaxRows rows (a decode step's batch): the block in chunks of kChunkPairs pairs
// (16 KiB), every pass of six rows over a chunk while it is in L1, the float32 sums kept in c
// between chunks, and the chunk kChunksAhead further on asked into L2, spread over the passes.
// The weights then stream from memory once, in order, at the pace of the compute; gemv_rows
// instead streams each block in its first pass and rereads it from L2 in the others, with the
// next block asked for meanwhile. Same sums in the same order: the same bits (tested). On the
// Zen 5 (ab_vnni_linear.py --huge-pages, medians of 9-15 alternated rounds): medium 1.05x at 8,
// 16 and 32 rows, small 1.25x / 1.15x / 1.00x at 8 / 16 / 32; at 128 and 512 rows 0.96-0.97x,
// and level at 64, hence the bound (BENCHMARKS.md, issue 11, seventeenth pass). Chunks of 32
// or 128 pairs and 4 chunks ahead measured no better.
constexpr int64_t kChunkPairs = 64;  // 256 bytes a pair
constexpr int64_t kChunksAhead = 2;
constexpr int64_t kChunkedMaxRows = 36;  // six passes of six rows
// Rows above which the chunked loop runs: on AVX2 from 2 (its tiles read a block's columns in
// strides, which from memory needs the chunk asked for ahead: 2-4 rows of the small model's
// layers took 1.15-1.4x longer through gemv_rows' one-pass stream on a Zen 2).
#if defined(CARPOOL_AVX2)
constexpr int64_t kChunkedMinRows = 1;
#else
constexpr int64_t kChunkedMinRows = 6;
#endif

void gemv_rows_chunked(const XT* x, int64_t rows, int64_t k, const B16* wb, const float* bias,
                       B16* y, int64_t ldy, int64_t ncols) {
  TORCH_CHECK(rows <= kChunkedMaxRows, "gemv_rows_chunked: ", rows, " rows");
  alignas(64) float c[kChunkedMaxRows * kBlockN];
  const int64_t pairs = k / 2, passes = (rows + kPassRows - 1) / kPassRows;
  const char* base = reinterpret_cast<const char*>(wb);
  for (int64_t p0 = 0; p0 < pairs; p0 += kChunkPairs) {
    const int64_t p1 = std::min<int64_t>(pairs, p0 + kChunkPairs);
    // The chunk kChunksAhead after this one (past the block's end: the next block's).
    const char* ahead = base + (p0 + kChunksAhead * kChunkPairs) * kBlockN * 2 * sizeof(B16);
    const int64_t lines = (p1 - p0) * kBlockN * 2 * sizeof(B16) / 64;
    for (int64_t pass = 0, m = 0; pass < passes; m += pass_rows(rows, pass), ++pass) {
      const int64_t l0 = lines * pass / passes, l1 = lines * (pass + 1) / passes;
      const XT* xm = x + m * k;
      float* cm = c + m * kBlockN;
      const bool init = p0 == 0;
      switch (pass_rows(rows, pass)) {
        case 6: gemv_chunk<6>(xm, k, wb, p0, p1, cm, init, ahead, l0, l1); break;
        case 5: gemv_chunk<5>(xm, k, wb, p0, p1, cm, init, ahead, l0, l1); break;
        case 4: gemv_chunk<4>(xm, k, wb, p0, p1, cm, init, ahead, l0, l1); break;
        case 3: gemv_chunk<3>(xm, k, wb, p0, p1, cm, init, ahead, l0, l1); break;
        case 2: gemv_chunk<2>(xm, k, wb, p0, p1, cm, init, ahead, l0, l1); break;
        default: gemv_chunk<1>(xm, k, wb, p0, p1, cm, init, ahead, l0, l1);
      }
    }
  }
  Out out;
  out.bf16 = y, out.ld = ldy;
  store_out(c, kBlockN, rows, bias, out, 0, 0, ncols);
}

// The calling thread's buffer for a widened block of `elems` bf16 values (grows to the largest,
// kept: a step widens every layer's blocks), 64-byte aligned.
B16* widen_buffer(int64_t elems) {
  struct alignas(64) Line {
    B16 v[32];
  };
  static thread_local std::vector<Line> lines;
  const size_t want = static_cast<size_t>((elems + 31) / 32);
  if (lines.size() < want) lines.resize(want);
  return lines.front().v;
}

// Where the loops below find weight block b ([K / 2, 64, 2] bf16): packed in memory
// (PackedBlocks), or widened from quantized codes into the calling thread's buffer when its task
// reaches the block (Int4Blocks, Int8Blocks: vnni_linear_int4 / _int8). A widened block is the
// packed one's bits, so a row's result is the same either way; only the widened matrix is never
// written to memory and read back (SmolLM2-135M's four layer matrices at one wide row 0.43 ->
// 0.38 ms with the same widening, 2.6 -> 2.2 ms at 512 rows; issue 11, forty-second pass).
struct PackedBlocks {
  static constexpr bool kWidens = false;
  static constexpr bool kCodes = false;
  const B16* wp;
  int64_t block_elems;
  const B16* block(int64_t b, B16* /*buffer*/) const { return wp + b * block_elems; }
};

// Rows [0, 64 rows) of block b as vnni_pack lays them out, from a source's 32-bit words (a
// column's pair of bf16 weights: Word(r, p), and Words8(r, p0) the pairs p0..p0+7 of row r
// as 8 words in a vector with AVX2): per group of 8 columns, a transpose of 8 x 8 words from
// [8, K / 2] to [K / 2, 8].
template <typename Word, typename Words8>
void pack_words_block(uint32_t* db, int64_t b, int64_t n, int64_t pairs, Word word,
                      [[maybe_unused]] Words8 words8) {
  for (int64_t c0 = 0; c0 < kBlockN; c0 += 8) {
    const int64_t r0 = b * kBlockN + c0;
    [[maybe_unused]] const bool full_rows = r0 + 8 <= n;
    int64_t p0 = 0;
#if defined(__AVX2__)
    for (; full_rows && p0 + 8 <= pairs; p0 += 8) {
      __m256i r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = words8(r0 + i, p0);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {  // u[i + j]: words j and j + 4 of rows i..i+3
        r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
      }
      for (int j = 0; j < 4; ++j) {  // pair p0 + j: the low halves; p0 + j + 4: the high
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(db + (p0 + j) * kBlockN + c0),
                            _mm256_permute2x128_si256(r[j], r[j + 4], 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(db + (p0 + j + 4) * kBlockN + c0),
                            _mm256_permute2x128_si256(r[j], r[j + 4], 0x31));
      }
    }
#endif
    for (; p0 < pairs; ++p0)
      for (int64_t i = 0; i < 8; ++i) db[p0 * kBlockN + c0 + i] = r0 + i < n ? word(r0 + i, p0) : 0u;
  }
}

// An int8's bf16 bits: its float's high half (exact: 8 significant bits at most).
inline uint32_t int8_bf16_bits(int8_t v) {
  const float f = static_cast<float>(v);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits >> 16;
}

// int8 codes [N, K] as pack_words_block's words: row r's pair p widened (exact in bf16).
struct Int8Words {
  const int8_t* src;
  int64_t k;
  uint32_t operator()(int64_t r, int64_t p) const {
    const int8_t* c = src + r * k + 2 * p;
    return int8_bf16_bits(c[0]) | (int8_bf16_bits(c[1]) << 16);
  }
#if defined(__AVX2__)
  // 16 codes -> 16 floats' high halves in 32-bit lanes -> 16-bit lanes in order (packus
  // interleaves the 128-bit lanes: the permute puts them back): pairs p0..p0+7 as 8 words.
  __m256i words8(int64_t r, int64_t p0) const {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + r * k + 2 * p0));
    const __m256i lo = _mm256_srli_epi32(
        _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))), 16);
    const __m256i hi = _mm256_srli_epi32(
        _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)))),
        16);
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
  }
#endif
#if defined(__AVX512BF16__)
  // Columns [c0, c0 + 16) (whole inside N) of pairs [p0, p0 + 16) of block b: 16 rows of 32
  // codes each widened to bf16 (exact) as 16 words in a vector (two conversions to float32 and
  // one VCVTNE2PS2BF16), then a 16 x 16 transpose of the words (unpacks of 32- and 64-bit
  // elements, then of 128-bit lanes), one vector a pair.
  void pack16(uint32_t* db, int64_t r0, int64_t c0, int64_t p0) const {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; ++i) {
      const int8_t* q = src + (r0 + i) * k + 2 * p0;
      const __m512 lo = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
      const __m512 hi = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
      r[i] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // word j: row i's pair p0 + j
    }
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    // r[4i + m]'s 128-bit lane L: rows 4i..4i+3 of pair 4L + m.
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
      r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
      r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
      r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int m = 0; m < 4; ++m) {  // pair 4L + m: lane L of r[m], r[4 + m], r[8 + m], r[12 + m]
      const __m512i v0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44);
      const __m512i v1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xEE);
      const __m512i v2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
      const __m512i v3 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xEE);
      const __m512i pair[4] = {
          _mm512_shuffle_i32x4(v0, v2, 0x88), _mm512_shuffle_i32x4(v0, v2, 0xDD),
          _mm512_shuffle_i32x4(v1, v3, 0x88), _mm512_shuffle_i32x4(v1, v3, 0xDD)};
      for (int l = 0; l < 4; ++l)
        _mm512_storeu_si512(db + (p0 + 4 * l + m) * kBlockN + c0, pair[l]);
    }
  }
#endif
  void pack_block(uint32_t* db, int64_t b, int64_t n) const {
#if defined(__AVX512BF16__)
    // Whole groups of 16 columns 16 pairs at a time (a wide row's int8 product widens every
    // block of every matrix in a step; small's four layer matrices on the AMX Xeon, against the
    // AVX2 8 x 8 loop below: that product at one row 0.232 -> 0.192 ms, the whole matrices
    // packed 0.337 -> 0.282 ms, bound by the memory there; issue 11, forty-second pass); the
    // rest word by word.
    const int64_t pairs = k / 2, r0 = b * kBlockN;
    int64_t c0 = 0;
    for (; c0 < kBlockN && r0 + c0 + 16 <= n; c0 += 16) {
      int64_t p0 = 0;
      for (; p0 + 16 <= pairs; p0 += 16) pack16(db, r0 + c0, c0, p0);
      for (; p0 < pairs; ++p0)
        for (int64_t i = 0; i < 16; ++i) db[p0 * kBlockN + c0 + i] = (*this)(r0 + c0 + i, p0);
    }
    for (int64_t p = 0; c0 < kBlockN && p < pairs; ++p)
      for (int64_t c = c0; c < kBlockN; ++c) db[p * kBlockN + c] = r0 + c < n ? (*this)(r0 + c, p) : 0u;
#else
#if defined(__AVX2__)
    auto w8 = [this](int64_t r, int64_t p0) { return words8(r, p0); };
#else
    auto w8 = nullptr;
#endif
    pack_words_block(db, b, n, k / 2, *this, w8);
#endif
  }
};

struct Int8Blocks {
  static constexpr bool kWidens = true;
  static constexpr bool kCodes = true;  // amx_int8_rows can read its codes as they lie
  Int8Words words;
  int64_t n;
  const int8_t* codes(int64_t b) const { return words.src + b * kBlockN * words.k; }
  const B16* block(int64_t b, B16* buffer) const {
    words.pack_block(reinterpret_cast<uint32_t*>(buffer), b, n);
    return buffer;
  }
};

struct Int4Blocks {
  static constexpr bool kWidens = true;
  static constexpr bool kCodes = false;
  const uint8_t* qp;
  const uint16_t* sz;
  int64_t k, g, row_block, rows, n;
  const B16* block(int64_t b, B16* buffer) const {
    carpool_kernels::int4_widen_vnni_block(qp, sz, k, g, row_block, rows, n, b,
                                           reinterpret_cast<uint32_t*>(buffer));
    return buffer;
  }
};

// Whether `path` multiplies on AMX (our loop or oneDNN's micro-kernel, both through store_out;
// else the matrix-vector loops, which write bf16 rows themselves).
bool amx_path(int64_t path) {
#if defined(CARPOOL_AVX2)
  return false;
#else
  return path != kPathGemv && has_amx_brgemm();
#endif
}

// xb [rows, K] bf16 times the `blocks` weight blocks of `src` (n columns), plus bias (float32 or
// null), into `out` (a plain bf16 one unless amx_path): vnni_linear's loops (its header).
template <typename Source>
void multiply(const B16* xb, int64_t rows, int64_t k, int64_t blocks, int64_t n, const float* bp,
              int64_t path, const Source& src, const Out& out) {
  if (rows == 0) return;
  TORCH_CHECK(path >= kPathAuto && path <= kPathBrgemm, "vnni_linear: path 0, 1 or 2, got ",
              path);
  TORCH_INTERNAL_ASSERT(out.plain() || amx_path(path),
                        "vnni_linear: the matrix-vector loops write plain bf16 rows only");
#if defined(CARPOOL_AVX2)
  static thread_local std::vector<float> widened;  // grows to the largest input, kept
  if (widened.size() < static_cast<size_t>(rows * k)) widened.resize(rows * k);
  {
    int64_t i = 0;
    for (; i + 8 <= rows * k; i += 8) _mm256_storeu_ps(widened.data() + i, carpool_kernels::load8(xb + i));
    for (; i < rows * k; ++i) widened[i] = carpool_kernels::to_float(xb[i]);
  }
  const XT* xp = widened.data();
#else
  const XT* xp = xb;
#endif
  B16* yp = out.bf16;  // (the matrix-vector loops' rows)
  const int64_t block_elems = (k / 2) * kBlockN * 2;
  // (A widened block is hot in this thread's cache: nothing to stream, nothing to ask ahead.)
  bool huge = false;
  if constexpr (!Source::kWidens)
    huge = on_huge_pages(src.wp, blocks * block_elems * sizeof(B16));
  const bool amx = amx_path(path);
  bool tiles = false;  // our own AMX loop (only where the compiler and the kernel allow AMX)
#if defined(CARPOOL_AMX)
  tiles = amx && path == kPathAuto && k % 32 == 0 && amx_permitted();
#endif
  // One task per column block: each thread reads its own contiguous run of the weight once,
  // whatever the row count (a brgemm task loops over the rows' 32-row slices with its block hot).
  // Past kChunkedMaxRows (a prefill), where the blocks do not split evenly over the threads,
  // the rows go in `slices` slices too, one task per (slice, block), slice-major: SmolLM2's
  // 576-column matrices are 9 blocks, 5 for one thread and 4 for the other, its 192-column
  // ones 3 (2 and 1); a row's sums do not depend on its slice (the same bits).
#if defined(CARPOOL_AMX) && defined(__AVX512BF16__)
  // An int8 weight's few rows multiply its codes as they lie (amx_int8_rows: the same bits).
  bool swap = false;
  if constexpr (Source::kCodes) swap = tiles && rows <= kInt8SwapRows;
  std::vector<uint32_t> xt;
  if (swap) int8_swap_inputs(xp, rows, k, xt);
#endif
  const int64_t threads = at::get_num_threads();
  const int64_t slices =
      !amx && rows > kChunkedMaxRows && blocks % threads != 0 ? std::min(threads, rows / kPassRows) : 1;
  at::parallel_for(0, blocks * slices, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float c[kBlockM * kBlockN];
    // This thread's widened block (grows to the largest, kept; empty for packed weights).
    B16* buffer = nullptr;
    if constexpr (Source::kWidens) buffer = widen_buffer(block_elems);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t % blocks, s = t / blocks;
      const int64_t col = b * kBlockN, ncols = std::min<int64_t>(kBlockN, n - col);
      const float* bb = bp != nullptr ? bp + col : nullptr;
#if defined(CARPOOL_AMX) && defined(__AVX512BF16__)
      if constexpr (Source::kCodes) {
        if (swap) {
          alignas(64) B16 abuf[3 * kBlockN * 32];
          alignas(64) float tbuf[kBlockN * 16];
          // The block after the next one in this thread's run, into L2 as this one goes.
          const char* ahead = slices == 1 && t + 2 < t1 && (b + 3) * kBlockN <= n
                                  ? reinterpret_cast<const char*>(src.codes(b + 2))
                                  : nullptr;
          amx_int8_rows(xt.data(), rows, k, src.codes(b), ncols, c, abuf, tbuf, ahead);
          store_out(c, kBlockN, rows, bb, out, 0, col, ncols);
          continue;
        }
      }
#endif
      const B16* wb = src.block(b, buffer);
      if (!amx) {
        // The next task's block, asked for ahead (none past this thread's run).
        const char* nxt = nullptr;
        if constexpr (!Source::kWidens)
          if (t + 1 < t1) nxt = reinterpret_cast<const char*>(src.block((t + 1) % blocks, nullptr));
        if (rows > kChunkedMinRows && rows <= kChunkedMaxRows) {
          gemv_rows_chunked(xp, rows, k, wb, bb, yp + col, n, ncols);
        } else {
          // Slice s: rows [m0, m1), cut at multiples of kPassRows.
          const int64_t m0 = rows * s / slices / kPassRows * kPassRows;
          const int64_t m1 = s + 1 == slices ? rows : rows * (s + 1) / slices / kPassRows * kPassRows;
          gemv_rows(xp + m0 * k, m1 - m0, k, wb, bb, yp + m0 * n + col, n, ncols, nxt, t == t0,
                    huge);
        }
        continue;
      }
#if defined(CARPOOL_AMX)
      if (tiles) {
        for (int64_t m0 = 0; m0 < rows; m0 += kBlockM) {  // the block stays in L2 meanwhile
          const int64_t mr = std::min<int64_t>(kBlockM, rows - m0);
          amx_tile_rows(xp + m0 * k, mr, k, wb, c);
          store_out(c, kBlockN, mr, bb, out, m0, col, ncols);
        }
        continue;
      }
#endif
#if !defined(CARPOOL_AVX2)  // (an AVX2 build never has AMX: amx is false there)
      if (!Source::kWidens && t + 1 < t1) {  // the next block into L2 while AMX works on this one (~1.5x at 1 row)
        const char* nxt = reinterpret_cast<const char*>(wb + block_elems);
        for (int64_t o = 0; o < block_elems * 2; o += 64) __builtin_prefetch(nxt + o, 0, 2);
      }
      for (int64_t m0 = 0; m0 < rows; m0 += kBlockM) {  // measured 0.7-1.0x our loop
        const int64_t mr = std::min<int64_t>(kBlockM, rows - m0);
        at::native::cpublas::brgemm(mr, kBlockN, k, k, kBlockN, kBlockN, false, xp + m0 * k, wb,
                                    c, true);
        store_out(c, kBlockN, mr, bb, out, m0, col, ncols);
      }
#endif
    }
    // Releases the tiles and resets torch's record of the loaded brgemm configuration (ours
    // replaced it), so its next brgemm loads its own again.
    if (amx) at::native::cpublas::brgemm_release(true);
  });
}


// The blocks of a packed weight (vnni_linear.pack of an [n, k] one), checked (`name` heads the
// messages).
int64_t packed_blocks(const char* name, const at::Tensor& weight, int64_t k, int64_t n) {
  TORCH_CHECK(weight.dim() == 4 && weight.is_contiguous() &&
                  weight.scalar_type() == at::kBFloat16 && weight.size(1) * 2 == k &&
                  weight.size(2) == kBlockN && weight.size(3) == 2,
              name, ": weight must be a contiguous [blocks, ", k / 2, ", ", kBlockN,
              ", 2] bfloat16 tensor (vnni_linear.pack of a [N, ", k, "] weight), got ",
              weight.sizes(), " ", weight.scalar_type());
  const int64_t blocks = weight.size(0);
  TORCH_CHECK(n > (blocks - 1) * kBlockN && n <= blocks * kBlockN, name, ": n = ", n,
              " does not fit ", blocks, " blocks of ", kBlockN, " columns");
  return blocks;
}

at::Tensor vnni_linear(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t n, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "vnni_linear: x must be a contiguous [M, K] bfloat16 tensor, got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t k = x.size(1), blocks = packed_blocks("vnni_linear", weight, k, n);
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat,
                "vnni_linear: bias must be a contiguous [", n, "] float32 tensor, got ",
                bias->sizes(), " ", bias->scalar_type());
    bp = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  Out out;
  out.bf16 = y.data_ptr<B16>(), out.ld = n;
  multiply(x.data_ptr<B16>(), x.size(0), k, blocks, n, bp, path,
           PackedBlocks{weight.data_ptr<B16>(), (k / 2) * kBlockN * 2}, out);
  return y;
}

// [N, K] bf16 -> [ceil(N / 64), K / 2, 64, 2] (vnni_linear.pack's layout; zero past N) in one
// pass: per block, a transpose of 32-bit words (a column's pair of weights) from [64, K / 2] to
// [K / 2, 64], 8 x 8 words at a time with AVX2. A quantized linear's prefill widens its codes
// to bf16 and packs them here in every step on AVX2 CPUs (torch's permute-and-copy took
// 4-6 ms for small's seven layer matrices on a Zen 2, as long as a sixth of their product at
// 512 rows; issue 11, twenty-seventh pass).
//
// Source: ``Word(r, p)``, row r's pair p as a 32-bit word (the even input's bf16 in the low
// half), and ``Words8(r, p0)``, pairs p0..p0+7 of row r as 8 such words in a vector (AVX2).
template <typename Word, typename Words8>
void pack_words(uint32_t* dst, int64_t n, int64_t pairs, Word word, Words8 words8) {
  const int64_t blocks = (n + kBlockN - 1) / kBlockN;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) pack_words_block(dst + b * pairs * kBlockN, b, n, pairs, word, words8);
  });
}

at::Tensor vnni_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 &&
                  weight.size(1) % 2 == 0 && weight.device().is_cpu(),
              "vnni_pack: weight must be a [N, even K] bfloat16 CPU tensor, got ", weight.sizes(),
              " ", weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), pairs = w.size(1) / 2, blocks = (n + kBlockN - 1) / kBlockN;
  at::Tensor out = at::empty({blocks, pairs, kBlockN, 2}, w.options());
  if (blocks == 0 || pairs == 0) return out;
  // A column's pair of bf16 weights as one 32-bit word: row r, pair p at src[r * pairs + p];
  // block b, pair p, column c at dst[(b * pairs + p) * kBlockN + c].
  const auto* src = reinterpret_cast<const uint32_t*>(w.data_ptr());
  auto word = [&](int64_t r, int64_t p) { return src[r * pairs + p]; };
#if defined(__AVX2__)
  auto words8 = [&](int64_t r, int64_t p0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * pairs + p0));
  };
#else
  auto words8 = nullptr;
#endif
  pack_words(reinterpret_cast<uint32_t*>(out.data_ptr()), n, pairs, word, words8);
  return out;
}

// ``vnni_pack(codes.to(bfloat16))`` for int8 codes [N, K] (exact in bf16: every int8 is), in
// one pass: an int8 weight's wide rows (quant.Int8Linear._wide_product) pack it in every step
// that holds a prompt's rows. SmolLM2-135M's four layer matrices: 0.69 ms through the
// conversion and vnni_pack on the AMX Xeon of issue 11's forty-first pass.
at::Tensor vnni_pack_int8(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.size(1) % 2 == 0 &&
                  codes.device().is_cpu(),
              "vnni_pack_int8: codes must be a [N, even K] int8 CPU tensor, got ", codes.sizes(),
              " ", codes.scalar_type());
  const at::Tensor q = codes.contiguous();
  const int64_t n = q.size(0), k = q.size(1), pairs = k / 2, blocks = (n + kBlockN - 1) / kBlockN;
  at::Tensor out = at::empty({blocks, pairs, kBlockN, 2}, q.options().dtype(at::kBFloat16));
  if (blocks == 0 || pairs == 0) return out;
  const Int8Words words{q.data_ptr<int8_t>(), k};
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr());
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) words.pack_block(dst + b * pairs * kBlockN, b, n);
  });
  return out;
}

// The input both fused ops take: a contiguous bf16 or float32 [M, K] x (`name` heads the
// message).
void check_x(const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
                  x.size(1) % 2 == 0 && x.device().is_cpu(),
              name, ": x must be a contiguous [M, even K] bfloat16 or float32 CPU tensor, got ",
              x.sizes(), " ", x.scalar_type());
}

// A fused product of x (bf16, or float32 rounded to bf16 first as torch's cast rounds) by
// `src`'s blocks, into `out` (a contiguous [M, n] tensor of x's dtype: the rows of a layer's
// output it belongs in) or a new one: the bf16-rounded sums (times `scales` with a bf16
// multiply's rounding where given) in x's dtype. On AMX store_out writes them so; the
// matrix-vector loops' bf16 rows are scaled and cast after them, the same values.
template <typename Source>
at::Tensor fused_product(const char* name, const at::Tensor& x, int64_t blocks, int64_t n,
                         int64_t path, const Source& src, const std::optional<at::Tensor>& scales,
                         const std::optional<at::Tensor>& out) {
  const int64_t rows = x.size(0), k = x.size(1);
  if (scales.has_value())
    TORCH_CHECK(scales->dim() == 1 && scales->size(0) == n && scales->is_contiguous() &&
                    scales->scalar_type() == at::kBFloat16,
                name, ": scales must be a contiguous [", n, "] bfloat16 tensor, got ",
                scales->sizes(), " ", scales->scalar_type());
  if (out.has_value())
    TORCH_CHECK(out->dim() == 2 && out->size(0) == rows && out->size(1) == n &&
                    out->is_contiguous() && out->scalar_type() == x.scalar_type(),
                name, ": out must be a contiguous [", rows, ", ", n, "] ", x.scalar_type(),
                " tensor, got ", out->sizes(), " ", out->scalar_type());
  at::Tensor y = out.has_value() ? *out : at::empty({rows, n}, x.options());
  if (rows == 0) return y;
  const B16* xb = x.scalar_type() == at::kFloat ? rounded_bf16(x.data_ptr<float>(), rows * k)
                                                : x.data_ptr<B16>();
  const bool f32 = y.scalar_type() == at::kFloat;
  if (amx_path(path) || (!f32 && !scales.has_value())) {
    Out o;
    if (f32) o.f32 = y.data_ptr<float>();
    else o.bf16 = y.data_ptr<B16>();
    o.ld = n;
    o.scales = scales.has_value() ? scales->data_ptr<B16>() : nullptr;
    multiply(xb, rows, k, blocks, n, nullptr, path, src, o);
    return y;
  }
  at::Tensor t = at::empty({rows, n}, x.options().dtype(at::kBFloat16));
  Out o;
  o.bf16 = t.data_ptr<B16>(), o.ld = n;
  multiply(xb, rows, k, blocks, n, nullptr, path, src, o);
  if (scales.has_value()) t.mul_(*scales);
  y.copy_(t);
  return y;
}

// vnni_linear(x, vnni_pack_int8(codes), None, N) (times `scales` where given, quant.Int8Linear's
// row scales: on AMX the float32 sums times them, rounded once; the matrix-vector loops' bf16
// rows times them as a bf16 multiply) in x's dtype: x times int8 codes [N, K] widened to bf16
// (exact), each block widened into this thread's buffer as its task reaches it (Int8Blocks):
// the same bits, without the widened matrix in memory (fused_product: x, out).
at::Tensor int8_product(const at::Tensor& x, const at::Tensor& codes,
                        const std::optional<at::Tensor>& scales,
                        const std::optional<at::Tensor>& out, int64_t path) {
  check_x("vnni_linear_int8", x);
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kChar &&
                  codes.size(1) == x.size(1),
              "vnni_linear_int8: codes must be a contiguous [N, ", x.size(1),
              "] int8 tensor, got ", codes.sizes(), " ", codes.scalar_type());
  const int64_t n = codes.size(0), blocks = (n + kBlockN - 1) / kBlockN;
  TORCH_CHECK(n > 0, "vnni_linear_int8: no output columns");
  return fused_product("vnni_linear_int8", x, blocks, n, path,
                       Int8Blocks{Int8Words{codes.data_ptr<int8_t>(), codes.size(1)}, n}, scales,
                       out);
}

// vnni_linear(x, fused_ops.int4_widen_vnni(packed, g, scales_zeros, block, n), None, n): x times
// an int4 weight (torch's CPU int4 layout in `block`-row blocks, bf16 [K / g, N', 2] (scale,
// zero) pairs) widened a block at a time into this thread's buffer (Int4Blocks): the same bits,
// in x's dtype (fused_product: x, out).
at::Tensor int4_product(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                        const at::Tensor& scales_zeros, int64_t block, int64_t n,
                        const std::optional<at::Tensor>& out, int64_t path) {
  check_x("vnni_linear_int4", x);
  const int64_t g = group_size;
  TORCH_CHECK(g > 0 && g % 2 == 0, "vnni_linear_int4: the group size must be positive and even, got ", g);
  TORCH_CHECK(block == 32 || block == 64, "vnni_linear_int4: block must be 32 or 64, got ", block);
  TORCH_CHECK(scales_zeros.dim() == 3 && scales_zeros.is_contiguous() &&
                  scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.size(2) == 2 &&
                  scales_zeros.size(1) % block == 0 && scales_zeros.size(0) * g == x.size(1),
              "vnni_linear_int4: scales_zeros must be a contiguous [", x.size(1) / g,
              ", N, 2] bfloat16 tensor with N a multiple of ", block, ", got ",
              scales_zeros.sizes(), " ", scales_zeros.scalar_type());
  const int64_t k = x.size(1), rows = scales_zeros.size(1);
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte &&
                  packed.numel() == rows * k / 2,
              "vnni_linear_int4: packed must be torch's CPU int4 layout for N = ", rows, ", K = ",
              k, ", got ", packed.sizes(), " ", packed.scalar_type());
  TORCH_CHECK(n > 0 && n <= rows, "vnni_linear_int4: n = ", n, " columns of ", rows);
  const int64_t blocks = (n + kBlockN - 1) / kBlockN;
  return fused_product("vnni_linear_int4", x, blocks, n, path,
                       Int4Blocks{packed.data_ptr<uint8_t>(),
                                  reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr()), k,
                                  g, block, rows, n},
                       std::nullopt, out);
}

// vnni_linear of a packed (widened) weight as the fused products take it (fused_product: x
// bf16 or float32, `scales`, `out`): a chunked MLP's wide rows multiply the matrix widened once
// for all its chunks (quant.QuantizedLinear._vnni_product under layers.widen_once).
at::Tensor packed_product(const at::Tensor& x, const at::Tensor& weight, int64_t n,
                          const std::optional<at::Tensor>& scales,
                          const std::optional<at::Tensor>& out, int64_t path) {
  check_x("vnni_linear_packed", x);
  const int64_t k = x.size(1), blocks = packed_blocks("vnni_linear_packed", weight, k, n);
  return fused_product("vnni_linear_packed", x, blocks, n, path,
                       PackedBlocks{weight.data_ptr<B16>(), (k / 2) * kBlockN * 2}, scales, out);
}

// The operators: a new tensor, or (_out) into the rows of a layer's output.
at::Tensor vnni_linear_int8(const at::Tensor& x, const at::Tensor& codes,
                            const std::optional<at::Tensor>& scales, int64_t path) {
  return int8_product(x, codes, scales, std::nullopt, path);
}

void vnni_linear_int8_out(const at::Tensor& x, const at::Tensor& codes,
                          const std::optional<at::Tensor>& scales, const at::Tensor& out,
                          int64_t path) {
  int8_product(x, codes, scales, out, path);
}

at::Tensor vnni_linear_packed(const at::Tensor& x, const at::Tensor& weight, int64_t n,
                              const std::optional<at::Tensor>& scales, int64_t path) {
  return packed_product(x, weight, n, scales, std::nullopt, path);
}

void vnni_linear_packed_out(const at::Tensor& x, const at::Tensor& weight, int64_t n,
                            const std::optional<at::Tensor>& scales, const at::Tensor& out,
                            int64_t path) {
  packed_product(x, weight, n, scales, out, path);
}

at::Tensor vnni_linear_int4(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                            const at::Tensor& scales_zeros, int64_t block, int64_t n,
                            int64_t path) {
  return int4_product(x, packed, group_size, scales_zeros, block, n, std::nullopt, path);
}

void vnni_linear_int4_out(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                          const at::Tensor& scales_zeros, int64_t block, int64_t n,
                          const at::Tensor& out, int64_t path) {
  int4_product(x, packed, group_size, scales_zeros, block, n, out, path);
}

// Whether this build has a fast path: AVX-512 BF16 (the matrix-vector kernel, and the bf16
// stores of the AMX paths; -march=native, so the CPU has it too).
bool vnni_linear_fast() {
#if defined(__AVX512BF16__) || defined(CARPOOL_AVX2)
  return true;
#else
  return false;
#endif
}

// Whether the automatic path runs on AMX here (else the matrix-vector kernel).
bool vnni_linear_amx() {
#if defined(__AVX512BF16__)
  return has_amx_brgemm();
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(carpool, m) {
  m.def("vnni_linear(Tensor x, Tensor weight, Tensor? bias, int n, int path=0) -> Tensor");
  m.def("vnni_pack(Tensor weight) -> Tensor");
  m.def("vnni_pack_int8(Tensor codes) -> Tensor");
  m.def("vnni_linear_int8(Tensor x, Tensor codes, Tensor? scales=None, int path=0) -> Tensor");
  m.def(
      "vnni_linear_int8_out(Tensor x, Tensor codes, Tensor? scales, Tensor(a!) out, int path=0) "
      "-> ()");
  m.def(
      "vnni_linear_int4(Tensor x, Tensor packed, int group_size, Tensor scales_zeros, int block, "
      "int n, int path=0) -> Tensor");
  m.def(
      "vnni_linear_packed(Tensor x, Tensor weight, int n, Tensor? scales=None, int path=0) -> "
      "Tensor");
  m.def(
      "vnni_linear_packed_out(Tensor x, Tensor weight, int n, Tensor? scales, Tensor(a!) out, "
      "int path=0) -> ()");
  m.def(
      "vnni_linear_int4_out(Tensor x, Tensor packed, int group_size, Tensor scales_zeros, "
      "int block, int n, Tensor(a!) out, int path=0) -> ()");
  m.def("vnni_linear_fast() -> bool");
  m.def("vnni_linear_amx() -> bool");
  m.def("vnni_linear_huge_pages(int start, int nbytes, bool on) -> ()");
  m.def("vnni_linear_on_huge_pages(int start, int nbytes) -> bool");
}

TORCH_LIBRARY_IMPL(carpool, CPU, m) {
  m.impl("vnni_linear", &vnni_linear);
  m.impl("vnni_pack", &vnni_pack);
  m.impl("vnni_pack_int8", &vnni_pack_int8);
  m.impl("vnni_linear_int8", &vnni_linear_int8);
  m.impl("vnni_linear_int4", &vnni_linear_int4);
  m.impl("vnni_linear_int8_out", &vnni_linear_int8_out);
  m.impl("vnni_linear_packed", &vnni_linear_packed);
  m.impl("vnni_linear_packed_out", &vnni_linear_packed_out);
  m.impl("vnni_linear_int4_out", &vnni_linear_int4_out);
}

TORCH_LIBRARY_IMPL(carpool, CompositeExplicitAutograd, m) {
  m.impl("vnni_linear_fast", &vnni_linear_fast);
  m.impl("vnni_linear_amx", &vnni_linear_amx);
  m.impl("vnni_linear_huge_pages", &vnni_linear_huge_pages);
  m.impl("vnni_linear_on_huge_pages", &vnni_linear_on_huge_pages);
}
