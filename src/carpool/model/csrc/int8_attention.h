// Decode attention over the int8 KV cache in integer dot products (AVX-512 VNNI: AMD Zen 4,
// Intel Ice Lake and later), included by paged_attention.cpp.
//
// Why: widening the cache's int8 values to bfloat16 or float32 for the multiply-adds costs ~5
// vector instructions per 32 values, more than the products themselves, so the int8 cache ran
// at a quarter of the memory's speed (1.26 ms a layer of GQA 16/4 at 8 x 2k against 0.31 ms to
// read its bytes; BENCHMARKS.md, issue 11, twelfth pass). VPDPBUSD multiplies 64 unsigned by 64
// signed bytes and sums each 4 products into 16 int32 lanes; VPDPWSSD does the same for 32
// pairs of int16. With them the cache's bytes are used as they are:
//
// - Scores: each query head's 64-value chunks rounded to int8 (scale amax / 127 per chunk, as
//   llama.cpp rounds a query to q8_0 for its q8_0 cache). The cache keeps K word-major
//   (kv_quant.py's block layout: word j of 16 tokens in one 64-byte line), so one load and one
//   VPDPBUSD with query word j broadcast add 4 products to all 16 tokens' scores: no horizontal
//   sums and no transposes (rows cost 64 shuffles per 16 tokens: 1.10-1.18x; issue 11,
//   thirteenth pass). VPDPBUSD's first operand is unsigned, so keys enter as k + 128 (one XOR)
//   and the 128 * sum(q) this adds, a constant per query chunk, starts the sums negative. Exact
//   integer sums; then times the chunk's query scale and each token's key scale.
// - Values: the softmax weights p_t = exp(s_t - m) times each token's V row scale, as int16
//   (fixed point: 32767 stands for the tile's largest V scale; p <= 1 and l >= 1, so a
//   weight's rounding error is below 2^-16 of the running sum); two tokens' value rows
//   sign-extended to int16 and interleaved into pairs, one VPDPWSSD per 16 dimensions and
//   token pair; the int32 sums of a tile scaled into the float32 accumulators once.
//
// Accumulators are kept in the order the interleaving leaves them ("vnni order", see
// vnni_dim); the kernel writes the output through that map once per sequence.

#pragma once

#include <limits>

#include "vec_math.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define CARPOOL_VNNI_ATTENTION 1
#define CARPOOL_INT8_ATTENTION 1  // these loops or the AVX2 ones below

namespace carpool_kernels {

using QWord = int32_t;  // a query word (4 int8 values), broadcast where it is used

// The sum of a head's 16 lanes of softmax sums.
inline float lane_sum16(const float* lv) { return _mm512_reduce_add_ps(_mm512_loadu_ps(lv)); }

// Query rows for VPDPBUSD: for each 64-value chunk c of q * scale, s_c = amax / 127 and
// q8 = round(q * scale / s_c) (round half to even, as the cache's own store), each 4 of them
// one 32-bit word of qb[0..d/4), broadcast where it is used (VPDPBUSD's 32-bit broadcast
// operand), scales qs[0..d/64) and qo[c] = 128 * sum(q8) over the chunk: the keys enter
// VPDPBUSD as unsigned bytes k + 128, which adds 128 * sum(q8) to every score. An all-zero
// chunk gets s_c = 0. Why words, not the words already broadcast to 64-byte vectors: those
// made every VPDPBUSD read 64 bytes of L1 (4 KiB a tile of 4 heads, 16 KiB of query vectors a
// sequence of 16 heads beside the cache's lines); words: 1.03-1.18x at GQA 16/4 x 512 to 8k
// (BENCHMARKS.md, issue 11, fiftieth pass).
template <typename T>
inline void quantize_query(const T* q, int64_t d, float scale, QWord* qb, float* qs,
                           int32_t* qo) {
  for (int64_t c = 0; c < d / 64; ++c) {
    __m512 x[4];
    __m512 mx = _mm512_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      x[i] = _mm512_mul_ps(load16(q + 64 * c + 16 * i), _mm512_set1_ps(scale));
      mx = _mm512_max_ps(mx, _mm512_abs_ps(x[i]));
    }
    const float amax = _mm512_reduce_max_ps(mx);
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(x[i], inv));
      v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
      sum = _mm512_add_epi32(sum, v);
      // 16 int8 values: the chunk's words 4i .. 4i + 3.
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16 * c + 4 * i), _mm512_cvtepi32_epi8(v));
    }
    qs[c] = amax / 127.0f;
    qo[c] = 128 * _mm512_reduce_add_epi32(sum);
  }
}

// 32 int8 values as 32 int16.
[[gnu::always_inline]] inline __m512i widen32(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The dimension (within its 64-value chunk) that lane l of accumulator vector v (0-3) holds:
// each half of a row widened to 32 int16 (128-bit lane L: values 8L .. 8L + 7), two rows'
// halves interleaved by unpacklo/hi_epi16 (their values 8L .. 8L + 3 / 8L + 4 .. 8L + 7).
inline int64_t vnni_dim(int64_t v, int64_t l) {
  return (v & 1) * 32 + (v >> 1) * 4 + 8 * (l >> 2) + (l & 3);
}

// One tile (n <= 16 tokens from t0) of one kv head's region of a block (kv_quant.py's layout,
// bs tokens a block) for HG of its query heads: scores, online softmax, value sums. kw: the
// region's K words (word j of token t at kw + (j * bs + t) * 4); ks / vs: the K / V scales
// (float32, one per token); v0: the V rows (d bytes each); all already offset to the tile's
// first token. qb / qs / qo: the heads' quantized queries (quantize_query; d / 4 vectors, d / 64
// scales and offsets a head); m, lv (16 lanes a head), acc (d floats a head, vnni order): the
// running max, sum and weighted values of each head. Lanes past n are masked off (a block's
// slots past the context may hold anything, even a NaN scale). tick(): called between the
// phases (after the scores, between the halves of each chunk's value sums), where vnni_block
// asks for a share of the next block's lines.
template <int HG, typename Tick>
[[gnu::always_inline]] inline void vnni_tile(Tick& tick, const QWord* qb, const float* qs,
                                             const int32_t* qo, int64_t d, const int8_t* kw,
                                             const float* ks, const int8_t* v0, const float* vs,
                                             int64_t bs, int64_t n, float* m, float* lv,
                                             float* acc) {
  const int64_t chunks = d / 64;
  const __mmask16 valid = first_lanes(n);
  const __m512 zero = _mm512_setzero_ps();
  const __m512 ksc = _mm512_maskz_loadu_ps(valid, ks);
  const __m512 vsc = _mm512_maskz_loadu_ps(valid, vs);
  // Scores: integer dot products per 64-value chunk, one line of 16 tokens' words each.
  __m512 s[HG];
  for (int h = 0; h < HG; ++h) s[h] = zero;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // k -> k + 128, unsigned
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i a[HG];
    for (int h = 0; h < HG; ++h) a[h] = _mm512_set1_epi32(-qo[h * chunks + c]);
    for (int64_t j = 0; j < 16; ++j) {
      const __m512i ku =
          _mm512_xor_si512(_mm512_maskz_loadu_epi32(valid, kw + (16 * c + j) * bs * 4), flip);
      for (int h = 0; h < HG; ++h) {
        a[h] = _mm512_dpbusd_epi32(a[h], ku, _mm512_set1_epi32(qb[h * d / 4 + 16 * c + j]));
      }
    }
    for (int h = 0; h < HG; ++h) {
      s[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[h]), _mm512_set1_ps(qs[h * chunks + c]), s[h]);
    }
  }
  tick();
  // Softmax weights as int16: 32767 stands for the tile's largest V row scale.
  const float vmax = _mm512_reduce_max_ps(vsc);  // >= 0 (masked lanes 0)
  const __m512 vmul = _mm512_mul_ps(vsc, _mm512_set1_ps(vmax > 0.0f ? 32767.0f / vmax : 0.0f));
  alignas(32) int32_t w[HG][8];  // per head: the 16 tokens' weights, a pair per word
  for (int h = 0; h < HG; ++h) {
    const __m512 sh = _mm512_mul_ps(s[h], ksc);  // lanes past n: 0, masked below
    float* ah = acc + h * d;
    float* lh = lv + h * 16;
    // The running max grows (a reduction, a rescale) only where a score exceeds it: after the
    // first tiles, rarely.
    if (_mm512_mask_cmp_ps_mask(valid, sh, _mm512_set1_ps(m[h]), _CMP_GT_OQ) != 0) {
      const float mx = _mm512_mask_reduce_max_ps(valid, sh);
      const __m512 corr = _mm512_set1_ps(exp_nonpositive(m[h] - mx));  // ~0 the first time
      _mm512_storeu_ps(lh, _mm512_mul_ps(_mm512_loadu_ps(lh), corr));
      for (int64_t i = 0; i < d; i += 16) {
        _mm512_storeu_ps(ah + i, _mm512_mul_ps(_mm512_loadu_ps(ah + i), corr));
      }
      m[h] = mx;
    }
    const __m512 p =
        _mm512_maskz_mov_ps(valid, exp16_nonpositive(_mm512_sub_ps(sh, _mm512_set1_ps(m[h]))));
    _mm512_storeu_ps(lh, _mm512_add_ps(_mm512_loadu_ps(lh), p));
    const __m512i wi = _mm512_cvtps_epi32(_mm512_mul_ps(p, vmul));  // 0 .. 32767
    _mm256_store_si256(reinterpret_cast<__m256i*>(w[h]), _mm512_cvtepi32_epi16(wi));
  }
  // Value sums: token pairs, each row widened to int16 and the two interleaved into pairs;
  // 32 dimensions at a time (8 accumulators for 4 heads: no spills).
  const __m512 back = _mm512_set1_ps(vmax / 32767.0f);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t half = 0; half < 2; ++half) {
      if (half == 1) tick();
      __m512i ia[HG][2];
      for (int h = 0; h < HG; ++h) ia[h][0] = ia[h][1] = _mm512_setzero_si512();
      for (int64_t i = 0; 2 * i < n; ++i) {
        const int8_t* pa = v0 + 2 * i * d + 64 * c + 32 * half;
        const __m512i a0 = widen32(pa);
        const __m512i b0 = 2 * i + 1 < n ? widen32(pa + d) : _mm512_setzero_si512();
        const __m512i x0 = _mm512_unpacklo_epi16(a0, b0), x1 = _mm512_unpackhi_epi16(a0, b0);
        for (int h = 0; h < HG; ++h) {
          const __m512i wp = _mm512_set1_epi32(w[h][i]);
          ia[h][0] = _mm512_dpwssd_epi32(ia[h][0], x0, wp);
          ia[h][1] = _mm512_dpwssd_epi32(ia[h][1], x1, wp);
        }
      }
      // Accumulator v of the vnni order: v = 2 * (lo / hi) + half.
      for (int h = 0; h < HG; ++h) {
        float* ah = acc + h * d + 64 * c;
        for (int u = 0; u < 2; ++u) {
          float* av = ah + 16 * (2 * u + half);
          _mm512_storeu_ps(av, _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[h][u]), back,
                                               _mm512_loadu_ps(av)));
        }
      }
    }
  }
}

// The tile for vnni_block: every tile is a full 16 lanes here (masked loads).
template <int HG, typename Tick>
[[gnu::always_inline]] inline void run_tile(bool, Tick& tick, const QWord* qb, const float* qs,
                                            const int32_t* qo, int64_t d, const int8_t* kw,
                                            const float* ks, const int8_t* v0, const float* vs,
                                            int64_t bs, int64_t n, float* m, float* lv,
                                            float* acc) {
  vnni_tile<HG>(tick, qb, qs, qo, d, kw, ks, v0, vs, bs, n, m, lv, acc);
}

constexpr int64_t kAccLanes = 16;  // lanes of an accumulator vector (vnni_dim)

}  // namespace carpool_kernels

#elif defined(CARPOOL_AVX2)
// The same loops on AVX2 + FMA CPUs without AVX-512 (AMD Zen 2 / Zen 3, Intel Haswell to Alder
// Lake). There is no VPDPBUSD or VPDPWSSD: each is VPMADDUBSW (unsigned times signed bytes,
// adjacent pairs summed to int16, saturating) or nothing, then VPMADDWD (int16 pairs summed to
// int32), then an add. The keys enter VPMADDUBSW as |k| and the query bytes with k's sign
// (VPSIGNB: q * sign(k), 0 where k is 0), so a pair's sum is at most 2 * 127 * 127 < 32767:
// nothing saturates, and every score's integer sum is exactly the VNNI loops' (which add
// k + 128 and subtract 128 * sum(q)). The softmax weights and the value sums are theirs too
// (VPMADDWD for VPDPWSSD). 8 lanes: a tile's 16 tokens are two vectors, a value row 16
// dimensions a vector. Why: the int8 cache is half the bf16 cache's bytes, and its rows had
// been widened to float32 value by value, slower than the bf16 cache on an AMD Zen 2 (issue 11,
// twenty-third pass). Accumulators in "vnni order" here mean this section's order (vnni_dim).
#define CARPOOL_INT8_ATTENTION 1

namespace carpool_kernels {

using QWord = int32_t;  // a query word (4 int8 values), broadcast where it is used

inline float lane_sum16(const float* lv) {
  float sum = 0.0f;
  for (int i = 0; i < 16; ++i) sum += lv[i];
  return sum;
}

// quantize_query's values, as the VNNI loops compute them (the product by scale, round half to
// even): the words as they are, qo unused (0: no offset here).
template <typename T>
inline void quantize_query(const T* q, int64_t d, float scale, QWord* qb, float* qs,
                           int32_t* qo) {
  for (int64_t c = 0; c < d / 64; ++c) {
    float x[64];
    float amax = 0.0f;
    for (int i = 0; i < 64; ++i) {
      x[i] = to_float(q[64 * c + i]) * scale;
      amax = std::max(amax, std::fabs(x[i]));
    }
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int8_t b[64];
    for (int i = 0; i < 64; ++i) {
      b[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(x[i] * inv))));
    }
    std::memcpy(qb + 16 * c, b, 64);
    qs[c] = amax / 127.0f;
    qo[c] = 0;
  }
}

// The dimension (within its 64-value chunk) that lane l of accumulator vector v (0-7) holds:
// 16 dimensions widened to int16 (128-bit lane L: 8L .. 8L + 7), two rows interleaved by
// unpacklo/hi_epi16 (per lane its first / last 4).
inline int64_t vnni_dim(int64_t v, int64_t l) {
  return 16 * (v >> 1) + 8 * (l >> 2) + 4 * (v & 1) + (l & 3);
}

// vnni_tile of the VNNI loops (its arguments and its phases). kFull: a tile of 16 tokens; else
// n < 16 and the loads of words and scales are masked to the tile's tokens (a block may end
// before the tile does).
template <int HG, bool kFull, typename Tick>
[[gnu::always_inline]] inline void vnni_tile(Tick& tick, const QWord* qb, const float* qs,
                                             const int32_t*, int64_t d, const int8_t* kw,
                                             const float* ks, const int8_t* v0, const float* vs,
                                             int64_t bs, int64_t n, float* m, float* lv,
                                             float* acc) {
  const int64_t chunks = d / 64;
  const __m256i nv = _mm256_set1_epi32(static_cast<int>(n));
  const __m256i in0 = _mm256_cmpgt_epi32(nv, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i in1 = _mm256_cmpgt_epi32(nv, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
  const int halves = kFull || n > 8 ? 2 : 1;
  const __m256 zero = _mm256_setzero_ps();
  auto scales = [&](const float* p, __m256i in) {
    return kFull ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, in);
  };
  const __m256 ksc[2] = {scales(ks, in0), halves == 2 ? scales(ks + 8, in1) : zero};
  const __m256 vsc[2] = {scales(vs, in0), halves == 2 ? scales(vs + 8, in1) : zero};
  // Scores: per chunk and half tile, one 32-byte load of 8 tokens' word j per word.
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 s[HG][2];
  for (int h = 0; h < HG; ++h) s[h][0] = s[h][1] = zero;
  for (int64_t c = 0; c < chunks; ++c) {
    for (int half = 0; half < halves; ++half) {
      const __m256i in = half == 0 ? in0 : in1;
      __m256i a[HG];
      for (int h = 0; h < HG; ++h) a[h] = _mm256_setzero_si256();
      for (int64_t j = 0; j < 16; ++j) {
        const int* kp = reinterpret_cast<const int*>(kw + ((16 * c + j) * bs + 8 * half) * 4);
        const __m256i k = kFull ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp))
                                : _mm256_maskload_epi32(kp, in);
        const __m256i ak = _mm256_abs_epi8(k);
        for (int h = 0; h < HG; ++h) {
          const __m256i qv = _mm256_set1_epi32(qb[h * d / 4 + 16 * c + j]);
          const __m256i pairs = _mm256_maddubs_epi16(ak, _mm256_sign_epi8(qv, k));
          a[h] = _mm256_add_epi32(a[h], _mm256_madd_epi16(pairs, ones));
        }
      }
      for (int h = 0; h < HG; ++h) {
        s[h][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[h]), _mm256_set1_ps(qs[h * chunks + c]),
                                     s[h][half]);
      }
    }
  }
  tick();
  // Softmax weights as int16: 32767 stands for the tile's largest V row scale.
  const float vmax = hmax8(_mm256_max_ps(vsc[0], vsc[1]));  // >= 0 (masked lanes 0)
  const __m256 vm = _mm256_set1_ps(vmax > 0.0f ? 32767.0f / vmax : 0.0f);
  const __m256 vmul[2] = {_mm256_mul_ps(vsc[0], vm), _mm256_mul_ps(vsc[1], vm)};
  const __m256 valid[2] = {_mm256_castsi256_ps(in0), _mm256_castsi256_ps(in1)};
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(32) int32_t w[HG][8];  // per head: the 16 tokens' weights, a pair per word
  for (int h = 0; h < HG; ++h) {
    __m256 sh[2], sm[2];
    for (int u = 0; u < 2; ++u) {
      sh[u] = _mm256_mul_ps(s[h][u], ksc[u]);
      sm[u] = _mm256_blendv_ps(ninf, sh[u], valid[u]);  // lanes past n out of the max
    }
    float* ah = acc + h * d;
    float* lh = lv + h * 16;
    const __m256 mx8 = _mm256_max_ps(sm[0], sm[1]);
    if (_mm256_movemask_ps(_mm256_cmp_ps(mx8, _mm256_set1_ps(m[h]), _CMP_GT_OQ)) != 0) {
      const float mx = hmax8(mx8);
      const __m256 corr = _mm256_set1_ps(exp_nonpositive(m[h] - mx));  // ~0 the first time
      for (int64_t i = 0; i < 16; i += 8) {
        _mm256_storeu_ps(lh + i, _mm256_mul_ps(_mm256_loadu_ps(lh + i), corr));
      }
      for (int64_t i = 0; i < d; i += 8) {
        _mm256_storeu_ps(ah + i, _mm256_mul_ps(_mm256_loadu_ps(ah + i), corr));
      }
      m[h] = mx;
    }
    __m256i wi[2];
    for (int u = 0; u < 2; ++u) {
      const __m256 p =
          _mm256_and_ps(exp8_nonpositive(_mm256_sub_ps(sh[u], _mm256_set1_ps(m[h]))), valid[u]);
      _mm256_storeu_ps(lh + 8 * u, _mm256_add_ps(_mm256_loadu_ps(lh + 8 * u), p));
      wi[u] = _mm256_cvtps_epi32(_mm256_mul_ps(p, vmul[u]));  // 0 .. 32767
    }
    // Packed per 128-bit lane ([0-3, 8-11 | 4-7, 12-15]): the 64-bit permute restores order.
    const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(wi[0], wi[1]), 0xD8);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w[h]), w16);
  }
  // Value sums: token pairs, 16 dimensions of each row widened to int16 and the two rows
  // interleaved into pairs; 8 accumulators for 4 heads.
  const __m256 back = _mm256_set1_ps(vmax / 32767.0f);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t g = 0; g < 4; ++g) {
      if (g == 2) tick();
      __m256i ia[HG][2];
      for (int h = 0; h < HG; ++h) ia[h][0] = ia[h][1] = _mm256_setzero_si256();
      // Not unrolled: gcc unrolled the 8 pairs and kept their 32 weight vectors on the stack
      // (0.93x; issue 11, twenty-third pass).
      #pragma GCC unroll 1
      for (int64_t i = 0; 2 * i < n; ++i) {
        const int8_t* pa = v0 + 2 * i * d + 64 * c + 16 * g;
        const __m256i a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pa)));
        const __m256i b0 =
            2 * i + 1 < n
                ? _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pa + d)))
                : _mm256_setzero_si256();
        const __m256i x0 = _mm256_unpacklo_epi16(a0, b0), x1 = _mm256_unpackhi_epi16(a0, b0);
        for (int h = 0; h < HG; ++h) {
          const __m256i wp = _mm256_set1_epi32(w[h][i]);
          ia[h][0] = _mm256_add_epi32(ia[h][0], _mm256_madd_epi16(x0, wp));
          ia[h][1] = _mm256_add_epi32(ia[h][1], _mm256_madd_epi16(x1, wp));
        }
      }
      // Accumulator v of this order: v = 2 * g + (lo / hi).
      for (int h = 0; h < HG; ++h) {
        float* ah = acc + h * d + 64 * c;
        for (int u = 0; u < 2; ++u) {
          float* av = ah + 8 * (2 * g + u);
          _mm256_storeu_ps(av, _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[h][u]), back,
                                               _mm256_loadu_ps(av)));
        }
      }
    }
  }
}

// The tile for vnni_block: full tiles without masks.
template <int HG, typename Tick>
[[gnu::always_inline]] inline void run_tile(bool full, Tick& tick, const QWord* qb,
                                            const float* qs, const int32_t* qo, int64_t d,
                                            const int8_t* kw, const float* ks, const int8_t* v0,
                                            const float* vs, int64_t bs, int64_t n, float* m,
                                            float* lv, float* acc) {
  if (full) {
    vnni_tile<HG, true>(tick, qb, qs, qo, d, kw, ks, v0, vs, bs, n, m, lv, acc);
  } else {
    vnni_tile<HG, false>(tick, qb, qs, qo, d, kw, ks, v0, vs, bs, n, m, lv, acc);
  }
}

constexpr int64_t kAccLanes = 8;  // lanes of an accumulator vector (vnni_dim)

}  // namespace carpool_kernels

#endif

#if defined(CARPOOL_INT8_ATTENTION)
namespace carpool_kernels {

// One block (n_tok tokens; base: the region of the run's first kv head, regions `region` bytes
// apart) for the run's nkh kv heads and their `group` query heads each (sub-groups of at most
// 4): tiles of 16 tokens. The next block's lines are asked for with prefetch(n), spread over
// the work: each kv head's tile asks for its share in thirds, between its phases (vnni_tile's
// ticks) and after it. Why not in one go after the tile: bursts of ~34 requests left the
// memory idle while the tile computed (the whole block's 136 lines at once: 2.2x slower), and
// requests inside the inner loops competed with its loads (12 a tile: 0.91x); between the
// phases, 1.18x at GQA 16/4 8 x 2k and 1.20x at 8k from memory (BENCHMARKS.md, issue 11,
// nineteenth pass).
template <typename Prefetch>
inline void vnni_block(const QWord* qb, const float* qs, const int32_t* qo, int64_t d,
                       const int8_t* base, int64_t bs, int64_t region, int64_t n_tok,
                       int64_t nkh, int64_t group, float* m, float* lv, float* acc,
                       Prefetch& prefetch, int64_t lines) {
  const int64_t tiles = (n_tok + 15) / 16;
  const int64_t per_call = (lines + tiles * nkh - 1) / (tiles * nkh);
  const int64_t third = (per_call + 2) / 3;
  const int64_t chunks = d / 64;
  const int64_t vrows = bs * (d + 4);  // V rows' offset in a region
  for (int64_t t0 = 0; t0 < n_tok; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, n_tok - t0);
    for (int64_t k = 0; k < nkh; ++k) {
      const int8_t* hb = base + k * region;
      const int8_t* kw = hb + t0 * 4;
      const float* ks = reinterpret_cast<const float*>(hb + d * bs) + t0;
      const int8_t* v0 = hb + vrows + t0 * d;
      const float* vs = reinterpret_cast<const float*>(hb + vrows + d * bs) + t0;
      int64_t asked = 0;  // of this tile's per_call lines
      auto tick = [&]() {
        const int64_t count = std::min(third, per_call - asked);
        prefetch(count);
        asked += count;
      };
      for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const int64_t h = k * group + g0;
        const QWord* qh = qb + h * d / 4;
        const float* sh = qs + h * chunks;
        const int32_t* oh = qo + h * chunks;
        float* mh = m + h;
        float* lh = lv + h * 16;
        float* ah = acc + h * d;
        const bool full = n == 16;
        switch (std::min<int64_t>(4, group - g0)) {
          case 1: run_tile<1>(full, tick, qh, sh, oh, d, kw, ks, v0, vs, bs, n, mh, lh, ah); break;
          case 2: run_tile<2>(full, tick, qh, sh, oh, d, kw, ks, v0, vs, bs, n, mh, lh, ah); break;
          case 3: run_tile<3>(full, tick, qh, sh, oh, d, kw, ks, v0, vs, bs, n, mh, lh, ah); break;
          default: run_tile<4>(full, tick, qh, sh, oh, d, kw, ks, v0, vs, bs, n, mh, lh, ah);
        }
      }
      prefetch(per_call - asked);
    }
  }
}

// out[0..d) = acc (vnni order) * mul, natural order.
template <typename T>
inline void store_from_vnni(const float* acc, T* out, int64_t d, float mul) {
  for (int64_t c = 0; c < d; c += 64) {
    for (int64_t i = 0; i < 64; ++i) {
      store(out + c + vnni_dim(i / kAccLanes, i % kAccLanes), acc[c + i] * mul);
    }
  }
}

}  // namespace carpool_kernels
#endif
