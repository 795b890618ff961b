// Vector helpers of the CPU kernels in paged_attention.cpp: element loads and stores of float32,
// bfloat16 and int8, dot products (one, or 16 with one reduction tree), the weighted sum of a
// block's value rows, and exp of non-positive arguments. AVX-512 intrinsics where the build
// machine has them (-march=native), else AVX2 + FMA ones (8 lanes: AMD Zen 3, older Intel),
// plain loops otherwise.
//
// Header-only (inline functions and templates), included by one translation unit; the kernel
// build hashes this file with the source (kernel_build._build_name).

#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// The 8-lane path: AVX2 with FMA but without AVX-512 (where both exist the 16-lane code runs).
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define CARPOOL_AVX2 1
#endif
// The grouped decode-attention loops (8 lanes) on every CPU with AVX2 and FMA, AVX-512 ones
// included: on AMD Zen 4 they beat the 16-lane per-head loops (BENCHMARKS.md, issue 11, ninth
// pass).
#if defined(__AVX2__) && defined(__FMA__)
#define CARPOOL_GROUPED 1
#endif

namespace carpool_kernels {

inline float to_float(float x) { return x; }

inline float to_float(c10::BFloat16 x) {
  // bfloat16 is the top half of a float32: widening is a shift.
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float to_float(int8_t x) { return static_cast<float>(x); }

inline void store(float* dst, float x) { *dst = x; }

inline void store(c10::BFloat16* dst, float x) { *dst = c10::BFloat16(x); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 load16(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
#endif

#if defined(CARPOOL_GROUPED)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256 load8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

// The sum of 8 lanes.
inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// The largest of 8 lanes (max_block; the AVX2 int8 loops of int8_attention.h).
inline float hmax8(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// The 8 lane sums of acc[0..7], as one vector (element j = sum of acc[j]).
inline __m256 reduce8(const __m256* acc) {
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  // Per 128-bit half: [acc0, acc1, acc2, acc3] (u0) and [acc4..acc7] (u1) over its 4 lanes.
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// out[j] = q . k_j for 8 rows k_j = k0 + j * stride (head_dim d a multiple of 8): dot16's
// 8-lane form.
template <typename C>
inline void dot8(const float* q, const C* k0, int64_t stride, int64_t d, float* out) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(k0 + j * stride + i), acc[j]);
  }
  _mm256_storeu_ps(out, reduce8(acc));
}
#endif

#if defined(CARPOOL_GROUPED)
// bfloat16 rows read 16 values at a time as two float32 vectors, each for one vector
// instruction: a bfloat16 value is the top half of a float32, and the 32-bit lane j of 16 loaded
// values holds value 2j in its low half and 2j + 1 in its high half; shifted left by 16 the
// lanes are the even values, masked to the high half the odd ones. (Widening 8 values to 8
// lanes takes a shuffle and a shift, both on the two vector ports AVX2 shuffles use, and that
// was what a GQA decode step waited on.) Queries and accumulators that meet such rows are kept
// in the same "split" order: per 16-value chunk, its 8 even values, then its 8 odd ones
// (Lanes16 below: per 32-value chunk, 16 and 16).
inline void load_split(const c10::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

#endif

// Elements of one (token, K/V, kv head) row in the cache: an int8 row's head_dim values come
// with a float32 scale (4 bytes; kv_quant.py).
template <typename C>
constexpr int64_t row_extra() { return std::is_same<C, int8_t>::value ? 4 : 0; }

// The largest of x and sh[0..n). The vector's lanes are reduced only where one exceeds x
// (the kernel's running max: after the first blocks, rarely), as in softmax_weights_bf16.
inline float max_block(const float* sh, int64_t n, float x) {
  int64_t t = 0;
#if defined(__AVX512F__)
  const __m512 xv = _mm512_set1_ps(x);
  __m512 mv = xv;
  for (; t + 16 <= n; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sh + t));
  if (_mm512_cmp_ps_mask(mv, xv, _CMP_GT_OQ) != 0) x = _mm512_reduce_max_ps(mv);
#elif defined(CARPOOL_AVX2)
  const __m256 xv = _mm256_set1_ps(x);
  __m256 mv = xv;
  for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sh + t));
  if (_mm256_movemask_ps(_mm256_cmp_ps(mv, xv, _CMP_GT_OQ)) != 0) x = hmax8(mv);
#endif
  for (; t < n; ++t) x = std::max(x, sh[t]);
  return x;
}

// sum(a[i] * b[i]). With AVX-512 the horizontal sum is a few shuffles: gcc's own `omp simd`
// reduction summed the 16 lanes one by one through the stack, which dominated the kernel.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#elif defined(CARPOOL_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  sum = hsum8(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) sum += a[i] * to_float(b[i]);
  return sum;
}

// acc[i] += p * v[i]
template <typename T>
inline void axpy(float* acc, float p, const T* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, load16(v + i), _mm512_loadu_ps(acc + i)));
#elif defined(CARPOOL_AVX2)
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, load8(v + i), _mm256_loadu_ps(acc + i)));
#endif
  for (; i < n; ++i) acc[i] += p * to_float(v[i]);
}

#if defined(__AVX512F__)
// The 16 lane sums of acc[0..15], as one vector (element j = sum of acc[j]): a transpose-and-add
// tree of 45 instructions, against ~9 per vector for 16 separate _mm512_reduce_add_ps.
inline __m512 reduce16(const __m512* acc) {
  __m512 c[4];
  for (int g = 0; g < 4; ++g) {
    const __m512* v = acc + 4 * g;
    // Per 128-bit lane: a = [v0 0+2, v1 0+2, v0 1+3, v1 1+3] (b likewise for v2, v3).
    const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
    const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
    // Per lane: [v0, v1, v2, v3] summed over the lane's 4 elements.
    c[g] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
  }
  // Sum each c[g] over its 4 lanes, c[g]'s total landing in lane g.
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44),
                                  _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44),
                                  _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}

// The 16 lane sums of acc[0..15] as one vector (element j = sum of acc[j]), each the very bits
// of _mm512_reduce_add_ps(acc[j]) (its tree: lane i + lane i + 8, then i + (i + 4), then
// (0 + 2) + (1 + 3)), in 46 instructions against ~9 a vector: as reduce16, where a kernel's sums
// must stay those of its one-vector reductions elsewhere (int8_row's, int8_logits_at's).
inline __m512 reduce_add16(const __m512* acc) {
  // Lane i + lane i + 8 of acc[2p] in elements 0..7 of s[p], of acc[2p + 1] in 8..15.
  __m512 s[8];
  for (int p = 0; p < 8; ++p)
    s[p] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * p], acc[2 * p + 1], 0x44),
                         _mm512_shuffle_f32x4(acc[2 * p], acc[2 * p + 1], 0xEE));
  // Then i + (i + 4), i < 4: acc[4q + j]'s four in 128-bit lane j of t[q].
  __m512 t[4];
  for (int q = 0; q < 4; ++q)
    t[q] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * q], s[2 * q + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * q], s[2 * q + 1], 0xDD));
  // Then (0 + 2, 1 + 3): lane j of u[r] holds acc[8r + j]'s pair, then acc[8r + 4 + j]'s.
  __m512 u[2];
  for (int r = 0; r < 2; ++r)
    u[r] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * r], t[2 * r + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * r], t[2 * r + 1], 0xEE));
  // The pairs added: element 4j + i holds acc[4i + j]'s sum; permuted back into order.
  const __m512 v = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, v);
}

// out[j] = q . k_j for 16 rows k_j = k0 + j * stride (head_dim d a multiple of 16): 16
// independent accumulators (the FMA latency overlaps) and one reduction tree for all of them.
template <typename C>
inline void dot16(const float* q, const C* k0, int64_t stride, int64_t d, float* out) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) {
    const __m512 qv = _mm512_loadu_ps(q + i);
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qv, load16(k0 + j * stride + i), acc[j]);
  }
  _mm512_storeu_ps(out, reduce16(acc));
}
#endif

// ah[:] += sum over the block's tokens t of ph[t] * v_t[:], v_t = v0 + t * stride: the
// accumulator of one query head stays in registers for the whole block (head_dim = 16 * NV),
// instead of a load and a store of it per token.
template <int NV, typename T>
inline bool head_values_fixed(float* ah, const T* v0, int64_t stride, int64_t n_tok,
                              const float* ph) {
#if defined(__AVX512F__)
  __m512 a[NV];
  for (int j = 0; j < NV; ++j) a[j] = _mm512_loadu_ps(ah + 16 * j);
  for (int64_t t = 0; t < n_tok; ++t) {
    const __m512 p = _mm512_set1_ps(ph[t]);
    const T* vp = v0 + t * stride;
    for (int j = 0; j < NV; ++j) a[j] = _mm512_fmadd_ps(p, load16(vp + 16 * j), a[j]);
  }
  for (int j = 0; j < NV; ++j) _mm512_storeu_ps(ah + 16 * j, a[j]);
  return true;
#elif defined(CARPOOL_AVX2)
  // NV 16-lane vectors are 2 * NV 8-lane ones (16 registers at head_dim 128: all of them).
  __m256 a[2 * NV];
  for (int j = 0; j < 2 * NV; ++j) a[j] = _mm256_loadu_ps(ah + 8 * j);
  for (int64_t t = 0; t < n_tok; ++t) {
    const __m256 p = _mm256_set1_ps(ph[t]);
    const T* vp = v0 + t * stride;
    for (int j = 0; j < 2 * NV; ++j) a[j] = _mm256_fmadd_ps(p, load8(vp + 8 * j), a[j]);
  }
  for (int j = 0; j < 2 * NV; ++j) _mm256_storeu_ps(ah + 8 * j, a[j]);
  return true;
#else
  return false;
#endif
}

template <typename T>
inline void head_values(float* ah, const T* v0, int64_t stride, int64_t n_tok, const float* ph,
                        int64_t d) {
  const bool done = (d == 16 && head_values_fixed<1>(ah, v0, stride, n_tok, ph)) ||
                    (d == 32 && head_values_fixed<2>(ah, v0, stride, n_tok, ph)) ||
                    (d == 64 && head_values_fixed<4>(ah, v0, stride, n_tok, ph)) ||
                    (d == 128 && head_values_fixed<8>(ah, v0, stride, n_tok, ph));
  if (!done) {
    for (int64_t t = 0; t < n_tok; ++t) axpy(ah, ph[t], v0 + t * stride, d);
  }
}

#if defined(CARPOOL_GROUPED)
// The grouped loops' vector width. Lanes8: AVX2's 8 float32 lanes (what every CPU with AVX2 and
// FMA runs, AVX-512 ones too where head_dim is not a multiple of 32). Lanes16: AVX-512's 16,
// where head_dim is a multiple of 32: the same loops with half the instructions per value, which
// pays where the cores execute 512-bit vectors at full width (float32 queries over a bfloat16
// cache, the default model's attention: 1.3-1.7x on an AMD Zen 5; BENCHMARKS.md, issue 11,
// twenty-first pass). A value chunk is 2N values (N even, then N odd ones in split order, see
// load_split); a reduction sums N dot products at once.
struct Lanes8 {
  using V = __m256;
  static constexpr int N = 8;
  static constexpr int kAccs = 8;  // accumulators of the value sums (16 vector registers)
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void pair(const c10::BFloat16* p, V& even, V& odd) { load_split(p, even, odd); }
  static void pair(const int8_t* p, V& a, V& b) {  // int8 rows in natural order
    a = load8(p);
    b = load8(p + 8);
  }
  // out[j] = the lane sum of acc[j], j < N (out 32-byte aligned).
  static void sums(const V* acc, float* out) { _mm256_store_ps(out, reduce8(acc)); }
};

#if defined(__AVX512F__)
struct Lanes16 {
  using V = __m512;
  static constexpr int N = 16;
  static constexpr int kAccs = 16;  // of 32 vector registers
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void pair(const c10::BFloat16* p, V& even, V& odd) {
    const __m512i x = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static void pair(const int8_t* p, V& a, V& b) {
    a = load16(p);
    b = load16(p + 16);
  }
  // Two 256-bit stores, not one 512-bit one: the scalar reads of the results then take their
  // values straight from the stores (store-to-load forwarding; as dots_bf16). out 64-byte aligned.
  static void sums(const V* acc, float* out) {
    const __m512 r = reduce16(acc);
    _mm256_store_ps(out, _mm512_castps512_ps256(r));
    _mm256_store_ps(out + 8, _mm512_extractf32x8_ps(r, 1));
  }
};
#endif

// Calls f(L{}) with the lane type the kernel picked: Lanes16 where `wide` (AVX-512 builds only).
template <typename F>
inline void with_lanes([[maybe_unused]] bool wide, F&& f) {
#if defined(__AVX512F__)
  if (wide) {
    f(Lanes16{});
    return;
  }
#endif
  f(Lanes8{});
}

// dst[0..d) = x[0..d) * mul in L's split order (d a multiple of 2N): per chunk of 2N values,
// its N even values, then its N odd ones.
template <typename L, typename T>
inline void to_split(const T* x, float* dst, int64_t d, float mul) {
  for (int64_t c = 0; c < d; c += 2 * L::N) {
    for (int j = 0; j < L::N; ++j) {
      dst[c + j] = to_float(x[c + 2 * j]) * mul;
      dst[c + L::N + j] = to_float(x[c + 2 * j + 1]) * mul;
    }
  }
}

// dst[0..d) = src[0..d) * mul, src in L's split order, dst in natural order.
template <typename L, typename T>
inline void store_from_split(const float* src, T* dst, int64_t d, float mul) {
  for (int64_t c = 0; c < d; c += 2 * L::N) {
    for (int j = 0; j < L::N; ++j) {
      store(dst + c + 2 * j, src[c + j] * mul);
      store(dst + c + 2 * j + 1, src[c + L::N + j] * mul);
    }
  }
}

// s[h * s_stride + t] = q_h . k_t for HG query heads sharing one kv head (rows qs + h * d, in
// L's split order where the cache is bfloat16) and TOK keys k_t = k0 + t * ts (rows of C,
// head_dim d a multiple of 2N): each key vector is loaded once for all the heads of the group,
// and the TOK * HG <= N dot products share one reduction.
// (The `#pragma GCC unroll` on the loops over heads, tokens and chunks here and in
// group_values_split: without them gcc 12 kept the accumulator arrays on the stack, storing
// each after every multiply-add and carrying one through memory; unrolled, they stay in
// registers: the AVX2 kernel 1.22-1.35x (value sums) and 1.05-1.11x more (scores) on GQA 16/4
// and 9/3 at 8 x 2k, the same operations in the same order; issue 11, twenty-second pass.)
template <typename L, int TOK, int HG, typename C>
inline void dots_split(const float* qs, int64_t d, const C* k0, int64_t ts, float* s,
                       int64_t s_stride) {
  static_assert(TOK * HG <= L::N, "one reduction");
  typename L::V acc[L::N];
  #pragma GCC unroll 16
  for (int j = 0; j < L::N; ++j) acc[j] = L::zero();
  for (int64_t c = 0; c < d; c += 2 * L::N) {
    #pragma GCC unroll 16
    for (int t = 0; t < TOK; ++t) {
      typename L::V e, o;
      L::pair(k0 + t * ts + c, e, o);
      #pragma GCC unroll 16
      for (int h = 0; h < HG; ++h) {
        auto& a = acc[t * HG + h];
        a = L::fmadd(e, L::load(qs + h * d + c), a);
        a = L::fmadd(o, L::load(qs + h * d + c + L::N), a);
      }
    }
  }
  alignas(64) float r[L::N];
  L::sums(acc, r);
  #pragma GCC unroll 16
  for (int t = 0; t < TOK; ++t) {
    #pragma GCC unroll 16
    for (int h = 0; h < HG; ++h) s[h * s_stride + t] = r[t * HG + h];
  }
}

// Scores of a group of HG heads against n_tok consecutive keys, N / HG keys per reduction and
// one at a time for the rest; prefetch(lines) after each reduction (the next block's rows,
// spread over the work).
template <typename L, int HG, typename C, typename Prefetch>
inline void group_dots_split(const float* qs, int64_t d, const C* k0, int64_t ts,
                             int64_t n_tok, float* s, int64_t s_stride, Prefetch& prefetch,
                             int64_t lines) {
  constexpr int TOK = L::N / HG;
  int64_t t = 0;
  for (; t + TOK <= n_tok; t += TOK) {
    dots_split<L, TOK, HG, C>(qs, d, k0 + t * ts, ts, s + t, s_stride);
    prefetch(lines);
  }
  for (; t < n_tok; ++t) {
    dots_split<L, 1, HG, C>(qs, d, k0 + t * ts, ts, s + t, s_stride);
    prefetch(lines);
  }
}

// acc_h[0..len) += sum over t < n_tok of p[h * p_stride + t] * v_t for HG heads sharing one
// kv head (accumulators acc + h * d, in L's split order where the cache is bfloat16),
// v_t = v0 + t * ts (rows of C): each value vector is loaded once for the group. CH chunks of
// 2N values at a time, 2 * HG * CH accumulators in registers for the whole block (enough
// independent chains to hide the multiply-add latency). Each value's sum takes the tokens in
// order, one multiply-add each, whatever the lane type: the same bits with either.
template <typename L, int HG, int CH, typename C>
inline void group_values_split(float* acc, int64_t d, int64_t len, const C* v0,
                               int64_t ts, int64_t n_tok, const float* p, int64_t p_stride) {
  static_assert(2 * HG * CH <= L::kAccs, "accumulators in registers");
  constexpr int64_t kChunk = 2 * L::N;
  int64_t c = 0;
  for (; c + kChunk * CH <= len; c += kChunk * CH) {
    typename L::V a[2 * HG * CH];
    #pragma GCC unroll 16
    for (int h = 0; h < HG; ++h) {
      #pragma GCC unroll 16
      for (int j = 0; j < 2 * CH; ++j) a[h * 2 * CH + j] = L::load(acc + h * d + c + L::N * j);
    }
    for (int64_t t = 0; t < n_tok; ++t) {
      typename L::V e[CH], o[CH];
      #pragma GCC unroll 16
      for (int j = 0; j < CH; ++j) L::pair(v0 + t * ts + c + kChunk * j, e[j], o[j]);
      #pragma GCC unroll 16
      for (int h = 0; h < HG; ++h) {
        const typename L::V pb = L::bcast(p + h * p_stride + t);
        #pragma GCC unroll 16
        for (int j = 0; j < CH; ++j) {
          a[h * 2 * CH + 2 * j] = L::fmadd(pb, e[j], a[h * 2 * CH + 2 * j]);
          a[h * 2 * CH + 2 * j + 1] = L::fmadd(pb, o[j], a[h * 2 * CH + 2 * j + 1]);
        }
      }
    }
    #pragma GCC unroll 16
    for (int h = 0; h < HG; ++h) {
      #pragma GCC unroll 16
      for (int j = 0; j < 2 * CH; ++j) L::store(acc + h * d + c + L::N * j, a[h * 2 * CH + j]);
    }
  }
  if constexpr (CH > 1) {
    if (c < len) group_values_split<L, HG, 1, C>(acc + c, d, len - c, v0 + c, ts, n_tok, p, p_stride);
  }
}

// Scores of one block of a run's query heads over a bfloat16 or int8 cache (L's split order):
// N tokens at a time, and within them for every kv head k its group of query heads (rows
// k * group ..) in sub-groups of at most 4 (token-major: measured 2-6% faster than one kv
// head's whole block at a time). prefetch(n) asks for the next n cache lines of the next block;
// `lines` of them in all, spread evenly over the block's reductions (a tile's worth of requests
// at once stalled the loads behind them).
template <typename L, typename C, typename Prefetch>
inline void block_dots_split(const float* qs, int64_t d, const C* k0, int64_t ts,
                             int64_t rw, int64_t n_tok, int64_t nkh, int64_t group, float* s,
                             int64_t s_stride, Prefetch& prefetch, int64_t lines) {
  int64_t calls = 0;  // reductions in the block (group_dots_split's count)
  for (int64_t t0 = 0; t0 < n_tok; t0 += L::N) {
    const int64_t nt = std::min<int64_t>(L::N, n_tok - t0);
    for (int64_t h0 = 0; h0 < group; h0 += 4) {
      const int64_t tok = L::N / std::min<int64_t>(4, group - h0);
      calls += nkh * (nt / tok + nt % tok);
    }
  }
  const int64_t per_call = (lines + calls - 1) / calls;
  for (int64_t t0 = 0; t0 < n_tok; t0 += L::N) {
    const int64_t nt = std::min<int64_t>(L::N, n_tok - t0);
    for (int64_t k = 0; k < nkh; ++k) {
      for (int64_t h0 = 0; h0 < group; h0 += 4) {
        const int64_t h = k * group + h0;
        const float* qh = qs + h * d;
        float* sh = s + h * s_stride + t0;
        const C* kr = k0 + t0 * ts + k * rw;
        switch (std::min<int64_t>(4, group - h0)) {
          case 1: group_dots_split<L, 1>(qh, d, kr, ts, nt, sh, s_stride, prefetch, per_call); break;
          case 2: group_dots_split<L, 2>(qh, d, kr, ts, nt, sh, s_stride, prefetch, per_call); break;
          case 3: group_dots_split<L, 3>(qh, d, kr, ts, nt, sh, s_stride, prefetch, per_call); break;
          default: group_dots_split<L, 4>(qh, d, kr, ts, nt, sh, s_stride, prefetch, per_call);
        }
      }
    }
  }
}

// Value sums of one block for a run's query heads (sub-groups of at most 4 per kv head). Chunks
// per pass: as many as keep 2 * HG * CH accumulators in L's registers (head_dim 64 is two
// 16-lane chunks: CH = 2 takes a 16-lane row whole).
template <typename L, typename C>
inline void block_values_split(float* acc, int64_t d, const C* v0, int64_t ts,
                               int64_t rw, int64_t n_tok, int64_t nkh, int64_t group,
                               const float* p, int64_t p_stride) {
  constexpr int kWide = L::N == 16 ? 2 : 1;  // chunks per pass at 3 and 4 heads
  for (int64_t k = 0; k < nkh; ++k) {
    for (int64_t h0 = 0; h0 < group; h0 += 4) {
      const int64_t h = k * group + h0;
      float* ah = acc + h * d;
      const float* ph = p + h * p_stride;
      const C* vr = v0 + k * rw;
      switch (std::min<int64_t>(4, group - h0)) {
        case 1: group_values_split<L, 1, 4>(ah, d, d, vr, ts, n_tok, ph, p_stride); break;
        case 2: group_values_split<L, 2, 2>(ah, d, d, vr, ts, n_tok, ph, p_stride); break;
        case 3: group_values_split<L, 3, kWide>(ah, d, d, vr, ts, n_tok, ph, p_stride); break;
        default: group_values_split<L, 4, kWide>(ah, d, d, vr, ts, n_tok, ph, p_stride);
      }
    }
  }
}
#endif

#if defined(__AVX512BF16__)
// The AVX-512 BF16 decode loops (bfloat16 queries over a bfloat16 cache, head_dim a multiple of
// 32): VDPBF16PS multiplies 16 pairs of bfloat16 values and adds both products to 16 float32
// sums, 32 multiply-adds an instruction against 8 for an AVX2 FMA. Scores: a key row times a
// query row, 32 values a step, 16 of them summed by one reduce16. Value sums: the rows of two tokens
// interleaved in 16-bit halves (unpacklo/hi_epi16) times their two softmax weights, rounded to
// bfloat16 (as GPU flash-attention kernels round them for their P x V product; the running sum
// l takes the same rounded weights, so they still sum to one). Accumulators are kept in the
// order the interleaving leaves them ("pair order", see store_from_pairs).

// 32 values of a cache row as 16 bfloat16 pairs: a bfloat16 row as it is, an int8 row widened
// to float32 and narrowed to bfloat16 (exact: every int8 value is a bfloat16), 6 instructions
// per 32 values that the group's query heads then share.
inline __m512i load32_bh(const c10::BFloat16* p) { return _mm512_loadu_si512(p); }

inline __m512i load32_bh(const int8_t* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// s[h * s_stride + t] = scale * (q_h . k_t) for HG query heads (bfloat16 rows qs + h * d) and
// TOK keys k_t = k0 + t * ts (rows of C: bfloat16, or int8 whose row scales the caller applies;
// TOK * HG <= 16).
template <int TOK, int HG, typename C>
inline void dots_bf16(const c10::BFloat16* qs, int64_t d, const C* k0, int64_t ts,
                      float* s, int64_t s_stride, float scale) {
  static_assert(TOK * HG <= 16, "16 accumulators");
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 32) {
    __m512bh qv[HG];
    for (int h = 0; h < HG; ++h) qv[h] = (__m512bh)_mm512_loadu_si512(qs + h * d + c);
    for (int t = 0; t < TOK; ++t) {
      const __m512bh kv = (__m512bh)load32_bh(k0 + t * ts + c);
      for (int h = 0; h < HG; ++h) acc[t * HG + h] = _mm512_dpbf16_ps(acc[t * HG + h], kv, qv[h]);
    }
  }
  // Two 256-bit stores, not one 512-bit one: the scalar reads below then take their values
  // straight from the stores (store-to-load forwarding; measured 2x on the whole kernel).
  alignas(64) float r[16];
  const __m512 rv = _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale));
  _mm256_store_ps(r, _mm512_castps512_ps256(rv));
  _mm256_store_ps(r + 8, _mm512_extractf32x8_ps(rv, 1));
  for (int t = 0; t < TOK; ++t) {
    for (int h = 0; h < HG; ++h) s[h * s_stride + t] = r[t * HG + h];
  }
}

// prefetch(lines) after each reduction (the next block's rows, spread over the work).
template <int HG, typename C, typename Prefetch>
inline void group_dots_bf16(const c10::BFloat16* qs, int64_t d, const C* k0,
                            int64_t ts, int64_t n_tok, float* s, int64_t s_stride, float scale,
                            Prefetch& prefetch, int64_t lines) {
  constexpr int TOK = 16 / HG;
  int64_t t = 0;
  for (; t + TOK <= n_tok; t += TOK) {
    dots_bf16<TOK, HG, C>(qs, d, k0 + t * ts, ts, s + t, s_stride, scale);
    prefetch(lines);
  }
  for (; t < n_tok; ++t) {
    dots_bf16<1, HG, C>(qs, d, k0 + t * ts, ts, s + t, s_stride, scale);
    prefetch(lines);
  }
}

// Scores of one block for a run's query heads (rows qs + h * d; kv head k's group of `group`
// heads from row k * group, in sub-groups of at most 4); prefetch(n) asks for the next n cache
// lines of the next block, `lines` of them in all, spread evenly over the reductions.
template <typename C, typename Prefetch>
inline void block_dots_bf16(const c10::BFloat16* qs, int64_t d, const C* k0,
                            int64_t ts, int64_t rw, int64_t n_tok, int64_t nkh, int64_t group,
                            float* s, int64_t s_stride, float scale, Prefetch& prefetch,
                            int64_t lines) {
  int64_t calls = 0;
  for (int64_t h0 = 0; h0 < group; h0 += 4) {
    const int64_t tok = 16 / std::min<int64_t>(4, group - h0);
    calls += nkh * (n_tok / tok + n_tok % tok);
  }
  const int64_t per_call = (lines + calls - 1) / calls;
  for (int64_t k = 0; k < nkh; ++k) {
    for (int64_t h0 = 0; h0 < group; h0 += 4) {
      const int64_t h = k * group + h0;
      const c10::BFloat16* qh = qs + h * d;
      float* sh = s + h * s_stride;
      const C* kr = k0 + k * rw;
      switch (std::min<int64_t>(4, group - h0)) {
        case 1: group_dots_bf16<1, C>(qh, d, kr, ts, n_tok, sh, s_stride, scale, prefetch, per_call); break;
        case 2: group_dots_bf16<2, C>(qh, d, kr, ts, n_tok, sh, s_stride, scale, prefetch, per_call); break;
        case 3: group_dots_bf16<3, C>(qh, d, kr, ts, n_tok, sh, s_stride, scale, prefetch, per_call); break;
        default: group_dots_bf16<4, C>(qh, d, kr, ts, n_tok, sh, s_stride, scale, prefetch, per_call);
      }
    }
  }
}

// acc_h (pair order) += sum over t < n_tok of pw[h * p_stride + t] * v_t for HG heads sharing
// one kv head, v_t = v0 + t * ts; CH chunks of 32 values at a time (2 * HG * CH accumulators).
template <int HG, int CH, typename C>
inline void group_values_bf16(float* acc, int64_t d, int64_t len, const C* v0,
                              int64_t ts, int64_t n_tok, const c10::BFloat16* pw,
                              int64_t p_stride) {
  static_assert(2 * HG * CH <= 16, "16 accumulators");
  // The loops over heads and chunks unrolled, so a, lo and hi live in registers only: gcc
  // kept a on the stack as well (the loops not unrolled), a store per multiply-add and a
  // reload in a chain (the kernel 1.03-1.04x on prompt rows; issue 11, fifty-second pass).
  int64_t c = 0;
  for (; c + 32 * CH <= len; c += 32 * CH) {
    __m512 a[2 * HG * CH];
    #pragma GCC unroll 16
    for (int h = 0; h < HG; ++h) {
      #pragma GCC unroll 16
      for (int j = 0; j < 2 * CH; ++j) a[h * 2 * CH + j] = _mm512_loadu_ps(acc + h * d + c + 16 * j);
    }
    for (int64_t t = 0; t < n_tok; t += 2) {
      __m512i lo[CH], hi[CH];
      #pragma GCC unroll 16
      for (int j = 0; j < CH; ++j) {
        const __m512i x = load32_bh(v0 + t * ts + c + 32 * j);
        // The last token of an odd count pairs with zeros (its weight's pair is 0 too, and the
        // row after it may be unwritten memory).
        const __m512i y = t + 1 < n_tok ? load32_bh(v0 + (t + 1) * ts + c + 32 * j)
                                        : _mm512_setzero_si512();
        lo[j] = _mm512_unpacklo_epi16(x, y);
        hi[j] = _mm512_unpackhi_epi16(x, y);
      }
      #pragma GCC unroll 16
      for (int h = 0; h < HG; ++h) {
        int32_t pair;
        std::memcpy(&pair, pw + h * p_stride + t, sizeof(pair));
        const __m512bh pp = (__m512bh)_mm512_set1_epi32(pair);
        #pragma GCC unroll 16
        for (int j = 0; j < CH; ++j) {
          __m512& al = a[h * 2 * CH + 2 * j];
          __m512& ah = a[h * 2 * CH + 2 * j + 1];
          al = _mm512_dpbf16_ps(al, (__m512bh)lo[j], pp);
          ah = _mm512_dpbf16_ps(ah, (__m512bh)hi[j], pp);
        }
      }
    }
    #pragma GCC unroll 16
    for (int h = 0; h < HG; ++h) {
      #pragma GCC unroll 16
      for (int j = 0; j < 2 * CH; ++j) _mm512_storeu_ps(acc + h * d + c + 16 * j, a[h * 2 * CH + j]);
    }
  }
  if constexpr (CH > 1) {
    if (c < len) group_values_bf16<HG, 1, C>(acc + c, d, len - c, v0 + c, ts, n_tok, pw, p_stride);
  }
}

template <typename C>
inline void block_values_bf16(float* acc, int64_t d, const C* v0, int64_t ts,
                              int64_t rw, int64_t n_tok, int64_t nkh, int64_t group,
                              const c10::BFloat16* pw, int64_t p_stride) {
  for (int64_t k = 0; k < nkh; ++k) {
    for (int64_t h0 = 0; h0 < group; h0 += 4) {
      const int64_t h = k * group + h0;
      float* ah = acc + h * d;
      const c10::BFloat16* ph = pw + h * p_stride;
      const C* vr = v0 + k * rw;
      switch (std::min<int64_t>(4, group - h0)) {
        case 1: group_values_bf16<1, 4, C>(ah, d, d, vr, ts, n_tok, ph, p_stride); break;
        case 2: group_values_bf16<2, 2, C>(ah, d, d, vr, ts, n_tok, ph, p_stride); break;
        case 3: group_values_bf16<3, 2, C>(ah, d, d, vr, ts, n_tok, ph, p_stride); break;
        default: group_values_bf16<4, 2, C>(ah, d, d, vr, ts, n_tok, ph, p_stride);
      }
    }
  }
}

// dst[0..d) = src[0..d) * mul, src in pair order: per chunk of 32 values, its first 16
// float32 lanes hold values 8L + e and the next 16 values 8L + 4 + e (lane 4L + e, L < 4, e < 4).
inline void store_from_pairs(const float* src, c10::BFloat16* dst, int64_t d, float mul) {
  // Output value 8L + e comes from lane 4L + e of the first vector, 8L + 4 + e from lane 4L + e
  // of the second (index 16 + ...): two permutes put 32 values back in order.
  const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const __m512 mv = _mm512_set1_ps(mul);
  for (int64_t c = 0; c < d; c += 32) {
    const __m512 a = _mm512_loadu_ps(src + c), b = _mm512_loadu_ps(src + c + 16);
    const __m512 first = _mm512_mul_ps(_mm512_permutex2var_ps(a, lo, b), mv);
    const __m512 second = _mm512_mul_ps(_mm512_permutex2var_ps(a, hi, b), mv);
    _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(second, first));
  }
}
#endif

// exp(x) for x <= 0 (scores minus their running max), relative error ~2e-7: 2^t split into
// 2^floor(t) (exponent bits) times a degree-6 polynomial of 2^frac(t). Branch-free so the loop
// over a block's tokens vectorizes. The scalar, 16-lane and 8-lane forms share these constants.
constexpr float kExpMin = -87.0f;  // below this exp(x) is under float's normal range: ~0
constexpr float kLog2e = 1.44269504088896341f;
// 2^f on [0, 1), highest degree first (Horner).
constexpr float kExp2Poly[7] = {1.535336188319500e-4f, 1.339887440266574e-3f,
                                9.618437357674640e-3f, 5.550332471162809e-2f,
                                2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};

inline float exp_nonpositive(float x) {
  x = std::max(x, kExpMin);
  const float t = x * kLog2e;
  const float fi = std::floor(t);
  const float f = t - fi;
  float p = kExp2Poly[0];
  for (int j = 1; j < 7; ++j) p = p * f + kExp2Poly[j];
  const int32_t e = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

#if defined(__AVX512F__)
// exp_nonpositive on 16 lanes: the same steps (floor, the same polynomial, the exponent bits).
// gcc left the `omp simd` loop over a block's scores scalar (the float -> int bit cast).
inline __m512 exp16_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(kLog2e));
  const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, fi);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int j = 1; j < 7; ++j) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[j]));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(fi), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

#if defined(CARPOOL_AVX2)
// exp_nonpositive on 8 lanes (exp16_nonpositive's steps).
inline __m256 exp8_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(kLog2e));
  const __m256 fi = _mm256_round_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, fi);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int j = 1; j < 7; ++j) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[j]));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(fi), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// sh[t] = exp(sh[t] - mx) for t < n; returns their sum.
#if defined(__AVX512F__)
// The first min(count, 16) lanes (count >= 1): a chunk of 16 at the tail of a row.
inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1);
}
#endif

inline float exp_block(float* sh, int64_t n, float mx) {
  float sum = 0.0f;
  int64_t t = 0;
#if defined(__AVX512F__)
  const __m512 m = _mm512_set1_ps(mx);
  for (; t < n; t += 16) {
    const __mmask16 k = first_lanes(n - t);
    const __m512 p = exp16_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sh + t), m));
    _mm512_mask_storeu_ps(sh + t, k, p);
    sum += _mm512_mask_reduce_add_ps(k, p);
  }
#elif defined(CARPOOL_AVX2)
  const __m256 m = _mm256_set1_ps(mx);
  __m256 total = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 p = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sh + t), m));
    _mm256_storeu_ps(sh + t, p);
    total = _mm256_add_ps(total, p);
  }
  sum = hsum8(total);
#endif
  for (; t < n; ++t) {
    const float p = exp_nonpositive(sh[t] - mx);
    sh[t] = p;
    sum += p;
  }
  return sum;
}

#if defined(__AVX512BF16__)
// The softmax step of the dot-product loops for one head and one block of n scores sh: the
// running max m grows (acc_h[0..d) and l rescaled when it does), the weights
// p_t = exp(s_t - m) rounded to bfloat16 into pw[0..n) (times mul[t] where mul is given: an
// int8 cache's V row scales), zeros up to the next multiple of 16, and l += their sum (of the
// rounded weights without mul, so they sum to one as the value sums take them; of p with it).
// One pass of whole-vector loads and stores for a block of 16: the scores were just written
// by scalar stores and masked loads of them do not forward on AMD (measured: the separate
// max / exp / round passes were a quarter of the kernel).
inline void softmax_weights_bf16(const float* sh, int64_t n, float& m, float& l, float* ah,
                                 int64_t d, const float* mul, c10::BFloat16* pw) {
  auto chunk = [&](int64_t t) {
    return n - t >= 16 ? _mm512_loadu_ps(sh + t)
                       : _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                              first_lanes(n - t), sh + t);
  };
  const __m512 mo = _mm512_set1_ps(m);
  __m512 mv = mo;
  for (int64_t t = 0; t < n; t += 16) mv = _mm512_max_ps(mv, chunk(t));
  // The block's max reduced only where a score exceeds the running max (after the first
  // blocks, rarely): else it is m, bit for bit, without the reduction's chain before the
  // weights (the kernel 1.00-1.08x on prompt rows; issue 11, fifty-second pass).
  float mx = m;
  if (_mm512_cmp_ps_mask(mv, mo, _CMP_GT_OQ) != 0) mx = _mm512_reduce_max_ps(mv);
  if (mx > m) {
    const float corr = exp_nonpositive(m - mx);  // ~0 on the first block
    l *= corr;
    for (int64_t i = 0; i < d; ++i) ah[i] *= corr;
    m = mx;
  }
  const __m512 mb = _mm512_set1_ps(mx);
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = first_lanes(n - t);
    __m512 p = _mm512_maskz_mov_ps(k, exp16_nonpositive(_mm512_sub_ps(chunk(t), mb)));
    if (mul != nullptr) {
      total = _mm512_add_ps(total, p);
      p = _mm512_mul_ps(p, _mm512_maskz_loadu_ps(k, mul + t));
    }
    const __m256i b = (__m256i)_mm512_cvtneps_pbh(p);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pw + t), b);
    if (mul == nullptr) {
      total = _mm512_add_ps(total, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
    }
  }
  l += _mm512_reduce_add_ps(total);
}
#endif

#if defined(__AVX512F__) || defined(CARPOOL_AVX2)
// Scores over a bfloat16 cache's keys in pair-major order (kv_layout.py): pair p of a block's
// tokens t0..t0+15 is one 64-byte line at kp + (p * block_size + t0) * 2, so one instruction
// adds pair p's products to 16 tokens' scores (8 with AVX2) and a block's scores come out as
// vectors, with no reduction tree (the rows' loops above spent about as many instructions
// reducing 16 scores as multiplying). A tail of fewer tokens is read and stored under a mask.

// Accumulators per query head: each is a chain of one dependent instruction a pair, and at
// least 8 chains in all hide the multiply-add's latency.
template <int HG>
constexpr int kPairChains = HG == 1 ? 8 : HG == 2 ? 4 : HG == 3 ? 3 : 2;

// The pair loops' vectors: 16 tokens (AVX-512) or 8 (AVX2 + FMA: an AMD Zen 2/3), a tail of
// n < N tokens loaded and stored under a mask.
#if defined(CARPOOL_AVX2)
struct PairLanes {
  using V = __m256;
  using I = __m256i;
  static constexpr int64_t N = 8;
  static __m256i mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static I load(const c10::BFloat16* p, int64_t n) {
    const int* at = reinterpret_cast<const int*>(p);
    return n >= N ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at))
                  : _mm256_maskload_epi32(at, mask(n));
  }
  static void store(float* p, int64_t n, V v) {
    if (n >= N) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, mask(n), v);
    }
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, float b) { return _mm256_mul_ps(a, _mm256_set1_ps(b)); }
  static V fmadd(V a, float b, V c) { return _mm256_fmadd_ps(a, _mm256_set1_ps(b), c); }
  static V even(I x) { return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)); }
  static V odd(I x) {
    return _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};
#else
struct PairLanes {
  using V = __m512;
  using I = __m512i;
  static constexpr int64_t N = 16;
  static I load(const c10::BFloat16* p, int64_t n) {
    return _mm512_maskz_loadu_epi32(first_lanes(n), p);
  }
  static void store(float* p, int64_t n, V v) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
  static V zero() { return _mm512_setzero_ps(); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, float b) { return _mm512_mul_ps(a, _mm512_set1_ps(b)); }
  static V fmadd(V a, float b, V c) { return _mm512_fmadd_ps(a, _mm512_set1_ps(b), c); }
  static V even(I x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
  static V odd(I x) {
    return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};
#endif

// s[h * s_stride + t] (t < n_tok) = mul * (q_h . k_t) for HG query heads of one kv head,
// PairLanes::N tokens at a time: pair p's key pairs (one load) go through prep once, then
// add(acc, w, h, p) adds head h's products into acc, chain p % A; the chains are summed in
// order at the end. prefetch(per) after each pair: the next block's lines asked for a few at
// a time (once per round of A pairs or once per 16 tokens, 4-8 times as many at once, was
// 0.76-0.93x on MHA at batch 1-8 against asking per pair).
template <int HG, typename Prep, typename Add, typename Prefetch>
inline void pair_dots(const c10::BFloat16* kp, int64_t d, int64_t block_size, int64_t n_tok,
                      float* s, int64_t s_stride, float mul, Prep&& prep, Add&& add,
                      Prefetch& prefetch, int64_t per) {
  using L = PairLanes;
  constexpr int A = kPairChains<HG>;
  const int64_t pairs = d / 2;
  // The prefetcher's state in a local for the run (registers), handed back after: see
  // paged_attention.cpp's LinePrefetch.
  Prefetch pf = prefetch;
  for (int64_t t0 = 0; t0 < n_tok; t0 += L::N) {
    const int64_t n = n_tok - t0;  // tokens from t0 (a tail where under N)
    const c10::BFloat16* k0 = kp + t0 * 2;
    typename L::V acc[HG * A];
    #pragma GCC unroll 16
    for (int j = 0; j < HG * A; ++j) acc[j] = L::zero();
    int64_t p = 0;
    for (; p + A <= pairs; p += A) {
      #pragma GCC unroll 16
      for (int a = 0; a < A; ++a) {
        const auto w = prep(L::load(k0 + (p + a) * block_size * 2, n));
        #pragma GCC unroll 16
        for (int h = 0; h < HG; ++h) add(acc[h * A + a], w, h, p + a);
        pf(per);
      }
    }
    // The last pairs (pairs not a multiple of A): chain a still takes pair p + a. Indices known
    // at compile time, so acc stays in registers: a loop over a runtime index made gcc keep
    // the whole array on the stack, a store and a load in every chain's step (the kernel
    // 1.11-1.18x on prompt rows of groups of 3 and 4 heads without them, the same bits;
    // BENCHMARKS.md, issue 11, fifty-second pass).
    #pragma GCC unroll 16
    for (int a = 0; a < A; ++a) {
      if (p + a < pairs) {
        const auto w = prep(L::load(k0 + (p + a) * block_size * 2, n));
        #pragma GCC unroll 16
        for (int h = 0; h < HG; ++h) add(acc[h * A + a], w, h, p + a);
      }
    }
    #pragma GCC unroll 16
    for (int h = 0; h < HG; ++h) {
      typename L::V sum = acc[h * A];
      #pragma GCC unroll 16
      for (int a = 1; a < A; ++a) sum = L::add(sum, acc[h * A + a]);
      L::store(s + h * s_stride + t0, n, L::mul(sum, mul));
    }
  }
  prefetch = pf;
}

// float32 queries (rows qs + h * d, scaled already): a pair's tokens widened to their even and
// odd values, two FMAs a head.
template <int HG, typename Prefetch>
inline void pair_dots_f32(const float* qs, int64_t d, const c10::BFloat16* kp,
                          int64_t block_size, int64_t n_tok, float* s, int64_t s_stride,
                          Prefetch& prefetch, int64_t per) {
  using L = PairLanes;
  struct Wide {
    L::V even, odd;
  };
  pair_dots<HG>(
      kp, d, block_size, n_tok, s, s_stride, 1.0f,
      [](L::I kv) { return Wide{L::even(kv), L::odd(kv)}; },
      [&](L::V& acc, const Wide& w, int h, int64_t p) {
        const float* q = qs + h * d + 2 * p;
        acc = L::fmadd(w.even, q[0], acc);
        acc = L::fmadd(w.odd, q[1], acc);
      },
      prefetch, per);
}

#if defined(__AVX512BF16__)
// bfloat16 queries (rows qs + h * d, unscaled): VDPBF16PS adds both of a pair's products to
// 16 tokens' scores in one instruction; the sums scaled at the end.
template <int HG, typename Prefetch>
inline void pair_dots_bf16(const c10::BFloat16* qs, int64_t d, const c10::BFloat16* kp,
                           int64_t block_size, int64_t n_tok, float* s, int64_t s_stride,
                           float scale, Prefetch& prefetch, int64_t per) {
  pair_dots<HG>(
      kp, d, block_size, n_tok, s, s_stride, scale, [](__m512i kv) { return (__m512bh)kv; },
      [&](__m512& acc, __m512bh kv, int h, int64_t p) {
        int32_t w;
        std::memcpy(&w, qs + h * d + 2 * p, sizeof(w));
        acc = _mm512_dpbf16_ps(acc, kv, (__m512bh)_mm512_set1_epi32(w));
      },
      prefetch, per);
}
#endif

// Scores of one block for a run's query heads (rows qs + h * d; kv head k's group of `group`
// heads from row k * group, in sub-groups of at most 4) over a bfloat16 cache's pair-major
// keys (kv head k's at k0 + k * region): float32 queries scaled already, or bfloat16 ones
// (AVX-512 BF16 builds) scaled here. prefetch(n) asks for the next n cache lines of the next
// block, `lines` of them in all, spread over the pairs. Always inlined into the kernel: with
// the prefetcher a struct (paged_attention.cpp's LinePrefetch) gcc made it a call in the AVX2
// build, its prompt rows then 0.84-0.94x (inlined: 1.03-1.08x; issue 11, fifty-third pass).
template <typename Q, typename Prefetch>
[[gnu::always_inline]] inline void block_pair_dots(const Q* qs, int64_t d,
                                                   const c10::BFloat16* k0, int64_t region,
                                                   int64_t block_size, int64_t n_tok,
                                                   int64_t nkh, int64_t group, float* s,
                                                   int64_t s_stride, [[maybe_unused]] float scale,
                                                   Prefetch& prefetch, int64_t lines) {
  static_assert(std::is_same<Q, float>::value || std::is_same<Q, c10::BFloat16>::value, "");
  const int64_t chunks = (n_tok + PairLanes::N - 1) / PairLanes::N;
  const int64_t calls = nkh * ((group + 3) / 4) * chunks * (d / 2);  // pairs in the block
  const int64_t per = (lines + calls - 1) / calls;
  for (int64_t k = 0; k < nkh; ++k) {
    const c10::BFloat16* kp = k0 + k * region;
    for (int64_t h0 = 0; h0 < group; h0 += 4) {
      const int64_t h = k * group + h0;
      const Q* qh = qs + h * d;
      float* sh = s + h * s_stride;
      const int64_t hg = std::min<int64_t>(4, group - h0);
      if constexpr (std::is_same<Q, float>::value) {
        switch (hg) {
          case 1: pair_dots_f32<1>(qh, d, kp, block_size, n_tok, sh, s_stride, prefetch, per); break;
          case 2: pair_dots_f32<2>(qh, d, kp, block_size, n_tok, sh, s_stride, prefetch, per); break;
          case 3: pair_dots_f32<3>(qh, d, kp, block_size, n_tok, sh, s_stride, prefetch, per); break;
          default: pair_dots_f32<4>(qh, d, kp, block_size, n_tok, sh, s_stride, prefetch, per);
        }
      } else {
#if defined(__AVX512BF16__)
        switch (hg) {
          case 1: pair_dots_bf16<1>(qh, d, kp, block_size, n_tok, sh, s_stride, scale, prefetch, per); break;
          case 2: pair_dots_bf16<2>(qh, d, kp, block_size, n_tok, sh, s_stride, scale, prefetch, per); break;
          case 3: pair_dots_bf16<3>(qh, d, kp, block_size, n_tok, sh, s_stride, scale, prefetch, per); break;
          default: pair_dots_bf16<4>(qh, d, kp, block_size, n_tok, sh, s_stride, scale, prefetch, per);
        }
#endif
      }
    }
  }
}
#endif

}  // namespace carpool_kernels
