// int4 codes widened to bf16 in vnni_linear's layout, one 64-column block at a time: the bits of
// fused_ops' int4_widen (quant.Int4Linear._dense's two bf16 roundings), packed as
// vnni_linear.pack packs them. fused_ops' int4_widen_vnni widens a whole matrix with it (a
// quantized prefill's weight on AVX2 CPUs, and a step's many wide rows' weight),
// vnni_linear's vnni_linear_int4 one block at a time into a buffer it multiplies straight from
// (a step's few wide rows: the widened matrix never goes to memory).
//
// Header-only, included by both translation units; the kernel build hashes it with each source.

#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vec_math.h"

namespace carpool_kernels {

// c10::BFloat16(float)'s round to nearest even for finite values: the bf16 bits.
inline uint16_t bf16_bits_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// One int4 weight as int4_widen computes it: (q - 8) * scale rounded to bf16, plus zero, rounded
// again (quant.Int4Linear._dense's two bf16 ops); its bf16 bits.
inline uint16_t int4_weight_bits(int q, float scale, float zero) {
  const uint32_t r1 = static_cast<uint32_t>(bf16_bits_of((static_cast<float>(q) - 8.0f) * scale))
                      << 16;
  float f;
  std::memcpy(&f, &r1, sizeof(f));
  return bf16_bits_of(f + zero);
}

// int4 codes widened straight into vnni_linear's layout ([ceil(N / 64), K / 2, 64, 2] bf16,
// zero past N): the bits of int4_widen, packed as vnni_linear.pack packs them. On AVX2 CPUs a
// quantized prefill multiplies its widened weights in that layout (quant.QuantizedLinear.
// _widened_product); there int4_widen runs its scalar loop (the AVX-512 one gathers), and with
// the pack after it took 87 ms of SmolLM2-135M's 1.19 s 512-token prefill on a Zen 2 (issue 11,
// twenty-seventh pass). Here 8 columns of a pair at a time: the 8 codes of each of its two inputs
// widened in a vector, scaled, rounded to bf16, offset, rounded again (int4_widen's two
// roundings), and the even and odd input's bf16 halves joined into the pair's 32-bit words.
// SmolLM2's seven layer matrices: 2.6-2.8 ms through int4_widen and the pack, 0.81 here.

// Where 8 columns' codes lie in torch's int4 layout (block rows B): row r in block r / B, byte
// r % (B / 2) of each input's B / 2 bytes, the high nibble when r % B >= B / 2. For columns
// [c0, c0 + 8) (c0 % 8 == 0): input i's 8 bytes at first + i * B / 2.
struct Int4Columns8 {
  const uint8_t* first = nullptr;
  bool high = false;
  Int4Columns8() = default;
  Int4Columns8(const uint8_t* packed, int64_t k, int64_t B, int64_t c0)
      : first(packed + (c0 / B) * k * (B / 2) + (c0 % B) % (B / 2)), high(c0 % B >= B / 2) {}
};

#if defined(CARPOOL_AVX2) || defined(__AVX512F__)
// The 8 codes of input i (its bytes at p) as int32 lanes.
inline __m256i int4_codes8(const uint8_t* p, bool high) {
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(high ? _mm256_srli_epi32(bytes, 4) : bytes, _mm256_set1_epi32(0xF));
}

// bf16_bits_of in 8 lanes, left in the lanes' high halves (low halves garbage).
inline __m256i narrow8_high(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
}

// (q - 8) * scale rounded to bf16, + zero, rounded again: the bf16 bits in the lanes' high halves.
inline __m256i widen8(__m256i q, __m256 scale, __m256 zero) {
  const __m256 prod = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(8.0f)), scale);
  const __m256 r1 = _mm256_castsi256_ps(
      _mm256_and_si256(narrow8_high(prod), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  return narrow8_high(_mm256_add_ps(r1, zero));
}

#if defined(__AVX512BF16__)
// int4_codes8 over 16 lanes (two column groups).
inline __m512i int4_codes16(const uint8_t* p, bool high) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_and_si512(high ? _mm512_srli_epi32(bytes, 4) : bytes, _mm512_set1_epi32(0xF));
}
#endif
#endif

// Block vb (output columns [64 vb, 64 vb + 64)) of an int4 weight widened into `db` ([K / 2, 64]
// 32-bit words: pair p, column c at db[p * 64 + c]; zero past column n). `qp`: torch's CPU int4
// layout in `block`-row blocks ([rows / block, K, block / 2] bytes); `sz`: the bits of the bf16
// [K / g, rows, 2] (scale, zero) pairs. Finite scales and zeros assumed (a GGUF's are).
inline void int4_widen_vnni_block(const uint8_t* qp, const uint16_t* sz, int64_t k, int64_t g,
                                  int64_t block, int64_t rows, int64_t n, int64_t vb,
                                  uint32_t* db) {
  const int64_t pairs = k / 2;
  auto bf16 = [](uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  };
  // Row r's pair p, one weight at a time: its two bf16 values as one 32-bit word.
  auto word = [&](int64_t r, int64_t p) {
    const int64_t b = r / block, j = r % block, half = block / 2;
    uint32_t w = 0;
    for (int e = 0; e < 2; ++e) {
      const int64_t kk = 2 * p + e;
      const uint8_t byte = qp[(b * k + kk) * half + j % half];
      const int q = j >= half ? byte >> 4 : byte & 0xF;
      const int64_t s = ((kk / g) * rows + r) * 2;
      w |= static_cast<uint32_t>(int4_weight_bits(q, bf16(sz[s]), bf16(sz[s + 1]))) << (16 * e);
    }
    return w;
  };
  // Column groups of 8 whole inside N take the vector loop; the rest word by word.
  const int64_t full = std::clamp<int64_t>((n - 64 * vb) / 8, 0, 8);
  for (int64_t cg = full; cg < 8; ++cg)
    for (int64_t p = 0; p < pairs; ++p)
      for (int64_t c = 0; c < 8; ++c) {
        const int64_t r = 64 * vb + 8 * cg + c;
        db[p * 64 + 8 * cg + c] = r < n ? word(r, p) : 0u;
      }
#if defined(CARPOOL_AVX2) || defined(__AVX512F__)
  // Pair by pair, the block's column groups one after another: each pair's 256 bytes
  // written whole (a group at a time down the pairs wrote 32 bytes of every line: SmolLM2's
  // seven layer matrices 1.35 ms that way, 1.24 this way).
  // The column groups' byte positions once per block (computed per pair, their divisions
  // by the block rows took 1.17-1.24 ms against 0.81 for SmolLM2's seven matrices).
  Int4Columns8 cols[8];
  for (int64_t cg = 0; cg < full; ++cg) cols[cg] = Int4Columns8(qp, k, block, 64 * vb + 8 * cg);
  const int64_t half = block / 2;
#if defined(__AVX512BF16__)
  // With AVX-512 BF16, two column groups (16 columns, one 64-byte store) at a time where both
  // are whole: their codes are 16 consecutive bytes of one half of a row block (block 64:
  // groups 2i and 2i + 1 never straddle its halves). SmolLM2-135M's four layer matrices 0.49 ->
  // 0.37 ms on the AMX Xeon with the 8-lane steps at 16 lanes (issue 11, forty-first pass);
  // AVX-512 CPUs without BF16 take the 8-lane loop below (they widen only in tests: no wide
  // rows there, and their prefill does not widen into this layout).
  const int64_t groups16 = block == 64 ? full / 2 * 2 : 0;
  if (groups16 > 0) {
    // Fewer instructions a weight where the CPU has AVX-512 BF16 (the loop was bound by them:
    // ~17 a lane): (q - 8) * scale as one FMA with -8 * scale (exact: a 4-bit integer times
    // a bf16 scale has 12 significant bits, so q * scale, -8 * scale and their sum are exact
    // floats), and both roundings by VCVTNE2PS2BF16, two vectors in one. The first rounding's
    // bf16 halves come back as float32 by interleaving them with zeros (a 128-bit lane at a
    // time, so the lanes' columns are permuted: the zeros are loaded in the same order, and one
    // permute of 16-bit words puts the pair's even and odd weights in place at the end). The
    // same round to nearest even as the integer steps, but a value below 2^-126 becomes zero
    // (no real scale is that small). SmolLM2-135M's four layer matrices 0.34 -> 0.27 ms on
    // the AMX Xeon (issue 11, forty-second pass).
    alignas(64) static constexpr int32_t kLoCols[16] = {0, 1, 2, 3, 8, 9, 10, 11,
                                                        0, 1, 2, 3, 8, 9, 10, 11};
    alignas(64) static constexpr int32_t kHiCols[16] = {4, 5, 6, 7, 12, 13, 14, 15,
                                                        4, 5, 6, 7, 12, 13, 14, 15};
    // Where column c's even / odd weight lies among the 32 rounded words (low 16: the lo lanes,
    // high 16: the hi lanes, each four columns a 128-bit lane, even inputs' then odd inputs').
    alignas(64) static constexpr int16_t kPairs[32] = {
        0, 8, 1, 9, 2, 10, 3, 11, 16, 24, 17, 25, 18, 26, 19, 27,
        4, 12, 5, 13, 6, 14, 7, 15, 20, 28, 21, 29, 22, 30, 23, 31};
    const __m512i lo_cols = _mm512_load_si512(kLoCols), hi_cols = _mm512_load_si512(kHiCols);
    const __m512i pairs_idx = _mm512_load_si512(kPairs);
    for (int64_t gi = 0; gi < k / g; ++gi)
      for (int64_t cg = 0; cg < groups16; cg += 2) {
        const int64_t c0 = 64 * vb + 8 * cg;
        const __m512i w =
            _mm512_loadu_si512(reinterpret_cast<const void*>(sz + (gi * rows + c0) * 2));
        const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        const __m512 minus8 = _mm512_mul_ps(scale, _mm512_set1_ps(-8.0f));
        const __m512i zero = _mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
        const __m512 zero_lo = _mm512_castsi512_ps(_mm512_permutexvar_epi32(lo_cols, zero));
        const __m512 zero_hi = _mm512_castsi512_ps(_mm512_permutexvar_epi32(hi_cols, zero));
        for (int64_t p = gi * g / 2; p < (gi + 1) * g / 2; ++p) {
          const uint8_t* bytes = cols[cg].first + 2 * p * half;
          const __m512 even = _mm512_fmadd_ps(
              _mm512_cvtepi32_ps(int4_codes16(bytes, cols[cg].high)), scale, minus8);
          const __m512 odd = _mm512_fmadd_ps(
              _mm512_cvtepi32_ps(int4_codes16(bytes + half, cols[cg].high)), scale, minus8);
          const __m512i r1 = (__m512i)_mm512_cvtne2ps_pbh(odd, even);  // even: words 0-15
          const __m512 lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), r1));
          const __m512 hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), r1));
          const __m512i r2 = (__m512i)_mm512_cvtne2ps_pbh(_mm512_add_ps(hi, zero_hi),
                                                          _mm512_add_ps(lo, zero_lo));
          _mm512_storeu_si512(reinterpret_cast<void*>(db + p * 64 + 8 * cg),
                              _mm512_permutexvar_epi16(pairs_idx, r2));
        }
      }
  }
#else
  const int64_t groups16 = 0;
#endif
  for (int64_t gi = 0; gi < k / g; ++gi)
    for (int64_t p = gi * g / 2; p < (gi + 1) * g / 2; ++p)
      for (int64_t cg = groups16; cg < full; ++cg) {
        const int64_t c0 = 64 * vb + 8 * cg;
        const uint8_t* bytes = cols[cg].first + 2 * p * half;
        // The 8 columns' (scale, zero) pairs of group gi: one 32-bit word each.
        const __m256i w =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + (gi * rows + c0) * 2));
        const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        const __m256 zero = _mm256_castsi256_ps(
            _mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
        const __m256i even = widen8(int4_codes8(bytes, cols[cg].high), scale, zero);
        const __m256i odd = widen8(int4_codes8(bytes + half, cols[cg].high), scale, zero);
        const __m256i words = _mm256_or_si256(
            _mm256_srli_epi32(even, 16),
            _mm256_and_si256(odd, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(db + p * 64 + 8 * cg), words);
      }
#else
  for (int64_t cg = 0; cg < full; ++cg)
    for (int64_t p = 0; p < pairs; ++p)
      for (int64_t c = 0; c < 8; ++c) db[p * 64 + 8 * cg + c] = word(64 * vb + 8 * cg + c, p);
#endif
}

}  // namespace carpool_kernels
