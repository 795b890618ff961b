// Fused elementwise operators of a decoder layer (CPU): RMSNorm, residual add + RMSNorm, and
// SwiGLU's silu(gate) * up.
//
// Why: each is 4-6 torch ops (casts, pow, mean, rsqrt, muls) of a few microseconds of dispatch
// each plus a temporary per op; at batch 1 a 512-wide norm took ~20 us through torch, most of it
// overhead, 17 times a step on an 8-layer model. Here each is one pass over the rows.
//
// Numerics are those of the torch ops they replace, roundings included: the norm is computed in
// float32 from the input, rounded to the input dtype *before* the weight multiply (as the HF
// reference does), then multiplied by the weight and rounded again; the residual sum is rounded
// to the input dtype before it is normalised; silu(gate) is rounded before the multiply by up.
// Only the order of the float32 sum of squares differs from torch's (a value within ~1e-7 of a
// bf16 rounding boundary may round the other way: one ulp, rarely).
//
// And argmax_rows, the greedy sampler's argmax; rotary_, the rotary embedding in place;
// int8_gemv, int8 weight-only products of a few rows; int8_logits and int8_logits_at, an int8
// vocabulary head's float32 logits; int4_gemv, int4 ones; int4_logits and int4_logits_at, an
// int4 head's float32 logits; int4_widen, an int4 weight widened to bf16 for a prefill.
//
// Registered as carpool::rms_norm, carpool::add_rms_norm, carpool::silu_and_mul and
// carpool::argmax_rows, carpool::rotary_, carpool::int8_gemv, carpool::int8_logits,
// carpool::int8_logits_at, carpool::int4_gemv, carpool::int4_logits, carpool::int4_logits_at,
// carpool::int4_widen (a fragment of the `carpool` operator library;
// no pybind11).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "amx_tiles.h"
#include "int4_vnni.h"
#include "shared_ranges.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
// torch's own vector exp (libtorch_cpu exports it): a float32 SwiGLU in torch's bits.
#include <sleef.h>
#endif

namespace {

using carpool_kernels::RangeTaker;
using carpool_kernels::run_shared_items;
#if defined(__AVX512F__)
using carpool_kernels::exp16_nonpositive;
#endif
using carpool_kernels::exp_nonpositive;

// Element access in float32 for float and bfloat16 storage (loads are vec_math's to_float); the
// bfloat16 rounding is plain bit operations so that gcc vectorizes the scalar loops.
template <typename T>
struct Elt;

template <>
struct Elt<float> {
  static float load(const float* p, int64_t i) { return carpool_kernels::to_float(p[i]); }
  static void store(float* p, int64_t i, float v) { p[i] = v; }
  static float round(float v) { return v; }
};

template <>
struct Elt<c10::BFloat16> {
  static float load(const c10::BFloat16* p, int64_t i) { return carpool_kernels::to_float(p[i]); }
  // Round to nearest even, as c10::BFloat16(float) does for finite values.
  static uint16_t narrow(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
  }
  static void store(c10::BFloat16* p, int64_t i, float v) {
    reinterpret_cast<uint16_t*>(p)[i] = narrow(v);
  }
  static float round(float v) {
    const uint32_t bits = static_cast<uint32_t>(narrow(v)) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
};

// Rows per parallel chunk: at least ~32k elements each, so a decode step's few rows run inline
// on the calling thread (an OpenMP region costs more than the work).
inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, width)); }

#if defined(__AVX512F__)
// Sixteen lanes of the scalar code below, for the loops gcc leaves scalar (floor, the bit casts).
using carpool_kernels::load16;  // float32 / bfloat16 -> 16 float32 lanes

// Round to nearest even at bfloat16's 8 bits, kept as the top half of a float32 (Elt::round).
inline __m512i bf16_bits(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
}

inline __m512 round16(__m512 v, float) { return v; }
inline __m512 round16(__m512 v, c10::BFloat16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
}

#endif

#if defined(CARPOOL_AVX2)
// The same helpers on 8 lanes (AVX2 + FMA without AVX-512).
using carpool_kernels::hsum8;
using carpool_kernels::load8;  // float32 / bfloat16 / int8 -> 8 float32 lanes

inline __m256i bf16_bits8(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

inline __m256 round8(__m256 v, float) { return v; }
inline __m256 round8(__m256 v, c10::BFloat16) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i b = bf16_bits8(v);  // 8 values below 2^16: pack them to 16 bits, in order
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#endif

template <typename T>
void norm_rows(const T* x, const T* res, const T* w, T* out, T* sum, int64_t rows, int64_t h,
               float eps) {
  using E = Elt<T>;
  at::parallel_for(0, rows, grain_rows(h), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * h;
      T* outr = out + r * h;
      float ss = 0.f;
      int64_t i = 0;
      if (res != nullptr) {
        const T* rr = res + r * h;
        T* sr = sum + r * h;
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        for (; i + 16 <= h; i += 16) {
          const __m512 s16 = round16(_mm512_add_ps(load16(xr + i), load16(rr + i)), T());
          store16(sr + i, s16);
          acc = _mm512_fmadd_ps(s16, s16, acc);
        }
        ss = _mm512_reduce_add_ps(acc);
#elif defined(CARPOOL_AVX2)
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= h; i += 8) {
          const __m256 s8 = round8(_mm256_add_ps(load8(xr + i), load8(rr + i)), T());
          store8(sr + i, s8);
          acc = _mm256_fmadd_ps(s8, s8, acc);
        }
        ss = hsum8(acc);
#endif
        for (; i < h; ++i) {
          const float s1 = E::round(E::load(xr, i) + E::load(rr, i));
          E::store(sr, i, s1);
          ss += s1 * s1;
        }
        xr = sr;
      } else {
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        for (; i + 16 <= h; i += 16) {
          const __m512 v = load16(xr + i);
          acc = _mm512_fmadd_ps(v, v, acc);
        }
        ss = _mm512_reduce_add_ps(acc);
#elif defined(CARPOOL_AVX2)
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= h; i += 8) {
          const __m256 v = load8(xr + i);
          acc = _mm256_fmadd_ps(v, v, acc);
        }
        ss = hsum8(acc);
#endif
        for (; i < h; ++i) {
          const float f = E::load(xr, i);
          ss += f * f;
        }
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
      i = 0;
#if defined(__AVX512F__)
      const __m512 vinv = _mm512_set1_ps(inv);
      for (; i + 16 <= h; i += 16)
        store16(outr + i, _mm512_mul_ps(load16(w + i), round16(_mm512_mul_ps(load16(xr + i), vinv), T())));
#elif defined(CARPOOL_AVX2)
      const __m256 vinv = _mm256_set1_ps(inv);
      for (; i + 8 <= h; i += 8)
        store8(outr + i, _mm256_mul_ps(load8(w + i), round8(_mm256_mul_ps(load8(xr + i), vinv), T())));
#endif
      for (; i < h; ++i) E::store(outr, i, E::load(w, i) * E::round(E::load(xr, i) * inv));
    }
  });
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "rms_norm: x must be contiguous, got strides ",
              x.strides());
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(-1),
              "rms_norm: weight of shape [", x.size(-1), "] expected, got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight dtypes differ (",
              x.scalar_type(), " vs ", weight.scalar_type(), ")");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rms_norm: float32 or bfloat16, got ", x.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  at::Tensor out = at::empty_like(x);
  const int64_t h = x.size(-1);
  const int64_t rows = h == 0 ? 0 : x.numel() / h;
  if (x.scalar_type() == at::kFloat) {
    norm_rows<float>(x.data_ptr<float>(), nullptr, weight.data_ptr<float>(), out.data_ptr<float>(),
                     nullptr, rows, h, static_cast<float>(eps));
  } else {
    using B = c10::BFloat16;
    norm_rows<B>(x.data_ptr<B>(), nullptr, weight.data_ptr<B>(), out.data_ptr<B>(), nullptr, rows,
                 h, static_cast<float>(eps));
  }
  return out;
}

// (norm(x + residual) * weight, x + residual): the residual stream's add fused into the norm.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.is_contiguous() &&
                  residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x (", x.sizes(), ", ", x.scalar_type(), "), got ",
              residual.sizes(), ", ", residual.scalar_type());
  at::Tensor out = at::empty_like(x);
  at::Tensor sum = at::empty_like(x);
  const int64_t h = x.size(-1);
  const int64_t rows = h == 0 ? 0 : x.numel() / h;
  if (x.scalar_type() == at::kFloat) {
    norm_rows<float>(x.data_ptr<float>(), residual.data_ptr<float>(), weight.data_ptr<float>(),
                     out.data_ptr<float>(), sum.data_ptr<float>(), rows, h, static_cast<float>(eps));
  } else {
    using B = c10::BFloat16;
    norm_rows<B>(x.data_ptr<B>(), residual.data_ptr<B>(), weight.data_ptr<B>(), out.data_ptr<B>(),
                 sum.data_ptr<B>(), rows, h, static_cast<float>(eps));
  }
  return {out, sum};
}

#if defined(__AVX512F__)
template <typename T>
inline void silu_mul16(const T* g, const T* u, T* o) {
  const __m512 x = load16(g);
  const __m512 ax = _mm512_castsi512_ps(
      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
  const __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), ax));
  const __mmask16 nonneg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 num = _mm512_mask_blend_ps(nonneg, e, _mm512_set1_ps(1.0f));
  const __m512 sig = _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __m512 s = round16(_mm512_mul_ps(x, sig), T());
  store16(o, _mm512_mul_ps(s, load16(u)));
}
#elif defined(CARPOOL_AVX2)
// silu_mul16's steps on 8 lanes: the scalar loop below stayed scalar (the exp's floor and bit
// casts): 1.4 ms of the small model's 32-row bf16 step on a Zen 2, 0.34 ms this way (the same
// bits; benchmarks/ab_bf16_linear.py --op silu_and_mul).
template <typename T>
inline void silu_mul8(const T* g, const T* u, T* o) {
  const __m256 x = load8(g);
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 e = carpool_kernels::exp8_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), ax));
  const __m256 nonneg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
  const __m256 num = _mm256_blendv_ps(e, _mm256_set1_ps(1.0f), nonneg);
  const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 s = round8(_mm256_mul_ps(x, sig), T());
  store8(o, _mm256_mul_ps(s, load8(u)));
}
#endif

// row(g, u, o) for each row of a [rows, 2 * half] gate_up (gate, then up) and its [rows, half]
// output, rows split over the threads.
template <typename T, typename Row>
void swiglu_rows(const T* gu, T* out, int64_t rows, int64_t half, Row row) {
  at::parallel_for(0, rows, grain_rows(2 * half), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gu + r * 2 * half;
      row(g, g + half, out + r * half);
    }
  });
}

template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t half) {
  using E = Elt<T>;
  swiglu_rows(gu, out, rows, half, [&](const T* g, const T* u, T* o) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= half; i += 16) silu_mul16(g + i, u + i, o + i);
#elif defined(CARPOOL_AVX2)
    for (; i + 8 <= half; i += 8) silu_mul8(g + i, u + i, o + i);
#endif
    for (; i < half; ++i) {
      const float x = E::load(g, i);
      // sigmoid(x) from exp(-|x|) only: no overflow for either sign.
      const float e = exp_nonpositive(-std::fabs(x));
      const float sig = (x >= 0.f ? 1.f : e) / (1.f + e);
      E::store(o, i, E::round(x * sig) * E::load(u, i));
    }
  });
}

// A float32 SwiGLU in torch's bits: silu as torch's CPU kernel computes it, x / (1 + exp(-x)),
// its vectors' exp Sleef's (what at::vec::Vectorized<float>::exp calls: Sleef_expf16_u10 with
// AVX-512, Sleef_expf8_u10 with AVX2) and a row's elements past its last pair of vectors
// through std::exp (torch's scalar loop's), then times up. Where torch dispatches to the same
// instruction set, the bits of torch's F.silu(gate) * up (fused_ops.silu_and_mul checks that
// once before it takes this); the polynomial exp of the bf16 path (~2e-7 from torch's) flipped
// the default model's greedy answer to "What is the capital of France?" in float32.
inline float silu_mul_torch(float x, float u) { return x / (1.0f + std::exp(-x)) * u; }

void silu_mul_rows_torch(const float* gu, float* out, int64_t rows, int64_t half) {
#if defined(__AVX512F__)
  constexpr int64_t kLanes = 16;
#elif defined(__AVX2__)
  constexpr int64_t kLanes = 8;
#else
  constexpr int64_t kLanes = 1;
#endif
  // torch's vector loop takes two vectors a step; the rest of a row is its scalar loop's.
  const int64_t vectors_end = kLanes == 1 ? 0 : half / (2 * kLanes) * (2 * kLanes);
  swiglu_rows(gu, out, rows, half, [&](const float* g, const float* u, float* o) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i < vectors_end; i += kLanes) {
      const __m512 x = _mm512_loadu_ps(g + i);
      const __m512 e = Sleef_expf16_u10(_mm512_xor_ps(_mm512_set1_ps(-0.0f), x));
      const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
      _mm512_storeu_ps(o + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
    }
#elif defined(__AVX2__)
    for (; i < vectors_end; i += kLanes) {
      const __m256 x = _mm256_loadu_ps(g + i);
      const __m256 e = Sleef_expf8_u10(_mm256_xor_ps(_mm256_set1_ps(-0.0f), x));
      const __m256 s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < half; ++i) o[i] = silu_mul_torch(g[i], u[i]);
  });
}

// silu(gate_up[..., :I]) * gate_up[..., I:] for the fused gate/up projection's output.
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0,
              "silu_and_mul: contiguous [..., 2 * I] expected, got ", gate_up.sizes());
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "silu_and_mul: float32 or bfloat16, got ", gate_up.scalar_type());
  const int64_t half = gate_up.size(-1) / 2;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = half;
  at::Tensor out = at::empty(sizes, gate_up.options());
  const int64_t rows = half == 0 ? 0 : gate_up.numel() / (2 * half);
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_rows_torch(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, half);
  } else {
    using B = c10::BFloat16;
    silu_mul_rows<B>(gate_up.data_ptr<B>(), out.data_ptr<B>(), rows, half);
  }
  return out;
}

// Index of each row's largest value (the first one; a NaN counts as larger than everything,
// the first NaN wins), as torch's max(-1).indices: the greedy sampler's argmax over a step's
// float32 logits, which torch's reduction does at ~1 element per ns (1.3 ms for 32 x 32000).
// Both passes (the max, then its first index) in vectors: SmolLM2's 49,152 logits 48 -> 11 us
// for one row, 867 -> 128 us for 32, on a 2-core Zen 2 (issue 11, twenty-eighth pass).
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "argmax_rows: a contiguous non-empty [R, V] float32 tensor expected, got ",
              x.sizes(), " ", x.scalar_type());
  const int64_t rows = x.size(0), v = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, grain_rows(v), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * v;
      float m = -std::numeric_limits<float>::infinity();
      bool nan = false;
      int64_t i = 0;
#if defined(__AVX512F__)
      __m512 vm = _mm512_set1_ps(m);
      __mmask16 unordered = 0;
      for (; i + 16 <= v; i += 16) {
        const __m512 a = _mm512_loadu_ps(xr + i);
        unordered |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        vm = _mm512_max_ps(vm, a);
      }
      m = _mm512_reduce_max_ps(vm);
      nan = unordered != 0;
#elif defined(CARPOOL_AVX2)
      // (The scalar loop below stays scalar: std::max's NaN order forbids gcc to vectorize it;
      // SmolLM2's 49,152 logits took ~55 us a row that way on a Zen 2.) The max of the lanes
      // is the row's max whatever their order: NaNs are tracked apart, and their max lane
      // values are ignored then.
      __m256 vm = _mm256_set1_ps(m), unordered = _mm256_setzero_ps();
      for (; i + 8 <= v; i += 8) {
        const __m256 a = _mm256_loadu_ps(xr + i);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        vm = _mm256_max_ps(vm, a);
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vm);
      for (float l : lanes) m = std::max(m, l);
      nan = _mm256_movemask_ps(unordered) != 0;
#endif
      for (; i < v; ++i) {
        nan |= std::isnan(xr[i]);
        m = std::max(m, xr[i]);
      }
      int64_t best = -1, j = 0;
#if defined(__AVX2__)
      // The first lane equal to the max (or unordered, for a NaN), 8 at a time (scalar, the
      // search took ~35 of the 48 us of a 49,152-logit row on a Zen 2).
      const __m256 target = _mm256_set1_ps(m);
      for (; best < 0 && j + 8 <= v; j += 8) {
        const __m256 a = _mm256_loadu_ps(xr + j);
        const int hits = _mm256_movemask_ps(nan ? _mm256_cmp_ps(a, a, _CMP_UNORD_Q)
                                                : _mm256_cmp_ps(a, target, _CMP_EQ_OQ));
        if (hits != 0) best = j + __builtin_ctz(static_cast<unsigned>(hits));
      }
#endif
      for (; best < 0 && j < v; ++j)
        if (nan ? std::isnan(xr[j]) : xr[j] == m) best = j;
      op[r] = best < 0 ? 0 : best;
    }
  });
  return out;
}

// Rotary embedding in place on x [T, H, D] (any row and head strides, the last dim contiguous:
// the q and k heads of the fused qkv projection's output) with the step's table cs [T, 2, D]
// of cos and sign-folded sin (layers.RotaryEmbedding.cos_sin): x = x * cos + roll(x, D/2) * sin.
// torch's three ops (roll, mul, addcmul) round x * cos to the dtype, then add the rolled
// product with one fused multiply-add and round once: the same roundings here (float32: bit
// for bit, tested).
template <typename T>
void rotary_rows(T* x, const T* cs, int64_t t_count, int64_t heads, int64_t d, int64_t st,
                 int64_t sh) {
  using E = Elt<T>;
  const int64_t half = d / 2;
  at::parallel_for(0, t_count, grain_rows(heads * d), [&](int64_t begin, int64_t end) {
    float buf[1024];
    for (int64_t t = begin; t < end; ++t) {
      const T* cos = cs + t * 2 * d;
      const T* sin = cos + d;
      for (int64_t h = 0; h < heads; ++h) {
        T* row = x + t * st + h * sh;
        for (int64_t i = 0; i < d; ++i) buf[i] = E::load(row, i);
        // torch's addcmul is one fused multiply-add onto the rounded x * cos: so is this (an
        // explicit fma, so the compiler cannot contract the other product instead). Two loops,
        // one per half, each with its partner a fixed distance away: the compiler vectorizes
        // them (one loop choosing the partner by index ran scalar: 30 us a call at 32 rows of
        // 20 heads of 64).
        for (int64_t i = 0; i < half; ++i) {
          const float a = E::round(buf[i] * E::load(cos, i));
          E::store(row, i, std::fma(buf[i + half], E::load(sin, i), a));
        }
        for (int64_t i = half; i < d; ++i) {
          const float a = E::round(buf[i] * E::load(cos, i));
          E::store(row, i, std::fma(buf[i - half], E::load(sin, i), a));
        }
      }
    }
  });
}

void rotary_(at::Tensor x, const at::Tensor& cs) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary_: x [T, H, D] with contiguous rows, got ",
              x.sizes(), " strides ", x.strides());
  const int64_t t = x.size(0), heads = x.size(1), d = x.size(2);
  TORCH_CHECK(d % 2 == 0 && d <= 1024, "rotary_: an even head_dim up to 1024, got ", d);
  TORCH_CHECK(cs.dim() == 3 && cs.is_contiguous() && cs.size(0) == t && cs.size(1) == 2 &&
                  cs.size(2) == d && cs.scalar_type() == x.scalar_type(),
              "rotary_: cs must be a contiguous [", t, ", 2, ", d, "] ", x.scalar_type(),
              " tensor, got ", cs.sizes(), " ", cs.scalar_type());
  if (x.scalar_type() == at::kFloat) {
    rotary_rows<float>(x.data_ptr<float>(), cs.data_ptr<float>(), t, heads, d, x.stride(0),
                       x.stride(1));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rotary_: float32 or bfloat16, got ",
                x.scalar_type());
    using B = c10::BFloat16;
    rotary_rows<B>(x.data_ptr<B>(), cs.data_ptr<B>(), t, heads, d, x.stride(0), x.stride(1));
  }
}

// y[M, N] = (x[M, K] @ q[N, K]^T) * scale[N] for int8 codes q and a few rows of x (decode), the
// products quant.Int8Linear needs at small batches (a GGUF file's Q8_0 vocabulary head, every
// matrix of an int8-quantized model). torch's _weight_int8pack_mm reads a weight that is not
// in cache at ~7 GB/s on 2 threads here (a 49152 x 576 head: 3.8 ms, against 1.8 ms when it is
// in L3): the rows are not fetched ahead. Here each thread walks its own contiguous share of
// the rows (four at a time with AVX-512, int8_tile; tiles of twelve with AVX2, int8_groups8),
// prefetching kPrefetchRows ahead, widens the codes to float32 and dots them with every input
// row while they are in registers. x and the scales in bfloat16, float32 sums, bfloat16 out, as
// the torch kernel.
#if defined(CARPOOL_AVX2)
constexpr int64_t kPrefetchRows = 12;  // one AVX2 tile (kTileRows below)
#else
constexpr int64_t kPrefetchRows = 8;
#endif

// Rounding of the inputs and outputs: to bf16 (int8_gemv: torch's bf16 kernel's values), or
// none (int8_logits: float32 x, float32 sums).
template <bool Exact>
inline float int8_out(float v) {
  return Exact ? v : Elt<c10::BFloat16>::round(v);
}

#if defined(__AVX512F__)
// The last k - i (< 16) codes of a row widened, zeros past them: the tail of a row takes the
// vector loop's lanes (a scalar tail's products were contracted into FMAs or not depending on
// how many input rows shared the loop, so a row's last bits depended on its neighbours).
inline __m512 int8_tail16(const int8_t* q, int64_t i, int64_t k) {
  alignas(16) int8_t buf[16] = {};
  std::memcpy(buf, q + i, static_cast<size_t>(k - i));
  const __m128i codes = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
}
#endif

#if defined(CARPOOL_AVX2)
// AVX2 (AMD Zen 2/3): the sums of J weight rows (qr, qr + k, ...) times M input rows, one
// 8-lane accumulator and one FMA chain per (weight row, input row) pair, K in order 8 codes at
// a time, then hsum8 and the last k % 8 products one by one. Every pair's sum takes these
// instructions whatever J and M are, so a row's result does not depend on the rows or columns
// beside it. J * M <= 12 accumulators: each widened weight vector feeds M FMAs and each input
// vector J. (Before: one weight row at a time against up to 4 input rows, two accumulators a
// pair: one input load per FMA, the codes widened again for every 4 input rows, and at one row
// the FMA's latency bounded the loop.) `ahead` (or null): J rows of a later tile, brought into
// cache over the loop.
template <int64_t J, int64_t M>
__attribute__((always_inline)) inline void int8_sums8(const float* xf, const int8_t* qr,
                                                      int64_t k, const char* ahead,
                                                      float (&out)[J][M]) {
  static_assert(J * M <= 12, "int8_sums8: at most 12 accumulators");
  __m256 acc[J][M];
  for (int64_t j = 0; j < J; ++j)
    for (int64_t m = 0; m < M; ++m) acc[j][m] = _mm256_setzero_ps();
  // Every vector loaded once into a register (the empty asm statements): gcc otherwise
  // folds an input's load into each FMA that uses it, and the loads bound the loop (Zen 2, one
  // block in L1, J = 2, M = 4: 7.2 cycles per 8 FMAs with the loads folded, 5.4 held).
  auto step = [&](int64_t i) __attribute__((always_inline)) {
    if constexpr (M <= 2) {  // the inputs held, one weight vector at a time
      __m256 xv[M];
      for (int64_t m = 0; m < M; ++m) {
        xv[m] = _mm256_loadu_ps(xf + m * k + i);
        asm("" : "+x"(xv[m]));
      }
      for (int64_t j = 0; j < J; ++j) {
        __m256 w = load8(qr + j * k + i);
        asm("" : "+x"(w));
        for (int64_t m = 0; m < M; ++m) acc[j][m] = _mm256_fmadd_ps(w, xv[m], acc[j][m]);
      }
    } else {  // the weights held, one input vector at a time
      __m256 w[J];
      for (int64_t j = 0; j < J; ++j) {
        w[j] = load8(qr + j * k + i);
        asm("" : "+x"(w[j]));
      }
      for (int64_t m = 0; m < M; ++m) {
        __m256 xv = _mm256_loadu_ps(xf + m * k + i);
        asm("" : "+x"(xv));
        for (int64_t j = 0; j < J; ++j) acc[j][m] = _mm256_fmadd_ps(w[j], xv, acc[j][m]);
      }
    }
  };
  // `ahead`'s J * k bytes as J lines per 64 codes: asked for once per 8 steps rather than
  // tested every step (a branch per step cost 10-15% of a 6-row product in cache).
  int64_t i = 0, line = 0;
  for (; i + 64 <= k; i += 64) {
    if (ahead != nullptr)
      for (int64_t l = 0; l < J; ++l) __builtin_prefetch(ahead + 64 * line++, 0, 3);
    for (int64_t u = 0; u < 64; u += 8) step(i + u);
  }
  for (; i + 8 <= k; i += 8) step(i);
  if (ahead != nullptr)  // the lines past those asked for in the loop
    for (; 64 * line < J * k; ++line) __builtin_prefetch(ahead + 64 * line, 0, 3);
  for (int64_t j = 0; j < J; ++j)
    for (int64_t m = 0; m < M; ++m) {
      float s = hsum8(acc[j][m]);
      for (int64_t t = i; t < k; ++t)  // one rounding per product, however the loop compiles
        s = std::fma(static_cast<float>(qr[j * k + t]), xf[m * k + t], s);
      out[j][m] = s;
    }
}
#endif

// Output column r (weight row qr) of M (1-4) input rows: xf (float32, bf16 values) and y start
// at the group's first row. Each row has its own accumulators and the same K order whatever M
// is, so a row's result does not depend on the rows beside it.
template <int64_t M, bool Exact, typename T>
inline void int8_row(const float* xf, const int8_t* qr, float sc, T* y, int64_t n, int64_t k,
                     int64_t r) {
  float acc[M];
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 va[M];
  for (int64_t m = 0; m < M; ++m) va[m] = _mm512_setzero_ps();
  for (; i + 16 <= k; i += 16) {
    const __m512 w = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + i))));
    for (int64_t m = 0; m < M; ++m) va[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(&xf[m * k + i]), va[m]);
  }
  if (i < k) {
    const __m512 w = int8_tail16(qr, i, k);
    const __mmask16 tail = carpool_kernels::first_lanes(k - i);
    for (int64_t m = 0; m < M; ++m)
      va[m] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(tail, &xf[m * k + i]), va[m]);
    i = k;
  }
  for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_reduce_add_ps(va[m]);
#elif defined(CARPOOL_AVX2)
  float s[1][M];
  int8_sums8<1, M>(xf, qr, k, nullptr, s);
  for (int64_t m = 0; m < M; ++m) acc[m] = s[0][m];
  i = k;
#else
  for (int64_t m = 0; m < M; ++m) acc[m] = 0.f;
#endif
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = i; j < k; ++j)  // one rounding per product, however the loop compiles
      acc[m] = std::fma(static_cast<float>(qr[j]), xf[m * k + j], acc[m]);
  for (int64_t m = 0; m < M; ++m) Elt<T>::store(y + m * n, r, int8_out<Exact>(acc[m] * sc));
}

#if defined(__AVX512F__)
// Weight rows per tile of int8_tile: one FMA chain per (weight row, input row) pair. A single
// row's chain (int8_row) waits on its FMA's latency every 16 codes, which made the one-row
// product compute-bound (2.8 cycles per 16 codes in L1 on a Zen 4, 19 GB/s from memory where
// the reads allow ~40); four rows' chains run at 1.6 cycles, and each x vector loaded feeds
// them all.
constexpr int64_t kTileRows = 4;

// Output columns r .. r + kTileRows - 1 (weight rows qr, qr + k, ...) of M (1-4) input rows:
// every (weight row, input row) pair keeps int8_row's accumulator, K order, tail and reduction,
// so the results are its bits. `ahead` (or null): a later tile's kTileRows * k contiguous codes,
// brought into cache one line per 16 codes here, spread over the loop (a burst of a whole
// tile's prefetches at its start overflowed the outstanding misses and ran slower).
template <int64_t M, bool Exact, typename T>
inline void int8_tile(const float* xf, const int8_t* qr, const c10::BFloat16* scale, T* y,
                      int64_t n, int64_t k, int64_t r, const char* ahead) {
  using E = Elt<c10::BFloat16>;
  __m512 va[kTileRows][M];
  for (int64_t j = 0; j < kTileRows; ++j)
    for (int64_t m = 0; m < M; ++m) va[j][m] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    if (ahead != nullptr) __builtin_prefetch(ahead + i * kTileRows, 0, 3);
    __m512 xv[M];
    for (int64_t m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(&xf[m * k + i]);
    for (int64_t j = 0; j < kTileRows; ++j) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + j * k + i))));
      for (int64_t m = 0; m < M; ++m) va[j][m] = _mm512_fmadd_ps(w, xv[m], va[j][m]);
    }
  }
  if (ahead != nullptr)  // the lines of the tile's codes past the last whole 16
    for (int64_t b = i * kTileRows; b < k * kTileRows; b += 64) __builtin_prefetch(ahead + b, 0, 3);
  if (i < k) {  // as int8_row's tail
    const __mmask16 tail = carpool_kernels::first_lanes(k - i);
    for (int64_t j = 0; j < kTileRows; ++j) {
      const __m512 w = int8_tail16(qr + j * k, i, k);
      for (int64_t m = 0; m < M; ++m)
        va[j][m] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(tail, &xf[m * k + i]), va[j][m]);
    }
  }
  for (int64_t j = 0; j < kTileRows; ++j) {
    const float sc = E::load(scale, r + j);
    for (int64_t m = 0; m < M; ++m)
      Elt<T>::store(y + m * n, r + j, int8_out<Exact>(_mm512_reduce_add_ps(va[j][m]) * sc));
  }
}

// Past this many input rows a tile's codes are widened once, into a float32 buffer in L1
// (int8_tile_widened), rather than in registers again for every group of four rows; for K up
// to kTileWidenedMaxK, where the buffer and a group's four input rows fit in L1 together. On a
// Zen 4 (32 KiB L1), int8_logits against int8_tile alone, 8 / 16 / 32 rows, one thread: K =
// 512-576 1.05-1.34x; K = 1024 0.86 / 1.32 / 1.49x; K = 2048 0.76 / 0.89 / 1.05x; K = 4096 0.72 /
// 0.89 / 1.00x (issue 11, thirty-fifth pass).
constexpr int64_t kTileDirectRows = 4;
constexpr int64_t kTileWidenedMaxK = 768;

// int8_tile's sums for M (1-4) input rows xf against a tile already widened to float32 (wf,
// kTileRows rows of kp floats, zeros past k as int8_tail16's): the same products, accumulators,
// K order and tail, so the same bits; the 16 (weight row, input row) sums of the group reduced
// together (reduce_add16: _mm512_reduce_add_ps's bits).
template <int64_t M, bool Exact, typename T>
inline void int8_group_widened(const float* xf, const float* wf, int64_t kp, int64_t k,
                               const float* sc, T* y, int64_t n, int64_t r) {
  __m512 va[16];  // (input row m, weight row j) at 4m + j; the last 16 - 4M stay zero
  for (int a = 0; a < 16; ++a) va[a] = _mm512_setzero_ps();
  int64_t i = 0;
  // Every vector loaded once into a register (the empty asm statements): gcc otherwise folds
  // a weight vector's load into each of its M FMAs, and a Zen 4 loads one 512-bit vector a
  // cycle (20 loads per 16 FMAs: slower than int8_tile).
  for (; i + 16 <= k; i += 16) {
    __m512 w[kTileRows];
    for (int64_t j = 0; j < kTileRows; ++j) {
      w[j] = _mm512_loadu_ps(wf + j * kp + i);
      asm("" : "+v"(w[j]));
    }
    for (int64_t m = 0; m < M; ++m) {
      __m512 xv = _mm512_loadu_ps(&xf[m * k + i]);
      asm("" : "+v"(xv));
      for (int64_t j = 0; j < kTileRows; ++j)
        va[4 * m + j] = _mm512_fmadd_ps(w[j], xv, va[4 * m + j]);
    }
  }
  if (i < k) {  // as int8_tile's tail: the buffer's zeros past k, x masked
    const __mmask16 tail = carpool_kernels::first_lanes(k - i);
    for (int64_t m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, &xf[m * k + i]);
      for (int64_t j = 0; j < kTileRows; ++j)
        va[4 * m + j] = _mm512_fmadd_ps(_mm512_loadu_ps(wf + j * kp + i), xv, va[4 * m + j]);
    }
  }
  const __m512 total = carpool_kernels::reduce_add16(va);
  alignas(64) float sums[16];
  if constexpr (Exact && std::is_same<T, float>::value) {
    // Float32 logits: the 16 products by the columns' scales in one multiply (the same
    // roundings as one at a time), each input row's 4 columns in one copy.
    const __m512 scale4 = _mm512_broadcast_f32x4(_mm_loadu_ps(sc));
    _mm512_store_ps(sums, _mm512_mul_ps(total, scale4));
    for (int64_t m = 0; m < M; ++m) std::memcpy(y + m * n + r, sums + 4 * m, 4 * sizeof(float));
  } else {
    _mm512_store_ps(sums, total);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < kTileRows; ++j)
        Elt<T>::store(y + m * n, r + j, int8_out<Exact>(sums[4 * m + j] * sc[j]));
  }
}

// A widened tile's row stride: k rounded up to 16 floats, plus 16 so that its rows do not fall
// into the same L1 sets as each other (and as x's rows) where k is a multiple of 512.
inline int64_t int8_widened_stride(int64_t k) { return (k + 15) / 16 * 16 + 16; }

// Output columns r .. r + kTileRows - 1 of all `rows` input rows (more than kTileDirectRows; K
// at most kTileWidenedMaxK):
// the tile's codes widened once into a buffer (kTileRows rows of int8_widened_stride(k)), with
// `ahead` (or null) brought into cache over the widening as int8_tile does, then every group of
// four rows over the buffer. Why: in int8_tile a group's 16 FMAs per 16 codes came with four
// widenings (8 instructions) and its 16 sums with 16 separate reductions.
template <bool Exact, typename T>
void int8_tile_widened(const float* xf, const int8_t* qr, const c10::BFloat16* scale, T* y,
                       int64_t rows, int64_t n, int64_t k, int64_t r, const char* ahead) {
  const int64_t kp = int8_widened_stride(k);
  // The calling thread's buffer (a tile of 4 x 1,024 codes: 16 KiB).
  thread_local std::vector<float> buffer;
  buffer.resize(kTileRows * kp);
  float* wf = buffer.data();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    if (ahead != nullptr) __builtin_prefetch(ahead + i * kTileRows, 0, 3);
    for (int64_t j = 0; j < kTileRows; ++j)
      _mm512_storeu_ps(wf + j * kp + i, carpool_kernels::load16(qr + j * k + i));
  }
  if (ahead != nullptr)
    for (int64_t b = i * kTileRows; b < k * kTileRows; b += 64) __builtin_prefetch(ahead + b, 0, 3);
  if (i < k)
    for (int64_t j = 0; j < kTileRows; ++j)
      _mm512_storeu_ps(wf + j * kp + i, int8_tail16(qr + j * k, i, k));
  float sc[kTileRows];
  for (int64_t j = 0; j < kTileRows; ++j) sc[j] = Elt<c10::BFloat16>::load(scale, r + j);
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {
    const float* xg = xf + m0 * k;
    T* yg = y + m0 * n;
    switch (std::min<int64_t>(4, rows - m0)) {
      case 1: int8_group_widened<1, Exact>(xg, wf, kp, k, sc, yg, n, r); break;
      case 2: int8_group_widened<2, Exact>(xg, wf, kp, k, sc, yg, n, r); break;
      case 3: int8_group_widened<3, Exact>(xg, wf, kp, k, sc, yg, n, r); break;
      default: int8_group_widened<4, Exact>(xg, wf, kp, k, sc, yg, n, r); break;
    }
  }
}
#elif defined(CARPOOL_AVX2)
// Weight rows per tile on AVX2: every group of M input rows takes it int8_cols8<M>() weight
// rows at a time (int8_sums8), so the tile's codes come from memory once, in the first group,
// and from L1/L2 for the others.
constexpr int64_t kTileRows = 12;

// Weight rows J per int8_sums8 at M input rows, each dividing kTileRows: J * M accumulators,
// the J weight vectors (M > 2) or M input vectors (M <= 2) held, and one more, in at most 15
// of the 16 registers (J = 3 at M = 4 takes all 16: gcc then kept an accumulator on the
// stack, 0.7x). Six at one row: six FMA chains hide the FMA's latency behind the widening.
template <int64_t M>
constexpr int64_t int8_cols8() {
  return M <= 2 ? 6 : M == 3 ? 3 : 2;
}

// Output columns c .. c + jn - 1 (jn <= J) of M input rows, with J = jn instantiated.
// Not inlined: inlined into its callers, gcc's registers for the loop came out worse (a 6-row
// product in cache at 0.57 FMAs a cycle, 1.27 alone on a Zen 2).
template <int64_t M, bool Exact, typename T, int64_t J = int8_cols8<M>()>
__attribute__((noinline)) void int8_cols8_call(int64_t jn, const float* xf, const int8_t* qc,
                                               const c10::BFloat16* scale, T* y, int64_t n,
                                               int64_t k, int64_t c, const char* ahead) {
  if constexpr (J > 1) {
    if (jn < J) return int8_cols8_call<M, Exact, T, J - 1>(jn, xf, qc, scale, y, n, k, c, ahead);
  }
  float s[J][M];
  int8_sums8<J, M>(xf, qc, k, ahead, s);
  for (int64_t j = 0; j < J; ++j) {
    const float sc = Elt<c10::BFloat16>::load(scale, c + j);
    for (int64_t m = 0; m < M; ++m) Elt<T>::store(y + m * n, c + j, int8_out<Exact>(s[j][m] * sc));
  }
}

// Output columns r .. r + count - 1 of M input rows, J at a time; `ahead` (or null): the
// codes of as many rows, asked for over the passes.
template <int64_t M, bool Exact, typename T>
inline void int8_tile8(const float* xf, const int8_t* q, const c10::BFloat16* scale, T* y,
                       int64_t n, int64_t k, int64_t r, int64_t count, const char* ahead) {
  constexpr int64_t J = int8_cols8<M>();
  for (int64_t c = r; c < r + count; c += J)
    int8_cols8_call<M, Exact>(std::min<int64_t>(J, r + count - c), xf, q + c * k, scale, y, n,
                              k, c, ahead == nullptr ? nullptr : ahead + (c - r) * k);
}

// Input rows per group on AVX2: up to 6, spread evenly (32 rows: 6, 6, 5, 5, 5, 5), each taken
// J = int8_cols8<M>() weight rows at a time: each widened weight vector feeds M FMAs, so the
// more rows a group, the fewer widenings per FMA (a widening, vpmovsxbd + vcvtdq2ps, takes
// ~1.45 cycles on a Zen 2; one block in L1: 1.48 FMAs a cycle at M = 4, J = 2; 1.75 at M = 6,
// against 1.09 for the loads-bound loop gcc made of J = 3, M = 4).
constexpr int64_t kGroupRows8 = 6;

template <bool Exact, typename T>
inline void int8_groups8(const float* xf, const int8_t* q, const c10::BFloat16* scale, T* y,
                         int64_t rows, int64_t n, int64_t k, int64_t r, int64_t count,
                         const char* ahead) {
  const int64_t groups = (rows + kGroupRows8 - 1) / kGroupRows8;
  for (int64_t g = 0, m0 = 0; g < groups; ++g) {
    const int64_t mg = rows / groups + (g < rows % groups ? 1 : 0);
    const float* xg = xf + m0 * k;
    T* yg = y + m0 * n;
    const char* pf = g == 0 ? ahead : nullptr;  // the first group streams the tile
    switch (mg) {
      case 1: int8_tile8<1, Exact>(xg, q, scale, yg, n, k, r, count, pf); break;
      case 2: int8_tile8<2, Exact>(xg, q, scale, yg, n, k, r, count, pf); break;
      case 3: int8_tile8<3, Exact>(xg, q, scale, yg, n, k, r, count, pf); break;
      case 4: int8_tile8<4, Exact>(xg, q, scale, yg, n, k, r, count, pf); break;
      case 5: int8_tile8<5, Exact>(xg, q, scale, yg, n, k, r, count, pf); break;
      default: int8_tile8<6, Exact>(xg, q, scale, yg, n, k, r, count, pf); break;
    }
    m0 += mg;
  }
}
#else
constexpr int64_t kTileRows = 1;
#endif

// Output columns r .. r + count - 1 for every group of up to 4 input rows: a whole tile through
// int8_tile where there is one (prefetching `ahead` during the first group), or through
// int8_tile_widened where Widened, else row by row.
template <bool Exact, bool Widened, typename T>
inline void int8_columns(const float* xf, const int8_t* q, const c10::BFloat16* scale, T* y,
                         int64_t rows, int64_t n, int64_t k, int64_t r, int64_t count,
                         const char* ahead) {
#if defined(CARPOOL_AVX2)
  int8_groups8<Exact>(xf, q, scale, y, rows, n, k, r, count, ahead);
#else
  using E = Elt<c10::BFloat16>;
#if defined(__AVX512F__)
  if (Widened && count == kTileRows) {
    int8_tile_widened<Exact>(xf, q + r * k, scale, y, rows, n, k, r, ahead);
    return;
  }
#endif
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {
    const float* xg = xf + m0 * k;
    T* yg = y + m0 * n;
    const int64_t mg = std::min<int64_t>(4, rows - m0);
#if defined(__AVX512F__)
    if (count == kTileRows) {
      const char* pf = m0 == 0 ? ahead : nullptr;
      switch (mg) {
        case 1: int8_tile<1, Exact>(xg, q + r * k, scale, yg, n, k, r, pf); break;
        case 2: int8_tile<2, Exact>(xg, q + r * k, scale, yg, n, k, r, pf); break;
        case 3: int8_tile<3, Exact>(xg, q + r * k, scale, yg, n, k, r, pf); break;
        default: int8_tile<4, Exact>(xg, q + r * k, scale, yg, n, k, r, pf); break;
      }
      continue;
    }
#endif
    for (int64_t c = r; c < r + count; ++c) {
      const int8_t* qr = q + c * k;
      const float sc = E::load(scale, c);
      switch (mg) {
        case 1: int8_row<1, Exact>(xg, qr, sc, yg, n, k, c); break;
        case 2: int8_row<2, Exact>(xg, qr, sc, yg, n, k, c); break;
        case 3: int8_row<3, Exact>(xg, qr, sc, yg, n, k, c); break;
        default: int8_row<4, Exact>(xg, qr, sc, yg, n, k, c); break;
      }
    }
  }
#endif
}

// A float32 x is rounded to bf16 first and the bf16 result widened back (as around int4_rows),
// unless Exact. Any number of rows: per tile of weight rows (read from memory once, prefetched
// ahead), every group of up to 4 input rows in turn.
template <bool Exact, typename T>
void int8_rows(const T* x, const int8_t* q, const c10::BFloat16* scale, T* y, int64_t rows,
               int64_t n, int64_t k) {
  // The input rows once in float32 (bf16 values unless Exact), shared by the threads.
  std::vector<float> xf(rows * k);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t i = 0; i < k; ++i) xf[m * k + i] = int8_out<Exact>(Elt<T>::load(x + m * k, i));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Ranges of whole tiles (at least 64 rows), so that only the last range can end in a partial
  // one; each thread its own range first, then the tiles left in the others'
  // (shared_ranges.h).
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  const int64_t range_tiles =
      (std::max<int64_t>(64, (n + threads - 1) / threads) + kTileRows - 1) / kTileRows;
  std::vector<int64_t> bounds((tiles + range_tiles - 1) / range_tiles + 1);
  for (size_t p = 0; p < bounds.size(); ++p)
    bounds[p] = std::min<int64_t>(tiles, static_cast<int64_t>(p) * range_tiles);
  // Two instances of the loop, with and without the widened tiles: where one function held
  // both, gcc kept int8_tile's accumulators on the stack (one row 1.8x slower).
  auto run = [&](auto widened) {
    constexpr bool Widened = decltype(widened)::value;
    carpool_kernels::run_shared_ranges(bounds, [&](RangeTaker& taker) {
      for (int64_t t, t_end; taker.take(t, t_end);) {
        // The tile's rows, and the end of the range it is from (the tiles a prefetch is for).
        const int64_t r = t * kTileRows, end = std::min(n, t_end * kTileRows);
        const int64_t count = std::min<int64_t>(kTileRows, end - r);
        if (count == kTileRows) {  // the tile kPrefetchRows ahead, if whole and in the range
          const bool whole = r + kPrefetchRows + kTileRows <= end;
          const char* ahead =
              whole ? reinterpret_cast<const char*>(q + (r + kPrefetchRows) * k) : nullptr;
          int8_columns<Exact, Widened>(xf.data(), q, scale, y, rows, n, k, r, count, ahead);
          continue;
        }
        if (r + kPrefetchRows < end) {
          const char* ahead = reinterpret_cast<const char*>(q + (r + kPrefetchRows) * k);
          for (int64_t b = 0; b < k; b += 64) __builtin_prefetch(ahead + b, 0, 3);
        }
        int8_columns<Exact, Widened>(xf.data(), q, scale, y, rows, n, k, r, count, nullptr);
      }
    });
  };
#if defined(__AVX512F__)
  if (rows > kTileDirectRows && k <= kTileWidenedMaxK) return run(std::true_type{});
#endif
  run(std::false_type{});
}

void check_int8_args(const char* op, const at::Tensor& x, const at::Tensor& qweight,
                     const at::Tensor& scales, bool float32_only) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat ||
                   (!float32_only && x.scalar_type() == at::kBFloat16)),
              op, ": x must be a contiguous [M, K] ", float32_only ? "" : "bfloat16 or ",
              "float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() &&
                  qweight.scalar_type() == at::kChar && qweight.size(1) == x.size(1),
              op, ": qweight must be a contiguous [N, ", x.size(1), "] int8 tensor, got ",
              qweight.sizes(), " ", qweight.scalar_type());
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == qweight.size(0) && scales.is_contiguous() &&
                  scales.scalar_type() == at::kBFloat16,
              op, ": scales must be [", qweight.size(0), "] bfloat16, got ", scales.sizes(), " ",
              scales.scalar_type());
  TORCH_CHECK(x.size(0) >= 1, op, ": at least one input row, got ", x.size(0));
}

#if defined(__AVX512BF16__)
template <typename T>
void int8_dot_rows(const T* x, const int8_t* q, const c10::BFloat16* scale, T* y, int64_t rows,
                   int64_t n, int64_t k);
#endif

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_int8_args("int8_gemv", x, qweight, scales, false);
  const int64_t m = x.size(0), n = qweight.size(0), k = x.size(1);
  at::Tensor y = at::empty({m, n}, x.options());  // x's dtype (float32: bf16 values widened)
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const c10::BFloat16* sp = scales.data_ptr<c10::BFloat16>();
#if defined(__AVX512BF16__)
  // With AVX-512 BF16 (an AMX CPU's too since issue 11's fortieth pass), int8_dot's sums: a
  // row's bits are the same in a decode step of a few rows (here) and in a longer one
  // (int8_dot), so a Q8_0 model's tokens do not depend on how many rows share its step (its
  // FMA loop below gave other bits: 2 of 8 prompts' greedy tokens differed between batching
  // strategies on a Zen 4). Faster too: 0.96x at one row, 1.3-2.1x at 2-8 (issue 11,
  // thirty-first pass).
  if (k % 32 == 0) {
    if (x.scalar_type() == at::kFloat)
      int8_dot_rows(x.data_ptr<float>(), qp, sp, y.data_ptr<float>(), m, n, k);
    else
      int8_dot_rows(x.data_ptr<c10::BFloat16>(), qp, sp, y.data_ptr<c10::BFloat16>(), m, n, k);
    return y;
  }
#endif
  if (x.scalar_type() == at::kFloat)
    int8_rows<false>(x.data_ptr<float>(), qp, sp, y.data_ptr<float>(), m, n, k);
  else
    int8_rows<false>(x.data_ptr<c10::BFloat16>(), qp, sp, y.data_ptr<c10::BFloat16>(), m, n, k);
  return y;
}

// Whether this build multiplies on AMX tiles here (an AMX build, the process granted AMX's
// state): int4_gemv then takes int4_block_amx (groups a multiple of 32), int8_logits and
// int8_logits_at x in fixed point (int8_logits_amx). Registered as carpool::int4_gemv_amx and
// carpool::int8_logits_fixed.
bool amx_tiles_here() {
#if defined(CARPOOL_AMX)
  return carpool_kernels::amx_permitted();
#else
  return false;
#endif
}

#if defined(CARPOOL_AMX)
// A float32 x in fixed point, for an int8 head's logits in integer arithmetic: row r's values
// times 2^e_r (e_r from the row's largest magnitude, which becomes at most 2^26), rounded to
// integers (ties to even), as four signed base-128 digits in [-64, 64]. A logit is then
// float(double(sum_k xi_k q_k) * (scale * 2^-e_r)): the integer sum is exact in any order (on
// tiles or not; each digit plane's in int32 for K under 2^18), and so is the double product
// up to K = 4,096 (the sum's 45 bits times a bf16 scale's 8; past it rounded in double first,
// the same way on every path), then rounded once to float32. The digits round x by at most
// 2^-27 of its row's largest value, ~100x less than a float32 FMA loop's own roundings of its
// sums (2^-24 of the partial sums, K times). Rows with a NaN or an infinity get NaN logits.
// Why integers: on AMX tiles (TDPBSSD, 16 x 16 x 64 products an instruction) the codes are the
// tile's operand as they are in memory, no widening; and an exact sum has no order of adds,
// so a logit's bits depend on its row and column only, on tiles or in int8_logits_at's loop.
struct Int8FixedRows {
  static constexpr int kDigits = 4;
  std::vector<int8_t> digits;  // [rows][kDigits][kp], most significant first, zeros past k
  std::vector<double> step;    // 2^-e_r
  std::vector<uint8_t> finite;
  int64_t kp = 0;
};

inline void int8_fixed_rows(const float* x, int64_t rows, int64_t k, int64_t kp,
                            Int8FixedRows& f) {
  constexpr int kD = Int8FixedRows::kDigits;
  f.kp = kp;
  f.digits.assign(rows * kD * kp, 0);
  f.step.resize(rows);
  f.finite.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    float top = 0.f;
    bool finite = true;
    for (int64_t i = 0; i < k; ++i) {
      finite = finite && std::isfinite(xr[i]);
      top = std::max(top, std::fabs(xr[i]));
    }
    int exp2 = 0;
    std::frexp(finite ? top : 0.f, &exp2);  // top < 2^exp2 (0 for a zero row)
    const int e = 26 - exp2;
    f.step[r] = std::ldexp(1.0, -e);
    f.finite[r] = finite;
    if (!finite) continue;
    int8_t* d = f.digits.data() + r * kD * kp;
    int64_t i = 0;
#if defined(__AVX512F__)
    // 16 values at a time where 2^e is a normal float (x * 2^e exact in float32, rounded to
    // an integer as nearbyint does: ties to even); the digits as the scalar loop's.
    if (e >= -126 && e <= 127) {
      const __m512 scale = _mm512_set1_ps(std::ldexp(1.f, e));
      const __m512i half = _mm512_set1_epi32(64), mask = _mm512_set1_epi32(127);
      for (; i + 16 <= k; i += 16) {
        __m512i xi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + i), scale));
        for (int j = kD - 1; j >= 0; --j) {
          const __m512i low = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(xi, half), mask), half);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + j * kp + i), _mm512_cvtepi32_epi8(low));
          xi = _mm512_srai_epi32(_mm512_sub_epi32(xi, low), 7);
        }
      }
    }
#endif
    for (; i < k; ++i) {
      // |xi| <= 2^26: exact in a double, and its digits each within [-64, 64].
      int64_t xi = static_cast<int64_t>(std::nearbyint(std::ldexp(static_cast<double>(xr[i]), e)));
      for (int j = kD - 1; j >= 0; --j) {
        const int64_t low = ((xi + 64) & 127) - 64;
        d[j * kp + i] = static_cast<int8_t>(low);
        xi = (xi - low) / 128;
      }
    }
  }
}

// The float32 logit of an exact integer sum (int8_fixed_rows): the product with the scale and
// the row's step in double (exact), rounded once.
inline float int8_fixed_logit(double total, double scale_step) {
  return static_cast<float>(total * scale_step);
}

// Input rows past which int8_logits_amx multiplies two weight blocks at a time (2 x 2 tiles:
// a tile load a product, not 1.25; and the blocks before combined between the passes, not
// after them). SmolLM2's head from memory (benchmarks/ab_int8_gemv.py, the AMX Xeon of issue
// 11's forty-eighth pass): 0.8-0.95x at 5-12 rows, 1.1-1.2x at 13-64, 1.2-1.3x at 96-128.
constexpr int64_t kInt8FixedPairRows = 12;

// Tiles: 0 16 weight rows' 64 codes (straight from the matrix), 1 and 6 a quad's digit planes
// (in turn, so that a load need not wait for the product before it to have read its tile), 2-5
// the sums of quads 0-3 of a pass (16 weight rows by 16 (plane, input row) columns). A quad:
// up to four input rows, their four planes side by side as the B tile's columns (plane j of
// row l at column 4 j + l), so that one TDPBSSD makes all four planes' sums of four rows (at
// one row a quarter of the instructions of a plane at a time).
inline void int8_fixed_configure() {
  carpool_kernels::TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// The input rows' digit planes as B tiles: chunk c (64 inputs) of quad u (input rows 4u ..
// 4u + 3) at xb + (u * chunks + c) * 256: tile row kk holds, for each plane j and row l of the
// quad, the four digits of inputs 64 c + 4 kk .. + 3 at column 4 j + l; rows past `rows` zero.
inline void int8_fixed_tiles(const Int8FixedRows& f, int64_t rows, std::vector<uint32_t>& xb) {
  const int64_t chunks = f.kp / 64, quads = (rows + 3) / 4;
  xb.assign(quads * chunks * 256, 0u);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t u = r / 4, l = r % 4;
    for (int64_t j = 0; j < Int8FixedRows::kDigits; ++j) {
      const int8_t* d = f.digits.data() + (r * Int8FixedRows::kDigits + j) * f.kp;
      // A chunk's 16 words of digits to column 4 j + l of its tile's 16 rows.
      const __m512i rows16 = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176,
                                               192, 208, 224, 240);
      for (int64_t c = 0; c < chunks; ++c)
        _mm512_i32scatter_epi32(&xb[(u * chunks + c) * 256 + 4 * j + l], rows16,
                                _mm512_loadu_si512(d + 64 * c), 4);
    }
  }
}

// Quad t of a pass (its B tile at b) times the weight chunk in tile 0, into sum tile 2 + t.
// (The tile macros take literal tile numbers.)
template <int A>
[[gnu::always_inline]] inline void int8_fixed_product(int t, const uint32_t* b) {
  if constexpr (A == 0) {
    switch (t) {
      case 0: _tile_loadd(1, b, 64); _tile_dpbssd(2, 0, 1); break;
      case 1: _tile_loadd(6, b, 64); _tile_dpbssd(3, 0, 6); break;
      case 2: _tile_loadd(1, b, 64); _tile_dpbssd(4, 0, 1); break;
      default: _tile_loadd(6, b, 64); _tile_dpbssd(5, 0, 6); break;
    }
  } else {
    switch (t) {
      case 0: _tile_loadd(1, b, 64); _tile_dpbssd(2, 7, 1); break;
      case 1: _tile_loadd(6, b, 64); _tile_dpbssd(3, 7, 6); break;
      case 2: _tile_loadd(1, b, 64); _tile_dpbssd(4, 7, 1); break;
      default: _tile_loadd(6, b, 64); _tile_dpbssd(5, 7, 6); break;
    }
  }
}

// The integer sums of 16 weight rows (a, stride lda: the matrix itself, or a zero-padded copy)
// and `quads` (1-4) quads of input rows (their tiles from xq), stored to cb [quads][16][16].
inline void int8_fixed_block(const int8_t* a, int64_t lda, const uint32_t* xq, int64_t quads,
                             int64_t chunks, int32_t* cb, const int8_t* ahead) {
  _tile_zero(2);
  if (quads > 1) _tile_zero(3);
  if (quads > 2) _tile_zero(4);
  if (quads > 3) _tile_zero(5);
  for (int64_t c = 0; c < chunks; ++c) {
    if (ahead != nullptr)
      for (int64_t l = 16 * c; l < 16 * c + 16; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(ahead) + 64 * l, _MM_HINT_T1);
    if (c % 2 == 0) {
      _tile_loadd(0, a + 64 * c, lda);
      for (int t = 0; t < quads; ++t) int8_fixed_product<0>(t, xq + (t * chunks + c) * 256);
    } else {
      _tile_loadd(7, a + 64 * c, lda);
      for (int t = 0; t < quads; ++t) int8_fixed_product<7>(t, xq + (t * chunks + c) * 256);
    }
  }
  _tile_stored(2, cb, 64);
  if (quads > 1) _tile_stored(3, cb + 256, 64);
  if (quads > 2) _tile_stored(4, cb + 512, 64);
  if (quads > 3) _tile_stored(5, cb + 768, 64);
}

// The integer sums of two blocks of 16 weight rows (a0, a1 with their strides) and one or two
// quads of input rows (their tiles from xq), stored to cb0 and cb1 as int8_fixed_block does:
// 2 x 2 tiles (0 and 1 the blocks' chunks, 2 and 3 the quads' digits, 4-7 the sums), a tile
// load for each product where int8_fixed_block's 1 x 4 takes 1.25. ahead: the 32 weight rows
// to prefetch into L2 during the pass (16 k contiguous bytes a block), or null.
inline void int8_fixed_pair(const int8_t* a0, int64_t lda0, const int8_t* a1, int64_t lda1,
                            const uint32_t* xq, bool two, int64_t chunks, int32_t* cb0,
                            int32_t* cb1, const int8_t* ahead) {
  _tile_zero(4);
  _tile_zero(6);
  if (two) {
    _tile_zero(5);
    _tile_zero(7);
  }
  for (int64_t c = 0; c < chunks; ++c) {
    if (ahead != nullptr)
      for (int64_t l = 32 * c; l < 32 * c + 32; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(ahead) + 64 * l, _MM_HINT_T1);
    _tile_loadd(0, a0 + 64 * c, lda0);
    _tile_loadd(1, a1 + 64 * c, lda1);
    _tile_loadd(2, xq + c * 256, 64);
    if (two) _tile_loadd(3, xq + (chunks + c) * 256, 64);
    _tile_dpbssd(4, 0, 2);
    _tile_dpbssd(6, 1, 2);
    if (two) {
      _tile_dpbssd(5, 0, 3);
      _tile_dpbssd(7, 1, 3);
    }
  }
  _tile_stored(4, cb0, 64);
  _tile_stored(6, cb1, 64);
  if (two) {
    _tile_stored(5, cb0 + 256, 64);
    _tile_stored(7, cb1 + 256, 64);
  }
}

// A quad's logits of a block (its sum tile stored at cb: weight row m's plane j of row l at
// cb[16 m + 4 j + l]) into t [16 m][4 l]: each (m, l)'s planes combined exactly in double
// (every partial sum an integer under 2^53), times sc[m] * step[l], rounded once to float.
// Two weight rows a step: their planes gathered into two vectors by two permutes.
inline void int8_fixed_quad(const int32_t* cb, const double* sc, __m512d step4, float* t) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i last = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29,
                                         30, 31);
  const __m512i pair = _mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1);
  const __m512d radix = _mm512_set1_pd(128.0);
  for (int m = 0; m < 16; m += 2) {
    const __m512i a = _mm512_load_si512(cb + 16 * m), b = _mm512_load_si512(cb + 16 * m + 16);
    const __m512i p01 = _mm512_permutex2var_epi32(a, first, b);  // planes 0, 1 of m, m + 1
    const __m512i p23 = _mm512_permutex2var_epi32(a, last, b);
    __m512d v = _mm512_cvtepi32_pd(_mm512_castsi512_si256(p01));
    v = _mm512_fmadd_pd(v, radix, _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(p01, 1)));
    v = _mm512_fmadd_pd(v, radix, _mm512_cvtepi32_pd(_mm512_castsi512_si256(p23)));
    v = _mm512_fmadd_pd(v, radix, _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(p23, 1)));
    const __m512d ss = _mm512_mul_pd(_mm512_permutexvar_pd(pair, _mm512_castpd128_pd512(
                                                                     _mm_load_pd(sc + m))),
                                     step4);
    _mm256_store_ps(t + 4 * m, _mm512_cvtpd_ps(_mm512_mul_pd(v, ss)));
  }
}

// Row l alone of a quad's logits of a block (its sums at cb as int8_fixed_quad reads them):
// each weight row's four plane sums gathered (four gathers), then int8_fixed_quad's arithmetic
// (exact until the one rounding, so its bits). For a quad of one or two rows, whose combining
// int8_fixed_quad does for four (at one row it cost ~0.25 ms of SmolLM2's 1.35 ms head).
inline __m512 int8_fixed_one(const int32_t* cb, int l, const double* sc, double step) {
  const __m512i rows16 = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176,
                                           192, 208, 224, 240);
  const __m512d radix = _mm512_set1_pd(128.0);
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  for (int j = 0; j < Int8FixedRows::kDigits; ++j) {
    const __m512i p = _mm512_i32gather_epi32(rows16, cb + 4 * j + l, 4);
    const __m512d plo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(p));
    const __m512d phi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(p, 1));
    lo = j == 0 ? plo : _mm512_fmadd_pd(lo, radix, plo);
    hi = j == 0 ? phi : _mm512_fmadd_pd(hi, radix, phi);
  }
  const __m512d st = _mm512_set1_pd(step);
  const __m256 flo = _mm512_cvtpd_ps(_mm512_mul_pd(lo, _mm512_mul_pd(_mm512_load_pd(sc), st)));
  const __m256 fhi = _mm512_cvtpd_ps(_mm512_mul_pd(hi, _mm512_mul_pd(_mm512_load_pd(sc + 8), st)));
  return _mm512_insertf32x8(_mm512_castps256_ps512(flo), fhi, 1);
}

// Row l of a quad's logits (t [16][4]) as 16 floats, weight rows in order.
inline __m512 int8_fixed_row(const float* t, int l) {
  const __m512i idx = _mm512_add_epi32(
      _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28),
      _mm512_set1_epi32(l));
  const __m512 lo = _mm512_permutex2var_ps(_mm512_load_ps(t), idx, _mm512_load_ps(t + 16));
  const __m512 hi = _mm512_permutex2var_ps(_mm512_load_ps(t + 32), idx, _mm512_load_ps(t + 48));
  return _mm512_shuffle_f32x4(lo, hi, 0x44);
}

// int8_logits on AMX tiles, in integers (int8_fixed_rows): per 16 weight rows every pass of up
// to 16 input rows, the block's codes loaded into tiles from the matrix (from cache past the
// first pass); past kInt8FixedPairRows per 32 weight rows every pass of up to 8 (2 x 2 tiles),
// the span before combined between its passes. Any row count; the sums are exact, so every
// arrangement gives the same bits.
void int8_logits_amx(const float* x, const int8_t* q, const c10::BFloat16* sp, float* y,
                     int64_t rows, int64_t n, int64_t k) {
  const int64_t kp = (k + 63) / 64 * 64, chunks = kp / 64, quads = (rows + 3) / 4;
  const int64_t nblocks = (n + 15) / 16;
  Int8FixedRows f;
  int8_fixed_rows(x, rows, k, kp, f);
  std::vector<uint32_t> xb;
  int8_fixed_tiles(f, rows, xb);
  std::vector<double>& steps = f.step;  // a step per row, zero past `rows` (whole quads)
  steps.resize(quads * 4, 0.0);
  // Blocks the matrix cannot give as tiles (k not a multiple of 64, the last rows of n): a
  // zero-padded copy.
  const bool whole = k % 64 == 0;
  // Past kInt8FixedPairRows rows two weight blocks at a time (int8_fixed_pair), else one
  // (int8_fixed_block).
  const int64_t span = rows > kInt8FixedPairRows ? 2 : 1;
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    // Per task: two spans' sums (a span's products are issued before the span before it is
    // rescaled, so that the vector units do that while the tile unit multiplies), a zero-padded
    // block for each of a span's blocks, the scales.
    thread_local std::vector<__m512i> sum_tiles;  // 64-byte aligned
    thread_local std::vector<int8_t> pad[2];
    if (static_cast<int64_t>(sum_tiles.size()) < 4 * quads * 16) sum_tiles.resize(4 * quads * 16);
    int32_t* const sums = reinterpret_cast<int32_t*>(sum_tiles.data());
    auto block_sums = [&](int64_t b) { return sums + (b - b0) % 4 * quads * 256; };
    alignas(64) float t[64];
    alignas(64) double sc[4][16];  // a block's scales, by its sums' slot
    int8_fixed_configure();
    auto scales = [&](int64_t b) {
      double* s = sc[(b - b0) % 4];
      const int64_t valid = std::min<int64_t>(16, n - b * 16);
      for (int64_t j = 0; j < 16; ++j) s[j] = j < valid ? Elt<c10::BFloat16>::load(sp, b * 16 + j) : 0.0;
    };
    auto finish = [&](int64_t b, int64_t u_lo, int64_t u_hi) {  // quads [u_lo, u_hi) of block b
      const int32_t* cb = block_sums(b);
      const double* s = sc[(b - b0) % 4];
      const __mmask16 mask = carpool_kernels::first_lanes(std::min<int64_t>(16, n - b * 16));
      for (int64_t u = u_lo; u < std::min(u_hi, quads); ++u) {
        const int64_t r1 = std::min(rows, 4 * u + 4);
        if (r1 - 4 * u <= 2) {
          for (int64_t r = 4 * u; r < r1; ++r)
            _mm512_mask_storeu_ps(y + r * n + b * 16, mask,
                                  int8_fixed_one(cb + u * 256, static_cast<int>(r % 4), s, steps[r]));
          continue;
        }
        const __m512d step4 = _mm512_broadcast_f64x4(_mm256_loadu_pd(&steps[4 * u]));
        int8_fixed_quad(cb + u * 256, s, step4, t);
        for (int64_t r = 4 * u; r < r1; ++r)
          _mm512_mask_storeu_ps(y + r * n + b * 16, mask, int8_fixed_row(t, static_cast<int>(r % 4)));
      }
    };
    // Block b's codes as tiles: the matrix, or (k not a multiple of 64, the last rows of n) a
    // zero-padded copy in pad[slot].
    auto codes = [&](int64_t b, int slot, int64_t& lda) -> const int8_t* {
      const int64_t valid = std::min<int64_t>(16, n - b * 16);
      const int8_t* a = q + b * 16 * k;
      lda = k;
      if (whole && valid == 16) return a;
      pad[slot].assign(16 * kp, 0);
      for (int64_t j = 0; j < valid; ++j) std::memcpy(&pad[slot][j * kp], a + j * k, k);
      lda = kp;
      return pad[slot].data();
    };
    // Blocks [prev, b) are the span before (their sums stored, their logits not yet made):
    // finished a slice at a time between this span's products, so that the vector units
    // combine while the tile unit multiplies (a span's products issued whole fill the reorder
    // buffer, and the combining behind them waits).
    int64_t prev = b0;
    for (int64_t b = b0; b < b1; b += span) {
      const int64_t nb = std::min(span, b1 - b);
      for (int64_t i = 0; i < nb; ++i) scales(b + i);
      int64_t lda0 = 0, lda1 = 0;
      const int8_t* a0 = codes(b, 0, lda0);
      if (nb == 2) {
        const int8_t* a1 = codes(b + 1, 1, lda1);
        // The span after the next one (32 k contiguous bytes) into L2 during the first pass.
        const int8_t* ahead = whole && b + 6 <= b1 ? q + (b + 4) * 16 * k : nullptr;
        for (int64_t u0 = 0; u0 < quads; u0 += 2) {
          int8_fixed_pair(a0, lda0, a1, lda1, xb.data() + u0 * chunks * 256, u0 + 1 < quads,
                          chunks, block_sums(b) + u0 * 256, block_sums(b + 1) + u0 * 256,
                          u0 == 0 ? ahead : nullptr);
          for (int64_t p = prev; p < b; ++p) finish(p, u0, u0 + 2);
        }
      } else {
        // The block after the next one (16 k contiguous bytes) into L2 during the first pass, 16
        // lines a chunk. With the head not in cache (as in a model's step), SmolLM2's at one
        // row: 1.33 ms prefetching the next block into L1, 1.15-1.22 this way, 1.63-1.78 with
        // none (the tiles' loads, 16 rows 576 bytes apart, are no stream to the hardware's
        // prefetchers); all at once, the prefetches waited for fill buffers (20% of the time).
        const int8_t* ahead = whole && b + 2 < b1 ? q + (b + 2) * 16 * k : nullptr;
        for (int64_t u0 = 0; u0 < quads; u0 += 4)
          int8_fixed_block(a0, lda0, xb.data() + u0 * chunks * 256, std::min<int64_t>(4, quads - u0),
                           chunks, block_sums(b) + u0 * 256, u0 == 0 ? ahead : nullptr);
        for (int64_t p = prev; p < b; ++p) finish(p, 0, quads);
      }
      prev = b;
    }
    for (int64_t p = prev; p < b1; ++p) finish(p, 0, quads);
  });
  for (int64_t r = 0; r < rows; ++r)
    if (!f.finite[r]) std::fill(y + r * n, y + (r + 1) * n, std::numeric_limits<float>::quiet_NaN());
}

// int8_logits_at where int8_logits runs on tiles: the same integer sums (any order gives them
// exactly) and the same rounding, so the same bits, one (row, column) at a time: with
// AVX-512 VNNI the digits as int16 against 32 codes widened at a time, four VPDPWSSD (one a
// plane; SmolLM2's head, 256 rows of 64 columns: 0.99 ms, ~3x faster than a loop a plane).
void int8_logits_at_fixed(const float* x, const int8_t* q, const c10::BFloat16* sp,
                          const int64_t* ids, float* y, int64_t rows, int64_t j_count, int64_t k) {
  constexpr int kD = Int8FixedRows::kDigits;
  const int64_t kp = (k + 31) / 32 * 32;
  at::parallel_for(0, rows, 1, [&](int64_t m0, int64_t m1) {
    Int8FixedRows f;
    std::vector<int16_t> d16(kD * kp);
    for (int64_t r = m0; r < m1; ++r) {
      int8_fixed_rows(x + r * k, 1, k, kp, f);
      for (int64_t i = 0; i < kD * kp; ++i) d16[i] = f.digits[i];
      for (int64_t j = 0; j < j_count; ++j) {
        const int64_t c = ids[r * j_count + j];
        const int8_t* qr = q + c * k;
        int32_t sums[kD] = {};
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        __m512i acc[kD];
        for (int d = 0; d < kD; ++d) acc[d] = _mm512_setzero_si512();
        for (int64_t i = 0; i < k; i += 32) {
          const __mmask32 m = k - i >= 32 ? ~__mmask32{0} : (__mmask32{1} << (k - i)) - 1;
          const __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, qr + i));
          for (int d = 0; d < kD; ++d)
            acc[d] = _mm512_dpwssd_epi32(acc[d], w, _mm512_loadu_si512(&d16[d * kp + i]));
        }
        for (int d = 0; d < kD; ++d) sums[d] = _mm512_reduce_add_epi32(acc[d]);
#else
        for (int d = 0; d < kD; ++d)  // |digit * code| <= 64 * 128: exact for k < 2^18
          for (int64_t i = 0; i < k; ++i) sums[d] += static_cast<int32_t>(d16[d * kp + i]) * qr[i];
#endif
        int64_t total = 0;
        for (int d = 0; d < kD; ++d) total = total * 128 + sums[d];
        const double scale = Elt<c10::BFloat16>::load(sp, c);
        y[r * j_count + j] = f.finite[0]
                                 ? int8_fixed_logit(static_cast<double>(total), scale * f.step[0])
                                 : std::numeric_limits<float>::quiet_NaN();
      }
    }
  });
}
#endif

// A vocabulary head's float32 logits: int8_gemv's kernel with a float32 x as it is and the
// float32 sums not rounded, so every logit is what the dequantized weight (codes times their
// bf16 scale, exact in float32) gives in float32 but for the order of the sums. A float32
// model needs it: bf16 logits (0.125 apart at 25) tie or swap its top tokens. On AMX CPUs the
// integer sums of x in fixed point instead (int8_logits_amx, Int8FixedRows): SmolLM2's head
// from memory 2.3x / 3.3x faster at 16 / 32 rows, level at one (issue 11, forty-fourth pass).
at::Tensor int8_logits(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_int8_args("int8_logits", x, qweight, scales, true);
  const int64_t m = x.size(0), n = qweight.size(0), k = x.size(1);
  at::Tensor y = at::empty({m, n}, x.options());
#if defined(CARPOOL_AMX)
  if (amx_tiles_here()) {
    int8_logits_amx(x.data_ptr<float>(), qweight.data_ptr<int8_t>(),
                    scales.data_ptr<c10::BFloat16>(), y.data_ptr<float>(), m, n, k);
    return y;
  }
#endif
  int8_rows<true>(x.data_ptr<float>(), qweight.data_ptr<int8_t>(),
                  scales.data_ptr<c10::BFloat16>(), y.data_ptr<float>(), m, n, k);
  return y;
}

// int8_logits at the given columns only: y[r, j] = int8_logits(x)[r, ids[r, j]], the same bits
// (one weight row at a time through int8_row, whose sums are int8_tile's). Where the head's
// logits come from another kernel in bf16 (more rows than int8_logits takes), their top ones
// are recomputed by it, so a row's top logits do not depend on the path its batch took.
at::Tensor int8_logits_at(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& ids) {
  check_int8_args("int8_logits_at", x, qweight, scales, true);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && ids.is_contiguous() &&
                  ids.scalar_type() == at::kLong,
              "int8_logits_at: ids must be a contiguous [", x.size(0), ", J] int64 tensor, got ",
              ids.sizes(), " ", ids.scalar_type());
  const int64_t m = x.size(0), n = qweight.size(0), k = x.size(1), j_count = ids.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < m * j_count; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n, "int8_logits_at: column ", ip[i], " out of [0, ", n, ")");
  at::Tensor y = at::empty({m, j_count}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const c10::BFloat16* sp = scales.data_ptr<c10::BFloat16>();
  float* yp = y.data_ptr<float>();
#if defined(CARPOOL_AMX)
  if (amx_tiles_here()) {
    int8_logits_at_fixed(xp, qp, sp, ip, yp, m, j_count, k);
    return y;
  }
#endif
  at::parallel_for(0, m * j_count, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / j_count, c = ip[i];
      // int8_row stores column `r` of its output row: here the output is element i itself.
      int8_row<1, true>(xp + r * k, qp + c * k, Elt<c10::BFloat16>::load(sp, c), yp + i, 1, k, 0);
    }
  });
  return y;
}

// int8 weight-only products of a decode batch (quant.Int8Linear from INT8_GEMV_MAX_ROWS + 1 to
// INT8_DOT_MAX_ROWS rows) in bf16 dot products, on CPUs with AVX-512 BF16 (an AMD Zen 4 or 5).
// What ran there before: torch's _weight_int8pack_mm (9-16 rows) and the codes widened to a bf16
// copy of the weight for a dense GEMM (17+), both float32 FMAs or a copy per call; a
// `vdpbf16ps` does 32 multiply-adds against an FMA's 16. Per tile of kDotCols weight rows
// (output columns), read once from memory: the codes widened to bf16 (exact: every int8 value
// is a bf16), in registers in every pass for up to kDotDirectRows rows, else once into a buffer
// in L1, then every pass of up to kDotRows input rows over them, each (row, column) a 16-lane
// sum of bf16 pairs along K, summed by one reduce16 at the end. int8_gemv takes it too, so
// that a row's bits do not depend on which of the two its step's size picked. x and the scales
// in bf16 (a float32 x rounded first), float32 sums, the scaled sum rounded to bf16:
// what casting around torch's kernel gives, in another order. A row's sums take the same
// instructions whatever rows share the call (the passes only group them): the same bits at
// every row count the kernel takes (tested).
constexpr int64_t kDotCols = 4;  // 24 accumulators, 4 weight vectors and an input in 32 registers
constexpr int64_t kDotRows = 6;

#if defined(__AVX512BF16__)
// 32 int8 codes as bf16 pairs in int8_dot's order: pair l holds codes l and l + 16 (each code
// widened to float32, exact, whose upper half is its bf16: a shift and a blend put the halves of
// two vectors side by side, where vcvtne2ps2bf16 cost the one-row product ~1.2x). The inputs
// are laid out in the same pairs (int8_dot_rows), so the dot products pair each code with its x.
inline __m512i int8_pairs_bh(const int8_t* p) {
  const __m512i lo = _mm512_castps_si512(_mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
  const __m512i hi = _mm512_castps_si512(_mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))));
  return _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(lo, 16), hi);
}

// A tile already in int8_dot's pairs (its bf16 buffer).
inline __m512i int8_pairs_bh(const c10::BFloat16* p) { return _mm512_loadu_si512(p); }

// v's float32 bits rounded to the nearest bf16 in their upper half (as Elt::narrow).
inline __m512i bf16_rounded(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd);
}

// One input row xb (in int8_pairs_bh's pairs) times the 16 weight rows q, q + k, ... (codes as
// they are) into y[0 .. 15], four at a time as int8_dot_pass streams them: its sums (a 16-lane
// sum of bf16 pairs per column, K in order, then reduce16), so the same bits, but the 16 sums
// share one reduce16 where a pass of four columns left 12 of its 16 empty (the reductions were
// ~12% of a one-row product over 512 codes). `ahead(c)` (or null): the codes to bring into
// cache while column c's four are read (two lines per 32 codes, as int8_dot_pass).
template <typename T, typename Ahead>
void int8_dot_row16(const c10::BFloat16* xb, const int8_t* q, int64_t k,
                    const c10::BFloat16* scale, T* y, Ahead ahead) {
  __m512 sums[16];
  for (int c0 = 0; c0 < 16; c0 += kDotCols) {
    __m512 acc[kDotCols];
    for (int c = 0; c < kDotCols; ++c) acc[c] = _mm512_setzero_ps();
    const int8_t* qc = q + c0 * k;
    const char* pf = ahead(c0);
    for (int64_t i = 0; i < k; i += 32) {
      if (pf != nullptr) {
        __builtin_prefetch(pf + i * kDotCols, 0, 3);
        __builtin_prefetch(pf + i * kDotCols + 64, 0, 3);
      }
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + i);
      for (int c = 0; c < kDotCols; ++c)
        acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)int8_pairs_bh(qc + c * k + i), xv);
    }
    for (int c = 0; c < kDotCols; ++c) sums[c0 + c] = acc[c];
  }
  const __m512 sc = carpool_kernels::load16(scale);
  const __m512i rounded = bf16_rounded(_mm512_mul_ps(carpool_kernels::reduce16(sums), sc));
  if constexpr (std::is_same<T, float>::value)
    _mm512_storeu_si512(y, _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

// Rows [0, MR) of xb (bf16 pairs, row stride k) times the kDotCols weight rows wb (row stride
// k): the (row, column) sums, scaled and rounded, into y (row stride n) at column col.
// W: the weight rows' element, c10::BFloat16 (int8_dot's widened tile) or int8_t (the codes
// as they are, widened in registers: int8_gemv's few rows, which read each code once). `ahead`
// (or null): kDotCols * k contiguous bytes of a later tile, two lines per 32 codes.
template <int MR, typename W, typename T>
void int8_dot_pass(const c10::BFloat16* xb, const W* wb, int64_t k, int64_t ncols,
                   const float* sc, T* y, int64_t n, int64_t col, const char* ahead = nullptr) {
  __m512 acc[MR * kDotCols];
  for (int j = 0; j < MR * kDotCols; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 32) {
    if (ahead != nullptr) {
      __builtin_prefetch(ahead + i * kDotCols, 0, 3);
      __builtin_prefetch(ahead + i * kDotCols + 64, 0, 3);
    }
    __m512bh w[kDotCols];
    for (int c = 0; c < kDotCols; ++c) w[c] = (__m512bh)int8_pairs_bh(wb + c * k + i);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + m * k + i);
      for (int c = 0; c < kDotCols; ++c)
        acc[m * kDotCols + c] = _mm512_dpbf16_ps(acc[m * kDotCols + c], w[c], xv);
    }
  }
  // The lane sums, 16 accumulators per reduce16 (zeros past the last): each sum's tree is the
  // same whatever its place, so a row's result does not depend on MR. Then times the column's
  // scale, rounded to bf16 (as Elt::narrow), four rows of four columns a vector.
  const __m512 scv = _mm512_broadcast_f32x4(_mm_loadu_ps(sc));
  for (int g = 0; g * 16 < MR * kDotCols; ++g) {
    __m512 part[16];
    for (int j = 0; j < 16; ++j)
      part[j] = g * 16 + j < MR * kDotCols ? acc[g * 16 + j] : _mm512_setzero_ps();
    const __m512i rounded = bf16_rounded(_mm512_mul_ps(carpool_kernels::reduce16(part), scv));
    for (int r = 0; r < 4 && 4 * g + r < MR; ++r) {
      const int64_t m = 4 * g + r;
      const __mmask8 keep = static_cast<__mmask8>((1u << ncols) - 1);  // of 4 columns
      if constexpr (std::is_same<T, float>::value) {
        const __m512i hi = _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
        const __m128 v = _mm_castsi128_ps(_mm512_extracti32x4_epi32(hi, 0));
        const __m128 w = r == 0 ? v
                         : r == 1 ? _mm_castsi128_ps(_mm512_extracti32x4_epi32(hi, 1))
                         : r == 2 ? _mm_castsi128_ps(_mm512_extracti32x4_epi32(hi, 2))
                                  : _mm_castsi128_ps(_mm512_extracti32x4_epi32(hi, 3));
        _mm_mask_storeu_ps(reinterpret_cast<float*>(y) + m * n + col, keep, w);
      } else {
        const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));  // 16 x 16 bits
        const __m128i lanes = r < 2 ? _mm256_castsi256_si128(h) : _mm256_extracti128_si256(h, 1);
        const __m128i row = (r & 1) ? _mm_srli_si128(lanes, 8) : lanes;
        _mm_mask_storeu_epi16(reinterpret_cast<uint16_t*>(y) + m * n + col, keep, row);
      }
    }
  }
}

// Rows [m, m + rows) of x spread evenly over passes of up to kDotRows (13: 5, 4, 4; not 6, 6,
// 1, as vnni_linear's) against one tile of kDotCols weight rows wb (row stride k).
template <typename W, typename T>
void int8_dot_tile(const c10::BFloat16* xb, const W* wb, int64_t rows, int64_t k, int64_t ncols,
                   const float* sc, T* y, int64_t n, int64_t col, const char* ahead) {
  const int64_t passes = (rows + kDotRows - 1) / kDotRows;
  for (int64_t p = 0, m = 0; p < passes; ++p) {
    const int64_t mr = rows / passes + (p < rows % passes ? 1 : 0);
    const c10::BFloat16* xm = xb + m * k;
    T* ym = y + m * n;
    const char* pf = p == 0 ? ahead : nullptr;  // the first pass streams the later tile
    switch (mr) {
      case 6: int8_dot_pass<6>(xm, wb, k, ncols, sc, ym, n, col, pf); break;
      case 5: int8_dot_pass<5>(xm, wb, k, ncols, sc, ym, n, col, pf); break;
      case 4: int8_dot_pass<4>(xm, wb, k, ncols, sc, ym, n, col, pf); break;
      case 3: int8_dot_pass<3>(xm, wb, k, ncols, sc, ym, n, col, pf); break;
      case 2: int8_dot_pass<2>(xm, wb, k, ncols, sc, ym, n, col, pf); break;
      default: int8_dot_pass<1>(xm, wb, k, ncols, sc, ym, n, col, pf);
    }
    m += mr;
  }
}

// Up to this many rows int8_dot_rows reads a tile's codes as they are, widening them in
// registers in every pass (at most four); past them it widens each tile once into a buffer in
// L1 that all its passes read. The same sums either way. On a Zen 4 (benchmarks/ab_int8_gemv.py,
// the small model's matrices from memory) in registers 1.35-1.45x the buffer at 2-6 rows,
// level to 1.08x at 9-24, ~0.9x at 64-128. On the AMX Xeon the buffer from 7 rows (int8_dot
// takes 9 and up there): small's matrices 1.10-1.19x at 12-24 rows, 0.9-1.12x at 9-11 in runs
// of the same rows, medium's 1.08x / 1.12x / 1.19x at 9-12 / 16 / 24 (issue 11, forty-second
// pass).
#if defined(__AMX_TILE__)
constexpr int64_t kDotDirectRows = kDotRows;
#else
constexpr int64_t kDotDirectRows = 4 * kDotRows;
#endif

template <typename T>
void int8_dot_rows(const T* x, const int8_t* q, const c10::BFloat16* scale, T* y, int64_t rows,
                   int64_t n, int64_t k) {
  // The input rows once in bf16, in int8_pairs_bh's pairs (x[l], x[l + 16]) per 32, shared by
  // the threads.
  std::vector<c10::BFloat16> xb(rows * k);
  auto* xr = reinterpret_cast<uint16_t*>(xb.data());
  for (int64_t i = 0; i < rows * k; i += 32)
    for (int64_t l = 0; l < 16; ++l) {
      xr[i + 2 * l] = Elt<c10::BFloat16>::narrow(Elt<T>::load(x + i, l));
      xr[i + 2 * l + 1] = Elt<c10::BFloat16>::narrow(Elt<T>::load(x + i, l + 16));
    }
  const int64_t tiles = (n + kDotCols - 1) / kDotCols;
  const bool direct = rows <= kDotDirectRows;
  // One contiguous run of tiles per thread, so that each streams its codes in order and asks
  // for the tile kDotAhead tiles on during a tile's first pass (int8_rows' split; chunks of 16
  // tiles without those prefetches ran 1.0-1.2x slower at 9-64 rows).
  constexpr int64_t kDotAhead = 2;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(16, (tiles + threads - 1) / threads);
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    std::vector<c10::BFloat16> wb;  // a tile's codes in bf16 (zeros past the last column)
    // Tile ta's codes, to bring into cache, where whole and in this run (else null).
    auto codes_of = [&](int64_t ta) -> const char* {
      return ta < t1 && (ta + 1) * kDotCols <= n
                 ? reinterpret_cast<const char*>(q + ta * kDotCols * k)
                 : nullptr;
    };
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t col = t * kDotCols, ncols = std::min<int64_t>(kDotCols, n - col);
      // One row: 16 columns a call while the run has them (t steps over the other three).
      if (rows == 1 && t + 4 <= t1 && col + 16 <= n) {
        auto ahead = [&](int64_t c0) { return codes_of(t + c0 / kDotCols + kDotAhead); };
        int8_dot_row16(xb.data(), q + col * k, k, scale + col, y + col, ahead);
        t += 3;
        continue;
      }
      float sc[kDotCols];
      for (int64_t c = 0; c < ncols; ++c) sc[c] = Elt<c10::BFloat16>::load(scale, col + c);
      const char* ahead = codes_of(t + kDotAhead);
      if (direct && ncols == kDotCols) {
        int8_dot_tile(xb.data(), q + col * k, rows, k, ncols, sc, y, n, col, ahead);
        continue;
      }
      wb.resize(kDotCols * k);
      for (int64_t c = 0; c < kDotCols; ++c) {
        c10::BFloat16* dst = wb.data() + c * k;
        if (c >= ncols) {  // past the last column: zeros (their sums are not stored)
          std::fill(dst, dst + k, c10::BFloat16(0.0f));
          continue;
        }
        const int8_t* src = q + (col + c) * k;
        for (int64_t i = 0; i < k; i += 32) _mm512_storeu_si512(dst + i, int8_pairs_bh(src + i));
      }
      int8_dot_tile(xb.data(), wb.data(), rows, k, ncols, sc, y, n, col, ahead);
    }
  });
}
#endif

// Whether this build has int8_dot's loop (AVX-512 BF16).
bool int8_dot_fast() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

at::Tensor int8_dot(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_int8_args("int8_dot", x, qweight, scales, false);
  TORCH_CHECK(int8_dot_fast(), "int8_dot: this build has no AVX-512 BF16 (int8_dot_fast())");
  TORCH_CHECK(x.size(1) % 32 == 0, "int8_dot: K must be a multiple of 32, got ", x.size(1));
  const int64_t m = x.size(0), n = qweight.size(0), k = x.size(1);
  at::Tensor y = at::empty({m, n}, x.options());  // x's dtype (float32: bf16 values widened)
#if defined(__AVX512BF16__)
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const c10::BFloat16* sp = scales.data_ptr<c10::BFloat16>();
  if (x.scalar_type() == at::kFloat)
    int8_dot_rows(x.data_ptr<float>(), qp, sp, y.data_ptr<float>(), m, n, k);
  else
    int8_dot_rows(x.data_ptr<c10::BFloat16>(), qp, sp, y.data_ptr<c10::BFloat16>(), m, n, k);
#endif
  return y;
}

// int4 weight-only products of any number of rows (quant.Int4Linear: up to 128) over torch's
// own CPU int4 layout (what _weight_int4pack_mm_for_cpu reads, so no second copy): packed
// [N/B, K, B/2] bytes, byte j of (block, k) holding column j in its low nibble and column
// B/2 + j in its high one, with B = 64 where torch's kernels are built for AVX-512 and 32 for
// AVX2 or plain loops (four of its float vectors; the caller says which: quant.int4_row_block);
// scales_zeros [K/g, N, 2] bf16, w = (q - 8) * scale + zero per group of g inputs. Each instruction set has a loop for its own
// B; another B takes the plain loops (correct, slow).
// Why: torch's kernel is compute-bound at one row (~6.5 GB/s of codes here): SmolLM2's 30
// layers spent ~6 ms of a ~16 ms step in it. Per group the sums factor as
// scale * sum(x * q) + (zero - 8 * scale) * sum(x): the inner loop is one widening, two nibble
// masks, two conversions and FMAs per 16 codes, with the scales applied once per group.
// Float32 sums of bf16 inputs, rounded once to bf16 (the order differs from torch's kernel).
// A float32 x (a quantized GGUF model's activations) is rounded to bf16 first and the bf16
// result widened back, exactly what casting around torch's bf16 kernel did, in the same pass:
// two ops fewer per linear (SmolLM2 at batch 1: ~240 dispatches per step).
// What an int4 kernel stores of a float32 sum: rounded to bf16 (int4_gemv), or as it is
// (Exact: int4_logits).
template <bool Exact>
inline float int4_out(float v) {
  return Exact ? v : Elt<c10::BFloat16>::round(v);
}

#if defined(__AVX512F__) || defined(CARPOOL_AVX2)
// Ask for the (scale, zero) pairs of group gi's columns [col, col + cols) (cols * 4 bytes).
// A group's pairs lie N * 4 bytes after the group before's: a stride the hardware prefetchers
// did not follow, so each group's waited on memory. The loops ask two groups ahead: 1.20x at
// one row of SmolLM2's layers, 1.27x at four (the AVX-512 BF16 loop; int4_logits' loop 1.31-
// 1.37x at 1-4 rows, the AVX2 loops 1.04-1.19x; BENCHMARKS.md, issue 11, twentieth pass).
inline void prefetch_scales(const c10::BFloat16* sz, int64_t gi, int64_t n, int64_t col,
                            int64_t cols) {
  const char* p = reinterpret_cast<const char*>(sz + (gi * n + col) * 2);
  for (int64_t l = 0; l < cols * 4; l += 64) _mm_prefetch(p + l, _MM_HINT_T0);
}
#endif

#if defined(CARPOOL_AVX2)
// Eight (scale, zero) bf16 pairs of int4 columns as float32 vectors: the scale, and the offset
// zero - 8 * scale that multiplies a group's input sum.
inline void int4_scale_offset8(const c10::BFloat16* pairs, __m256& sc, __m256& off) {
  const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs));
  sc = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
  const __m256 ze = _mm256_castsi256_ps(
      _mm256_and_si256(pair, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  off = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), sc, ze);
}

// Eight float32 sums stored as T at y[0..7]: rounded to bf16 first unless Exact.
template <bool Exact, typename T>
inline void store8_out(T* y, __m256 v) {
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int e = 0; e < 8; ++e) Elt<T>::store(y, e, int4_out<Exact>(tmp[e]));
}
#endif

// Column c of one input row (xf, its per-group sums xsum) in the fused multiply-adds of
// int4_block's vector lanes, in their order: the same bits as its loops.
inline float int4_column(const float* xf, const float* xsum, const uint8_t* packed,
                         const c10::BFloat16* sz, int64_t n, int64_t k, int64_t g, int64_t B,
                         int64_t c) {
  using E = Elt<c10::BFloat16>;
  const uint8_t* qb = packed + (c / B) * k * (B / 2);
  const int64_t byte = c % (B / 2), shift = c % B < B / 2 ? 0 : 4;
  float total = 0.f;
  for (int64_t gi = 0; gi < k / g; ++gi) {
    float acc = 0.f;
    for (int64_t i = gi * g; i < (gi + 1) * g; ++i)
      acc = std::fma(static_cast<float>((qb[i * (B / 2) + byte] >> shift) & 0xF), xf[i], acc);
    const float sc = E::load(sz, (gi * n + c) * 2);
    const float ze = E::load(sz, (gi * n + c) * 2 + 1);
    total = std::fma(sc, acc, total);
    total = std::fma(std::fma(-8.0f, sc, ze), xsum[gi], total);
  }
  return total;
}

// Output columns [b * B, (b + 1) * B) of M (1-4) input rows: xf and xsum (float32 rows, their
// per-group sums) and y start at the group's first row. Each row's sums run in the same order
// whatever M is (its own accumulators, the same K order): a row's result does not depend on the
// rows beside it. Every column takes the same fused multiply-adds in every loop below (per
// group acc = fma(q, x, acc) along K, then out = fma(scale, acc, out) and out = fma(zero - 8
// scale, sum(x), out), the offset itself one fma): int4_column computes one column alone with
// the same bits. Exact: the sums stored as they are (float32 T), else rounded to bf16.
template <int64_t M, bool Exact, typename T>
void int4_block(const float* xf, const float* xsum, const uint8_t* packed,
                const c10::BFloat16* sz, T* y, int64_t n, int64_t k, int64_t g, int64_t B,
                int64_t b) {
  const int64_t groups = k / g;
  [[maybe_unused]] const uint8_t* qb = packed + b * k * (B / 2);
#if defined(__AVX512F__)
  if (B == 64) {
    __m512 out[M][4];
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < 4; ++j) out[m][j] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi32(0xF);
    for (int64_t gi = 0; gi < groups; ++gi) {
      __m512 acc[M][4];
      for (int64_t m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
      if (gi + 2 < groups) prefetch_scales(sz, gi + 2, n, b * 64, 64);
      for (int64_t i = gi * g; i < (gi + 1) * g; ++i) {
        const uint8_t* q = qb + i * 32;
        _mm_prefetch(reinterpret_cast<const char*>(q) + 2048, _MM_HINT_T0);
        const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
        const __m512 w[4] = {_mm512_cvtepi32_ps(_mm512_and_si512(b0, low4)),
                             _mm512_cvtepi32_ps(_mm512_and_si512(b1, low4)),
                             _mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)),
                             _mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4))};
        for (int64_t m = 0; m < M; ++m) {
          const __m512 xv = _mm512_set1_ps(xf[m * k + i]);
          for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_fmadd_ps(w[j], xv, acc[m][j]);
        }
      }
      // Columns 16j..16j+15 of the block: (scale, zero) pairs -> two float32 vectors.
      for (int j = 0; j < 4; ++j) {
        const __m512i pair = _mm512_loadu_si512(sz + (gi * n + b * 64 + 16 * j) * 2);
        const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
        const __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(0xFFFF0000)));
        const __m512 off = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sc, ze);  // zero - 8 scale
        for (int64_t m = 0; m < M; ++m) {
          out[m][j] = _mm512_fmadd_ps(sc, acc[m][j], out[m][j]);
          out[m][j] = _mm512_fmadd_ps(off, _mm512_set1_ps(xsum[m * groups + gi]), out[m][j]);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < 4; ++j) {
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, out[m][j]);
        for (int c = 0; c < 16; ++c)
          Elt<T>::store(y + m * n, b * 64 + 16 * j + c, int4_out<Exact>(tmp[c]));
      }
    return;
  }
#elif defined(CARPOOL_AVX2)
  // 3-4 rows x 32 columns of accumulators would spill (AVX2 has 16 vector registers): two
  // passes of 16 columns, over bytes 8h..8h+7 of each input's 16 (columns 8h.. and 16 + 8h..).
  // Every column sums the same products in the same order as in the one-pass loop below, so
  // the bits are the same whatever the row count.
  if (B == 32 && M >= 3) {
    const __m256i low4 = _mm256_set1_epi32(0xF);
    for (int h = 0; h < 2; ++h) {
      __m256 out[M][2];
      for (int64_t m = 0; m < M; ++m) out[m][0] = out[m][1] = _mm256_setzero_ps();
      for (int64_t gi = 0; gi < groups; ++gi) {
        __m256 acc[M][2];
        for (int64_t m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        if (gi + 2 < groups) prefetch_scales(sz, gi + 2, n, b * 32, 32);
        for (int64_t i = gi * g; i < (gi + 1) * g; ++i) {
          const uint8_t* q = qb + i * 16 + 8 * h;
          const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
          const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low4));
          const __m256 w1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
          for (int64_t m = 0; m < M; ++m) {
            const __m256 xv = _mm256_set1_ps(xf[m * k + i]);
            acc[m][0] = _mm256_fmadd_ps(w0, xv, acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(w1, xv, acc[m][1]);
          }
        }
        for (int c = 0; c < 2; ++c) {
          const int j = h + 2 * c;  // columns 8j..8j+7
          __m256 sc, off;
          int4_scale_offset8(sz + (gi * n + b * 32 + 8 * j) * 2, sc, off);
          for (int64_t m = 0; m < M; ++m) {
            out[m][c] = _mm256_fmadd_ps(sc, acc[m][c], out[m][c]);
            out[m][c] = _mm256_fmadd_ps(off, _mm256_set1_ps(xsum[m * groups + gi]), out[m][c]);
          }
        }
      }
      for (int64_t m = 0; m < M; ++m)
        for (int c = 0; c < 2; ++c)
          store8_out<Exact>(y + m * n + b * 32 + 8 * (h + 2 * c), out[m][c]);
    }
    return;
  }
  // The same loop on 8-lane vectors: B = 32 columns are 16 bytes per input, four vectors.
  if (B == 32) {
    __m256 out[M][4];
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < 4; ++j) out[m][j] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi32(0xF);
    for (int64_t gi = 0; gi < groups; ++gi) {
      __m256 acc[M][4];
      for (int64_t m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
      if (gi + 2 < groups) prefetch_scales(sz, gi + 2, n, b * 32, 32);
      for (int64_t i = gi * g; i < (gi + 1) * g; ++i) {
        const uint8_t* q = qb + i * 16;
        _mm_prefetch(reinterpret_cast<const char*>(q) + 1024, _MM_HINT_T0);
        const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
        const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
        const __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_and_si256(b0, low4)),
                             _mm256_cvtepi32_ps(_mm256_and_si256(b1, low4)),
                             _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)),
                             _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4))};
        for (int64_t m = 0; m < M; ++m) {
          const __m256 xv = _mm256_set1_ps(xf[m * k + i]);
          for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_fmadd_ps(w[j], xv, acc[m][j]);
        }
      }
      // Columns 8j..8j+7 of the block: (scale, zero) pairs -> two float32 vectors.
      for (int j = 0; j < 4; ++j) {
        __m256 sc, off;
        int4_scale_offset8(sz + (gi * n + b * 32 + 8 * j) * 2, sc, off);
        for (int64_t m = 0; m < M; ++m) {
          out[m][j] = _mm256_fmadd_ps(sc, acc[m][j], out[m][j]);
          out[m][j] = _mm256_fmadd_ps(off, _mm256_set1_ps(xsum[m * groups + gi]), out[m][j]);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < 4; ++j) store8_out<Exact>(y + m * n + b * 32 + 8 * j, out[m][j]);
    return;
  }
#endif
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < B; ++c) {
      const float total = int4_column(xf + m * k, xsum + m * groups, packed, sz, n, k, g, B,
                                      b * B + c);
      Elt<T>::store(y + m * n, b * B + c, int4_out<Exact>(total));
    }
}

// A prefill's rows in spans of at most this many (each span over every column block before the
// next): 512 rows' inputs (1.2 MB as float32) were read again for every column block, from
// past L2; a span's (~220 KB) stay in it. SmolLM2's layers 1.03-1.07x at 160-512 rows
// (benchmarks/ab_int4_gemv.py; BENCHMARKS.md, issue 11, twenty-ninth pass). The same bits.
constexpr int64_t kInt4RowSpan = 96;

#if defined(CARPOOL_AVX2)
// Many rows on AVX2 (B = 32): int4_block widens a block's codes to float32 again for every
// group of 1-4 rows, and its 8 accumulators leave the FMA units waiting on their latency
// (10 chains keep both busy): at 32 rows SmolLM2's layers ran at ~135 of the 2 cores' ~208
// GFLOP/s. Here each group of K inputs is widened once into a small float32 buffer that every
// group of up to 6 rows (12 accumulators, the weights loaded from L1) then reads: SmolLM2's
// layers 1.02-1.07x at 24-512 rows, level at 16, slower below (benchmarks/ab_int4_gemv.py; a
// standalone harness 1.05-1.16x; BENCHMARKS.md, issue 11, twenty-ninth pass). It matters since
// a prefill's rows take this kernel too where bf16 is emulated (fused_ops.py, ANY_ROWS). Every
// column takes the same fused multiply-adds in the same order as in int4_block (per group acc =
// fma(q, x, acc) along K from zero, then out = fma(scale, acc, out) and out = fma(zero - 8
// scale, sum(x), out)): the same bits whichever loop a row count takes.
constexpr int64_t kInt4WidenedRows = 24;  // from this many rows, int4_rows widens each group once

// Rows [0, M) of the group: columns [16h, 16h + 16) of the buffer's 32, two passes; ob holds
// each row's 32 running sums (out), updated once per group.
template <int64_t M>
inline void int4_widened_rows(const float* wb, const float* xf, const float* xsum,
                              const c10::BFloat16* sz, float* ob, int64_t n, int64_t k,
                              int64_t g, int64_t b, int64_t gi) {
  const int64_t groups = k / g;
  for (int h = 0; h < 2; ++h) {
    __m256 acc[M][2];
    for (int64_t m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < g; ++i) {
      const __m256 w0 = _mm256_load_ps(wb + i * 32 + 16 * h);
      const __m256 w1 = _mm256_load_ps(wb + i * 32 + 16 * h + 8);
      for (int64_t m = 0; m < M; ++m) {
        const __m256 xv = _mm256_set1_ps(xf[m * k + gi * g + i]);
        acc[m][0] = _mm256_fmadd_ps(w0, xv, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, xv, acc[m][1]);
      }
    }
    for (int c = 0; c < 2; ++c) {
      const int64_t col = 16 * h + 8 * c;
      __m256 sc, off;
      int4_scale_offset8(sz + (gi * n + b * 32 + col) * 2, sc, off);
      for (int64_t m = 0; m < M; ++m) {
        __m256 o = _mm256_load_ps(ob + m * 32 + col);
        o = _mm256_fmadd_ps(sc, acc[m][c], o);
        o = _mm256_fmadd_ps(off, _mm256_set1_ps(xsum[m * groups + gi]), o);
        _mm256_store_ps(ob + m * 32 + col, o);
      }
    }
  }
}

// Output columns [32b, 32b + 32) of all `rows` rows (xf, xsum and y at row 0). wb: g * 32
// floats, ob: rows * 32 floats, both 32-byte aligned (the caller's, reused across blocks).
template <bool Exact, typename T>
void int4_block_widened(int64_t rows, const float* xf, const float* xsum, const uint8_t* packed,
                        const c10::BFloat16* sz, T* y, int64_t n, int64_t k, int64_t g,
                        int64_t b, float* wb, float* ob) {
  const int64_t groups = k / g;
  const uint8_t* qb = packed + b * k * 16;
  std::fill(ob, ob + rows * 32, 0.f);
  const __m256i low4 = _mm256_set1_epi32(0xF);
  for (int64_t gi = 0; gi < groups; ++gi) {
    if (gi + 2 < groups) prefetch_scales(sz, gi + 2, n, b * 32, 32);
    for (int64_t i = 0; i < g; ++i) {  // wb row i: columns 0-15 (low nibbles), 16-31 (high)
      const uint8_t* q = qb + (gi * g + i) * 16;
      _mm_prefetch(reinterpret_cast<const char*>(q) + 1024, _MM_HINT_T0);
      const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
      const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
      _mm256_store_ps(wb + i * 32, _mm256_cvtepi32_ps(_mm256_and_si256(b0, low4)));
      _mm256_store_ps(wb + i * 32 + 8, _mm256_cvtepi32_ps(_mm256_and_si256(b1, low4)));
      _mm256_store_ps(wb + i * 32 + 16, _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)));
      _mm256_store_ps(wb + i * 32 + 24, _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)));
    }
    for (int64_t m0 = 0; m0 < rows; m0 += 6) {
      const int64_t m1 = std::min<int64_t>(rows, m0 + 6);
      const float* xg = xf + m0 * k;
      const float* sg = xsum + m0 * groups;
      float* og = ob + m0 * 32;
      switch (m1 - m0) {
        case 1: int4_widened_rows<1>(wb, xg, sg, sz, og, n, k, g, b, gi); break;
        case 2: int4_widened_rows<2>(wb, xg, sg, sz, og, n, k, g, b, gi); break;
        case 3: int4_widened_rows<3>(wb, xg, sg, sz, og, n, k, g, b, gi); break;
        case 4: int4_widened_rows<4>(wb, xg, sg, sz, og, n, k, g, b, gi); break;
        case 5: int4_widened_rows<5>(wb, xg, sg, sz, og, n, k, g, b, gi); break;
        default: int4_widened_rows<6>(wb, xg, sg, sz, og, n, k, g, b, gi); break;
      }
    }
  }
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t c = 0; c < 32; ++c)
      Elt<T>::store(y + m * n, b * 32 + c, int4_out<Exact>(ob[m * 32 + c]));
}
#endif

#if defined(__AVX512BF16__)
// The bf16 values of the int4 codes 0..15 (exact), a vpermw table: twice, so that a word
// holding a code byte looks up its low nibble's value by the word's low five bits, unmasked.
alignas(64) constexpr uint16_t kInt4Bf16[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120,
    0x4130, 0x4140, 0x4150, 0x4160, 0x4170, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0,
    0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

// int4_block's loop for bf16-rounded rows (int4_gemv) on AVX-512 BF16, B = 64, an even group:
// two inputs at a time in vdpbf16ps, which adds a lane's odd product and then its even one,
// each rounded, with products of bf16 values exact in float32: fma(q_i, x_i, acc) then
// fma(q_i+1, x_i+1, acc), the very operations of int4_block's lanes, so the same bits (but for
// the instruction's flush of subnormal inputs and sums to zero, far below a bf16 activation's
// scale). Why: the loop above is one widening, two masks, four conversions and four FMAs per 64
// codes, compute-bound at one row (~30 GB/s of codes on a Zen 5 core, in cache); here per 128
// codes two widenings to 16 bits, two unpacks, two masks, four table lookups of the codes'
// bf16 values and four dot products. This loop with the scales asked for ahead (below) against
// the FMA loop without them, SmolLM2's 120 layer matrices from memory on huge pages: 1.35x at
// one row, 1.80x at four (BENCHMARKS.md, issue 11, twentieth pass). xp: per row k / 2 pairs of bf16 inputs, input i in
// the high half (the odd element, added first) and i + 1 in the low one.
//
// Lanes are columns in pair order: the unpacks put byte 8L + e (L < 4, e < 4) of the low
// (high) unpack in lane 4L + e; byte j holds column j in its low nibble and 32 + j in its high
// one, so vector 0 holds columns 8L + e, vector 1 8L + 4 + e, vectors 2 and 3 the same + 32.
// The scales are permuted to that order once per group, the sums back at the end.
// The four bf16 vectors of a block's input pair (i, i + 1) whose 64 bytes of codes are at q
// (vector j: the lanes' order above), through the table of the codes' bf16 values.
// InputOrder: input i in the low word and i + 1 in the high one instead (as a bf16 row's own
// pairs: int4_block_amx's tiles).
template <bool InputOrder = false>
[[gnu::always_inline]] inline void int4_dp_codes(const uint8_t* q, __m512i table, __m512bh w[4]) {
#if defined(__AVX512VBMI__)
  // The same 32-bit lanes from one byte permute each (zeroing the high byte of every word):
  // lane t of `lo` holds byte 32 + j (input i + 1) in its low word and byte j (input i) in its
  // high one (InputOrder: the other way round), j = 8 (t / 4) + t % 4; `hi` the same for j + 4.
  // Two shuffles where the widenings and unpacks took four: the one-row dot-product loop 1.10x
  // (issue 11, forty-third pass; its dot products, not its shuffles, bound it).
  const __m512i codes = _mm512_loadu_si512(q);
  const __mmask64 even_bytes = 0x5555555555555555ULL;
  const __m512i pick_lo = InputOrder
      ? _mm512_set_epi8(0, 59, 0, 27, 0, 58, 0, 26, 0, 57, 0, 25, 0, 56, 0, 24, 0, 51, 0, 19, 0,
                        50, 0, 18, 0, 49, 0, 17, 0, 48, 0, 16, 0, 43, 0, 11, 0, 42, 0, 10, 0, 41,
                        0, 9, 0, 40, 0, 8, 0, 35, 0, 3, 0, 34, 0, 2, 0, 33, 0, 1, 0, 32, 0, 0)
      : _mm512_set_epi8(0, 27, 0, 59, 0, 26, 0, 58, 0, 25, 0, 57, 0, 24, 0, 56, 0, 19, 0, 51, 0,
                        18, 0, 50, 0, 17, 0, 49, 0, 16, 0, 48, 0, 11, 0, 43, 0, 10, 0, 42, 0, 9,
                        0, 41, 0, 8, 0, 40, 0, 3, 0, 35, 0, 2, 0, 34, 0, 1, 0, 33, 0, 0, 0, 32);
  const __m512i lo = _mm512_maskz_permutexvar_epi8(even_bytes, pick_lo, codes);
  const __m512i hi = _mm512_maskz_permutexvar_epi8(
      even_bytes, _mm512_add_epi8(pick_lo, _mm512_set1_epi8(4)), codes);
#else
  __m512i a = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
  if (InputOrder) std::swap(a, c);
  const __m512i lo = _mm512_unpacklo_epi16(c, a);  // (i + 1, i) of bytes 8L + e
  const __m512i hi = _mm512_unpackhi_epi16(c, a);  // of bytes 8L + 4 + e
#endif
  // Low nibbles: vpermw reads an index's low five bits, and the table repeats past 16.
  w[0] = (__m512bh)_mm512_permutexvar_epi16(lo, table);
  w[1] = (__m512bh)_mm512_permutexvar_epi16(hi, table);
  w[2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(lo, 4), table);
  w[3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(hi, 4), table);
}

// Group gi's (scale, zero - 8 scale) of columns [col, col + 32) (col = 64 b + 32 h), in column
// order, then in the lanes' order of vectors 2h and 2h + 1: s2 / o2 [v] for vector 2h + v.
[[gnu::always_inline]] inline void int4_dp_scales(const c10::BFloat16* sz, int64_t gi, int64_t n,
                                                  int64_t col, __m512 s2[2], __m512 o2[2]) {
  const __m512i pick_lo = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i pick_hi = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  __m512 sc[2], off[2];
  for (int v = 0; v < 2; ++v) {
    const __m512i pair = _mm512_loadu_si512(sz + (gi * n + col + 16 * v) * 2);
    sc[v] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
    const __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(0xFFFF0000)));
    off[v] = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sc[v], ze);  // zero - 8 scale
  }
  s2[0] = _mm512_permutex2var_ps(sc[0], pick_lo, sc[1]);
  s2[1] = _mm512_permutex2var_ps(sc[0], pick_hi, sc[1]);
  o2[0] = _mm512_permutex2var_ps(off[0], pick_lo, off[1]);
  o2[1] = _mm512_permutex2var_ps(off[0], pick_hi, off[1]);
}

template <int64_t M, int NB, typename T>
void int4_block_dp(const uint32_t* xp, const float* xsum, const uint8_t* packed,
                   const c10::BFloat16* sz, T* y, int64_t n, int64_t k, int64_t g, int64_t b) {
  const int64_t groups = k / g, half = k / 2;
  const __m512i table = _mm512_load_si512(kInt4Bf16);
  __m512 out[M][4 * NB];
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < 4 * NB; ++j) out[m][j] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < groups; ++gi) {
    __m512 acc[M][4 * NB];
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < 4 * NB; ++j) acc[m][j] = _mm512_setzero_ps();
    // The scales two groups ahead (prefetch_scales); in a block's last two groups, the next
    // blocks' first two (1.00-1.07x at 1-8 rows).
    for (int nb = 0; nb < NB; ++nb) {
      const bool inside = gi + 2 < groups;
      const int64_t col = (inside ? b + nb : b + NB + nb) * 64;
      if (col < n) prefetch_scales(sz, inside ? gi + 2 : gi + 2 - groups, n, col, 64);
    }
    for (int64_t i = gi * g; i < (gi + 1) * g; i += 2) {
      __m512bh xv[M];
      for (int64_t m = 0; m < M; ++m)
        xv[m] = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[m * half + i / 2]));
      for (int nb = 0; nb < NB; ++nb) {
        const uint8_t* q = packed + ((b + nb) * k + i) * 32;
        // Codes 4 KiB ahead: 1.02-1.03x the FMA loop's 2 KiB here.
        _mm_prefetch(reinterpret_cast<const char*>(q) + 4096, _MM_HINT_T0);
        __m512bh w[4];
        int4_dp_codes(q, table, w);
        for (int64_t m = 0; m < M; ++m)
          for (int j = 0; j < 4; ++j)
            acc[m][4 * nb + j] = _mm512_dpbf16_ps(acc[m][4 * nb + j], w[j], xv[m]);
      }
    }
    // Columns 32h..32h+31 of each block: (scale, zero) pairs in column order, then in the
    // lanes' order.
    for (int nb = 0; nb < NB; ++nb)
      for (int h = 0; h < 2; ++h) {
        __m512 s2[2], o2[2];
        int4_dp_scales(sz, gi, n, (b + nb) * 64 + 32 * h, s2, o2);
        for (int64_t m = 0; m < M; ++m)
          for (int v = 0; v < 2; ++v) {
            __m512& o = out[m][4 * nb + 2 * h + v];
            o = _mm512_fmadd_ps(s2[v], acc[m][4 * nb + 2 * h + v], o);
            o = _mm512_fmadd_ps(o2[v], _mm512_set1_ps(xsum[m * groups + gi]), o);
          }
      }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < 4 * NB; ++j) {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, out[m][j]);
      const int64_t col0 = (b + j / 4) * 64 + 32 * (j % 4 / 2) + 4 * (j % 2);
      for (int lane = 0; lane < 16; ++lane)
        Elt<T>::store(y + m * n, col0 + 8 * (lane / 4) + lane % 4, int4_out<false>(tmp[lane]));
    }
}

// Many rows on AVX-512 BF16 (B = 64): int4_block_dp decodes a block's codes to bf16 again for
// every group of 1-4 rows (two widenings, two unpacks, four masks or shifts and four table
// lookups per four dot products of a row). Here the block's codes are decoded once into a
// buffer of bf16 pairs (a span of up to kInt4CodeSpan inputs at a time) that every tile of up
// to 6 rows then reads (see int4_block_dp_widened). Every column takes int4_block_dp's
// operations in its order (per group acc = dot products along K from zero, then out =
// fma(scale, acc, out) and out = fma(zero - 8 scale, sum(x), out)): the same bits whichever
// loop a row count takes. It matters since a prefill's rows take the kernel too (fused_ops.py,
// ANY_ROWS): a row's numbers do not depend on the rows beside it. SmolLM2's layers from memory
// (benchmarks/ab_int4_gemv.py --huge-pages, a Zen 4): 1.09-1.17x at 64 rows, 1.13-1.18x at 128, 1.15-1.22x at 512; 0.86-0.98x at 8-32
// (there the 1-4-row loop keeps its sums in registers), hence from 48 (BENCHMARKS.md, issue
// 11, thirtieth pass). Rows in spans of kInt4RowSpan, as on AVX2. On the AMX Xeon the buffer
// won from 5 rows: SmolLM2's layers 1.13x / 1.17x / 1.18x / 1.21x at 5 / 8 / 16 / 32
// rows, 1.00x at 2-4 and 64 (benchmarks/ab_int4_gemv.py, float32 and bf16 rows alike; issue 11,
// forty-second pass); since the forty-third, an AMX build multiplies on tiles instead
// (int4_block_amx) but for groups that are not a multiple of 32. The same bits either way
// (tested).
#if defined(__AMX_TILE__)
constexpr int64_t kInt4DpWidenedRows = 5;  // from this many rows, int4_rows decodes a group once
#else
constexpr int64_t kInt4DpWidenedRows = 48;
#endif

// Rows [0, M) of column half h (vectors 2h and 2h + 1 of int4_block_dp's four) over groups
// [g0, g1): per group the two vectors' dot products along its g / 2 pairs from zero, then each
// row's running sums o = fma(scale, acc, o) and o = fma(zero - 8 scale, sum(x), o), kept in
// registers across the groups (12 sums and 12 products at 6 rows); read from ob (each row's 64
// sums in the vectors' lane order) where g0 > 0 and stored there at the end. wb: the span's
// decoded pairs (4 vectors a pair, group after group, from group g0), sv / ov: its groups' 4
// scale and 4 offset vectors each.
template <int64_t M>
inline void int4_dp_widened_rows(const __m512bh* wb, const uint32_t* xp, const float* xsum,
                                 const __m512* sv, const __m512* ov, float* ob, int64_t half,
                                 int64_t groups, int64_t g, int h, int64_t g0, int64_t g1) {
  __m512 o[M][2];
  for (int64_t m = 0; m < M; ++m) {
    for (int j = 0; j < 2; ++j) {
      o[m][j] = g0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(ob + m * 64 + 16 * (2 * h + j));
    }
  }
  for (int64_t gi = g0; gi < g1; ++gi) {
    __m512 acc[M][2];
    for (int64_t m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    const int64_t p0 = gi * g / 2;
    const __m512bh* wg = wb + (gi - g0) * g / 2 * 4;  // the group's pairs, 4 vectors each
    for (int64_t p = 0; p < g / 2; ++p) {
      const __m512bh w0 = wg[4 * p + 2 * h], w1 = wg[4 * p + 2 * h + 1];
      for (int64_t m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[m * half + p0 + p]));
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xv);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xv);
      }
    }
    const __m512* sg = sv + 4 * (gi - g0) + 2 * h;
    const __m512* og = ov + 4 * (gi - g0) + 2 * h;
    for (int64_t m = 0; m < M; ++m) {
      const __m512 xs = _mm512_set1_ps(xsum[m * groups + gi]);
      for (int j = 0; j < 2; ++j) {
        o[m][j] = _mm512_fmadd_ps(sg[j], acc[m][j], o[m][j]);
        o[m][j] = _mm512_fmadd_ps(og[j], xs, o[m][j]);
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < 2; ++j) _mm512_store_ps(ob + m * 64 + 16 * (2 * h + j), o[m][j]);
}

// Rows' 64 sums of block b in the vectors' lane order (ob: rows * 64 floats) to their columns
// of y, rounded to bf16: vector 2h + v, lane 4L + e holds column 32h + 8L + 4v + e.
template <typename T>
void int4_store_lane_order(const float* ob, int64_t rows, T* y, int64_t n, int64_t b) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t m = 0; m < rows; ++m)
    for (int h = 0; h < 2; ++h) {
      const __m512 v0 = _mm512_load_ps(ob + m * 64 + 32 * h);
      const __m512 v1 = _mm512_load_ps(ob + m * 64 + 32 * h + 16);
      T* out = y + m * n + b * 64 + 32 * h;
      store16(out, round16(_mm512_permutex2var_ps(v0, first, v1), c10::BFloat16{}));
      store16(out + 16, round16(_mm512_permutex2var_ps(v0, second, v1), c10::BFloat16{}));
    }
}

// At most this many inputs' codes decoded at a time by int4_block_dp_widened (256 KB of bf16
// pairs: in L2 beside a span of rows' inputs; a 7B model's 11,008 would be 1.4 MB, past it).
constexpr int64_t kInt4CodeSpan = 2048;

// Groups in a span of int4_block_dp_widened's codes (k inputs in groups of g): kInt4CodeSpan
// inputs' worth, at least one group, at most all of them.
inline int64_t int4_span_groups(int64_t k, int64_t g) {
  return std::min(k / g, std::max<int64_t>(1, kInt4CodeSpan / g));
}

// Output columns [64b, 64b + 64) of all `rows` rows (xp, xsum and y at row 0). wb: span * g / 2
// * 4 vectors, sc: span * 8 vectors (span = int4_span_groups(k, g)), ob: rows * 64 floats, all
// 64-byte aligned (the caller's, reused across blocks). The codes of a span of groups (up to
// kInt4CodeSpan inputs: 72 KB for SmolLM2's 576, 192 KB for its 1,536, in L2) are decoded first,
// then each tile of rows runs over all of them per half of the columns with its sums in
// registers (in ob between spans): with the groups outside the tiles (one group's codes in L1)
// every tile loaded and stored its 24 sums once per group, 19% of the kernel's time on a Zen 4
// (BENCHMARKS.md, issue 11, fifty-third pass). Each column's operations are int4_block_dp's, in
// its order: the same bits.
template <typename T>
void int4_block_dp_widened(int64_t rows, const uint32_t* xp, const float* xsum,
                           const uint8_t* packed, const c10::BFloat16* sz, T* y, int64_t n,
                           int64_t k, int64_t g, int64_t b, __m512bh* wb, __m512* sc, float* ob) {
  const int64_t groups = k / g, half = k / 2, span = int4_span_groups(k, g);
  const __m512i table = _mm512_load_si512(kInt4Bf16);
  __m512* sv = sc;             // 4 a group of the span
  __m512* ov = sc + 4 * span;  // 4 a group of the span
  // Tiles of at most 6 rows, as even as they split (8 rows: 4 + 4, not 6 + 2).
  const int64_t tiles = (rows + 5) / 6;
  for (int64_t g0 = 0; g0 < groups; g0 += span) {
    const int64_t g1 = std::min(groups, g0 + span);
    for (int64_t gi = g0; gi < g1; ++gi) {
      if (gi + 2 < groups) prefetch_scales(sz, gi + 2, n, b * 64, 64);
      for (int64_t p = gi * g / 2; p < (gi + 1) * g / 2; ++p) {  // int4_block_dp's 4 vectors
        const uint8_t* q = packed + (b * k + 2 * p) * 32;
        _mm_prefetch(reinterpret_cast<const char*>(q) + 4096, _MM_HINT_T0);
        int4_dp_codes(q, table, wb + 4 * (p - g0 * g / 2));
      }
      // The group's (scale, zero - 8 scale) in the vectors' lane order, as int4_block_dp's.
      const int64_t s = gi - g0;
      for (int h = 0; h < 2; ++h)
        int4_dp_scales(sz, gi, n, b * 64 + 32 * h, sv + 4 * s + 2 * h, ov + 4 * s + 2 * h);
    }
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m0 = rows * t / tiles;
      const uint32_t* xg = xp + m0 * half;
      const float* sg = xsum + m0 * groups;
      float* og = ob + m0 * 64;
      for (int h = 0; h < 2; ++h) {
        switch (rows * (t + 1) / tiles - m0) {
          case 1: int4_dp_widened_rows<1>(wb, xg, sg, sv, ov, og, half, groups, g, h, g0, g1); break;
          case 2: int4_dp_widened_rows<2>(wb, xg, sg, sv, ov, og, half, groups, g, h, g0, g1); break;
          case 3: int4_dp_widened_rows<3>(wb, xg, sg, sv, ov, og, half, groups, g, h, g0, g1); break;
          case 4: int4_dp_widened_rows<4>(wb, xg, sg, sv, ov, og, half, groups, g, h, g0, g1); break;
          case 5: int4_dp_widened_rows<5>(wb, xg, sg, sv, ov, og, half, groups, g, h, g0, g1); break;
          default: int4_dp_widened_rows<6>(wb, xg, sg, sv, ov, og, half, groups, g, h, g0, g1); break;
        }
      }
    }
  }
  int4_store_lane_order(ob, rows, y, n, b);
}

#if defined(CARPOOL_AMX)
// Tiles of 64-byte rows: 0-3 a row tile's sums of the four 16-column vectors and 4 its rows'
// 16 input pairs (`rows` rows: a product's rows up to 16, else 16 and whole tiles of inputs,
// the rows past the caller's zero, their sums dropped), 5 and 6 a vector's 16 pairs of codes
// (two, so that a load need not wait for the product before it to have read its tile). Once
// per task. Fewer rows take no less time in TDPBF16PS, but their loads and stores do.
inline void int4_amx_configure(int64_t rows) {
  carpool_kernels::TileConfig cfg;
  for (int t = 0; t < 5; ++t) cfg.rows[t] = static_cast<uint8_t>(rows), cfg.colsb[t] = 64;
  for (int t = 5; t < 7; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// Product s of a group (4 per 32 inputs: step s / 4's inputs, tile 4, times vector s % 4's
// 16 pairs of decoded codes in wb, tiles 5 and 6 in turn, into sum tile s % 4). The step's
// first loads its inputs. Tiles are named by immediates, hence the switch.
[[gnu::always_inline]] inline void int4_amx_product(int64_t s, const uint32_t* xg, int64_t half,
                                                    const __m512bh* wb) {
  if (s % 4 == 0) _tile_loadd(4, xg + 16 * (s / 4), half * sizeof(uint32_t));
  switch (s % 4) {
    case 0: _tile_loadd(5, wb + s * 16, 64); _tile_dpbf16ps(0, 4, 5); break;
    case 1: _tile_loadd(6, wb + s * 16, 64); _tile_dpbf16ps(1, 4, 6); break;
    case 2: _tile_loadd(5, wb + s * 16, 64); _tile_dpbf16ps(2, 4, 5); break;
    default: _tile_loadd(6, wb + s * 16, 64); _tile_dpbf16ps(3, 4, 6); break;
  }
}

// Group gi's codes of block b decoded as int4_block_dp's four vectors per input pair into wb:
// pair p is row p % 16 of vector j's tile (16 pairs of 16 columns) in the group's 32-input step
// p / 16, at wb + (p / 16 * 4 + j) * 16. WithProducts: the products of the group before (its
// codes decoded into wc, its inputs at xg) are issued among the decoding, one after every
// four pairs, so that the tile unit works while the vector units decode (issued after the
// decoding, the products and the next decoding took turns: one row ~1.08x the dot-product
// loop's time, against 0.98-1.0x so).
template <bool WithProducts>
inline void int4_amx_decode(const uint8_t* packed, __m512i table, __m512bh* wb, int64_t k,
                            int64_t g, int64_t b, int64_t gi, const __m512bh* wc = nullptr,
                            const uint32_t* xg = nullptr, int64_t half = 0) {
  for (int64_t t = 0; t < g / 32; ++t)
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p) {  // pair 16 t + p
      const uint8_t* q = packed + (b * k + gi * g + 32 * t + 2 * p) * 32;
      _mm_prefetch(reinterpret_cast<const char*>(q) + 4096, _MM_HINT_T0);
      __m512bh w[4];
      int4_dp_codes<true>(q, table, w);
      for (int j = 0; j < 4; ++j) wb[(t * 4 + j) * 16 + p] = w[j];
      if (WithProducts && p % 4 == 1) int4_amx_product(4 * t + p / 4, xg, half, wc);
    }
}

// The four sum tiles stored as rows of 64 floats (the vectors' lane order) at c.
inline void int4_amx_store_sums(float* c) {
  _tile_stored(0, c, 256);
  _tile_stored(1, c + 16, 256);
  _tile_stored(2, c + 32, 256);
  _tile_stored(3, c + 48, 256);
}

inline void int4_amx_zero_sums() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Groups int4_block_amx_tiles decodes at a time: each 16-row tile of inputs then multiplies all
// of them and adds their sums to its rows' totals with the totals in registers. SmolLM2's layers
// (benchmarks/ab_int4_gemv.py, the AMX Xeon of issue 11's forty-seventh pass): 1 and 3 about as
// fast as 2; 4 and 8 0.75-0.9x at 32-48 rows (their codes and sums leave L1).
constexpr int64_t kInt4AmxSpan = 2;

// Adds the sums of groups [g0, g0 + ng) (group g0 + s's at cbs + s * 1024, 16 rows of 64 floats
// as int4_amx_store_sums leaves them) to the running totals (ob) of R rows, with the totals in
// registers across the groups: tile row r0 + r is row t0 + r0 + r. Per group out = fma(scale,
// sum, out), then out = fma(zero - 8 scale, sum(x), out), as int4_block_dp's lanes (sv, ov:
// group g0 + s's scale and offset vectors at s).
template <int R>
inline void int4_amx_span_scale(const float* cbs, const float* xsum, const __m512 (*sv)[4],
                                const __m512 (*ov)[4], float* ob, int64_t t0, int64_t r0,
                                int64_t groups, int64_t g0, int64_t ng) {
  __m512 acc[R][4];
  float* o = ob + (t0 + r0) * 64;
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_load_ps(o + r * 64 + 16 * j);
  for (int64_t s = 0; s < ng; ++s) {
    const float* cb = cbs + s * 1024 + r0 * 64;
    for (int r = 0; r < R; ++r) {
      const __m512 xs = _mm512_set1_ps(xsum[(t0 + r0 + r) * groups + g0 + s]);
      for (int j = 0; j < 4; ++j) {
        acc[r][j] = _mm512_fmadd_ps(sv[s][j], _mm512_load_ps(cb + r * 64 + 16 * j), acc[r][j]);
        acc[r][j] = _mm512_fmadd_ps(ov[s][j], xs, acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_store_ps(o + r * 64 + 16 * j, acc[r][j]);
}

// int4_amx_span_scale over rows [t0, t0 + tr) of a tile (tr <= 16), four at a time.
inline void int4_amx_scale_tile(const float* cbs, const float* xsum, const __m512 (*sv)[4],
                                const __m512 (*ov)[4], float* ob, int64_t t0, int64_t tr,
                                int64_t groups, int64_t g0, int64_t ng) {
  int64_t r0 = 0;
  for (; r0 + 4 <= tr; r0 += 4)
    int4_amx_span_scale<4>(cbs, xsum, sv, ov, ob, t0, r0, groups, g0, ng);
  switch (tr - r0) {
    case 3: int4_amx_span_scale<3>(cbs, xsum, sv, ov, ob, t0, r0, groups, g0, ng); break;
    case 2: int4_amx_span_scale<2>(cbs, xsum, sv, ov, ob, t0, r0, groups, g0, ng); break;
    case 1: int4_amx_span_scale<1>(cbs, xsum, sv, ov, ob, t0, r0, groups, g0, ng); break;
    default: break;
  }
}

// int4 products of 1-16 rows on AMX tiles (AMX CPUs: every bf16-rounded row count, g a multiple
// of 32; past 16 rows int4_block_amx_tiles, below, the same bits).
// Why: a VDPBF16PS takes ~1.1 ns for its 32 products at every row count here, a TDPBF16PS ~5.2
// ns for 512 to 8,192 (1 to 16 rows); one row's codes-to-bf16 decoding then bounds the step,
// and each further row is almost free. Per group: the block's codes decoded once (as
// int4_block_dp's vectors, one tile row per input pair) into wb, each 16-row tile of inputs
// times them into four sum tiles from zero, then out = fma(scale, sum, out) and out =
// fma(zero - 8 scale, sum(x), out) in int4_block_dp's lane order. AMX adds a tile's products
// in its own order (neither VDPBF16PS's nor float32 FMAs' in input order: measured), so the
// sums are other bits than the other paths' (within a float32 rounding of each group's sum);
// a row's bits do not depend on the rows beside it (each tile row its own), which is what
// lets a request's tokens be the same alone or batched. Tiles as int4_amx_configure(rows) sets
// them. wbs: three buffers of g / 2 * 4 vectors, cbs: two of 16 * 64 floats, ob: rows * 64.
//
// Software-pipelined by group: decode group gi + 1 (with group gi's products among it), then
// group gi - 1's sums into the totals. A store reaches memory (where a tile load
// reads it) only once it retires, after everything before it: decoding a group right before its
// own products left them waiting for its 64 stores behind the last group's products (a row took
// ~1.15x the dot-product loop's time). Three buffers of codes (a group's are written while the
// two before may still be read), three of scales, two of sums.
template <typename T>
void int4_block_amx(int64_t rows, const uint32_t* xp, const float* xsum, const uint8_t* packed,
                    const c10::BFloat16* sz, T* y, int64_t n, int64_t k, int64_t g, int64_t b,
                    __m512bh* wbs, float* cbs, float* ob) {
  const int64_t groups = k / g, half = k / 2, wb_vectors = g / 2 * 4;
  constexpr int64_t cb_floats = 16 * 64;
  TORCH_INTERNAL_ASSERT(rows <= 16, "int4_block_amx takes one tile of rows, got ", rows);
  const __m512i table = _mm512_load_si512(kInt4Bf16);
  std::fill(ob, ob + rows * 64, 0.f);
  __m512 sv[3][4], ov[3][4];
  auto scales = [&](int64_t gi) {
    for (int h = 0; h < 2; ++h)
      int4_dp_scales(sz, gi, n, b * 64 + 32 * h, sv[gi % 3] + 2 * h, ov[gi % 3] + 2 * h);
  };
  int4_amx_decode<false>(packed, table, wbs, k, g, b, 0);
  scales(0);
  for (int64_t gi = 0; gi < groups; ++gi) {
    const __m512bh* wc = wbs + gi % 3 * wb_vectors;
    __m512bh* wn = wbs + (gi + 1) % 3 * wb_vectors;
    float* cb = cbs + gi % 2 * cb_floats;
    const bool next = gi + 1 < groups;
    if (gi + 3 < groups) prefetch_scales(sz, gi + 3, n, b * 64, 64);
    // Group gi's products among group gi + 1's decoding.
    const uint32_t* xg = xp + gi * g / 2;
    int4_amx_zero_sums();
    if (next) {
      int4_amx_decode<true>(packed, table, wn, k, g, b, gi + 1, wc, xg, half);
    } else {
      for (int64_t s = 0; s < g / 8; ++s) int4_amx_product(s, xg, half, wc);
    }
    int4_amx_store_sums(cb);
    if (next) scales(gi + 1);
    if (gi > 0) {
      const int64_t prev = gi - 1;
      int4_amx_scale_tile(cbs + prev % 2 * cb_floats, xsum, sv + prev % 3, ov + prev % 3, ob, 0,
                          rows, groups, prev, 1);
    }
  }
  const int64_t last = groups - 1;
  int4_amx_scale_tile(cbs + last % 2 * cb_floats, xsum, sv + last % 3, ov + last % 3, ob, 0, rows,
                      groups, last, 1);
  int4_store_lane_order(ob, rows, y, n, b);
}

// int4_block_amx past 16 rows: kInt4AmxSpan groups' codes decoded, then per 16-row tile of
// inputs all their products (sums into cbs, one 16 x 64 buffer a group) and their sums added to
// the tile's totals four rows at a time, the totals in registers across the groups. Before (the
// forty-third to forty-sixth passes) a group at a time: its products for every row tile, its
// sums of all rows stored (rows x 256 bytes, out of L1 past ~32 rows), then every row's totals
// loaded, updated and stored again for every group. SmolLM2's layers (benchmarks/
// ab_int4_gemv.py --huge-pages, the AMX Xeon of issue 11's forty-seventh pass): level at 17-32
// rows, 1.15x at 48, 1.35x at 64, 1.67x at 96-256, 1.5x at 512: decode steps of more than 32
// sequences (max_num_seqs is 64). The same operations on each total in the same order: the
// same bits as int4_block_amx (tested). wbs: kInt4AmxSpan buffers of g / 2 * 4 vectors; cbs:
// kInt4AmxSpan * 1024 floats; ob: rows * 64. Tiles as int4_amx_configure(16) sets them, xp
// ceil(rows / 16) * 16 rows, those past `rows` zero.
template <typename T>
void int4_block_amx_tiles(int64_t rows, const uint32_t* xp, const float* xsum,
                          const uint8_t* packed, const c10::BFloat16* sz, T* y, int64_t n,
                          int64_t k, int64_t g, int64_t b, __m512bh* wbs, float* cbs, float* ob) {
  const int64_t groups = k / g, half = k / 2, wb_vectors = g / 2 * 4;
  const __m512i table = _mm512_load_si512(kInt4Bf16);
  std::fill(ob, ob + rows * 64, 0.f);
  __m512 sv[kInt4AmxSpan][4], ov[kInt4AmxSpan][4];
  for (int64_t g0 = 0; g0 < groups; g0 += kInt4AmxSpan) {
    const int64_t ng = std::min(kInt4AmxSpan, groups - g0);
    for (int64_t s = 0; s < ng; ++s) {
      if (g0 + s + kInt4AmxSpan < groups) prefetch_scales(sz, g0 + s + kInt4AmxSpan, n, b * 64, 64);
      int4_amx_decode<false>(packed, table, wbs + s * wb_vectors, k, g, b, g0 + s);
      for (int h = 0; h < 2; ++h)
        int4_dp_scales(sz, g0 + s, n, b * 64 + 32 * h, sv[s] + 2 * h, ov[s] + 2 * h);
    }
    for (int64_t t0 = 0; t0 < rows; t0 += 16) {
      for (int64_t s = 0; s < ng; ++s) {
        int4_amx_zero_sums();
        for (int64_t p = 0; p < g / 8; ++p)
          int4_amx_product(p, xp + t0 * half + (g0 + s) * g / 2, half, wbs + s * wb_vectors);
        int4_amx_store_sums(cbs + s * 1024);
      }
      int4_amx_scale_tile(cbs, xsum, sv, ov, ob, t0, std::min<int64_t>(16, rows - t0), groups, g0,
                          ng);
    }
  }
  int4_store_lane_order(ob, rows, y, n, b);
}
#endif
#endif

// Each group's sum of a row's values (xr, groups * g of them) in input order, into out: eight
// groups' chains at a time so that their additions overlap.
inline void int4_group_sums(const float* xr, int64_t groups, int64_t g, float* out) {
  int64_t j = 0;
  for (; j + 8 <= groups; j += 8) {
    float s[8] = {};
    for (int64_t i = 0; i < g; ++i)
      for (int t = 0; t < 8; ++t) s[t] += xr[(j + t) * g + i];
    for (int t = 0; t < 8; ++t) out[j + t] = s[t];
  }
  for (; j < groups; ++j) {
    float s = 0.f;
    for (int64_t i = 0; i < g; ++i) s += xr[j * g + i];
    out[j] = s;
  }
}

// The input rows of an int4 product in float32 (rounded to bf16 unless Exact) and their
// per-group sums, in order (xf [rows, K], xsum [rows, K / g]).
template <bool Exact, typename T>
void int4_inputs(const T* x, int64_t rows, int64_t k, int64_t g, std::vector<float>& xf,
                 std::vector<float>& xsum) {
  const int64_t groups = k / g;
  xf.resize(rows * k);
  xsum.resize(rows * groups);
  // On the threads by rows (a prefill's 512 rows took ~0.35 ms a matrix on one thread, a
  // quarter of a SmolLM2 matrix's product); each group's sum in order, eight groups' chains at
  // a time so that their additions overlap.
  at::parallel_for(0, rows, grain_rows(4 * k), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* xr = xf.data() + m * k;
      for (int64_t i = 0; i < k; ++i) {
        const float v = Elt<T>::load(x + m * k, i);
        xr[i] = Exact ? v : Elt<c10::BFloat16>::round(v);
      }
      int4_group_sums(xr, groups, g, xsum.data() + m * groups);
    }
  });
}

#if defined(__AVX512BF16__)
// int4_rows' inputs for int4_block_dp and the AMX kernels in one pass a row: x rounded to bf16
// as pairs (xp: on AMX the row's own bf16 pairs, input 2p low; else input 2p high) and each
// group's sum of the rounded values in order (xsum): int4_inputs<false>'s values and the
// packing that followed it, the same bits. Rows [rows, xp_rows) of xp zero (whole AMX tiles).
// Why: those two passes over the rows in float32 (a buffer of rows x K floats, another
// parallel region) and fresh buffers every call took ~19% of SmolLM2's int4 products at 64
// rows and ~25% at 16 (benchmarks/ab_int4_gemv.py, issue 11's forty-eighth pass).
template <typename T>
void int4_pack_inputs(const T* x, int64_t rows, int64_t xp_rows, int64_t k, int64_t g, bool amx,
                      std::vector<uint32_t>& xp, std::vector<float>& xsum) {
  const int64_t groups = k / g, half = k / 2;
  xp.resize(xp_rows * half);
  xsum.resize(rows * groups);
  std::fill(xp.begin() + rows * half, xp.end(), 0u);
  at::parallel_for(0, rows, grain_rows(4 * k), [&](int64_t m0, int64_t m1) {
    thread_local std::vector<float> row;  // a row's rounded values, for its sums
    row.resize(k);
    float* xr = row.data();
    for (int64_t m = m0; m < m1; ++m) {
      const T* xm = x + m * k;
      uint16_t* dst = reinterpret_cast<uint16_t*>(xp.data() + m * half);
      int64_t i = 0;
      for (; i + 16 <= k; i += 16) {
        const __m512i bits = bf16_bits(load16(xm + i));  // bf16 in each lane's low half
        _mm512_storeu_ps(xr + i, _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)));
        __m256i h = _mm512_cvtepi32_epi16(bits);  // 16 bf16 in input order
        if (!amx) h = _mm256_or_si256(_mm256_srli_epi32(h, 16), _mm256_slli_epi32(h, 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
      }
      for (int64_t t = i; t < k; ++t) xr[t] = Elt<c10::BFloat16>::round(Elt<T>::load(xm, t));
      for (int64_t p = i / 2; p < half; ++p) {
        uint32_t hi, lo;  // bf16-rounded: the low 16 bits are zero
        std::memcpy(&hi, &xr[2 * p], sizeof(hi));
        std::memcpy(&lo, &xr[2 * p + 1], sizeof(lo));
        xp[m * half + p] = amx ? (hi >> 16) | (lo & 0xFFFF0000u) : (hi & 0xFFFF0000u) | (lo >> 16);
      }
      int4_group_sums(xr, groups, g, xsum.data() + m * groups);
    }
  });
}
#endif

// int4 products of any number of rows: the rows in float32 (bf16-rounded unless Exact) with their
// per-group sums once, then per column block every group of up to 4 rows, so the block's codes
// are read from memory once and stay in L1 while the groups pass over them.
template <bool Exact, typename T>
void int4_rows(const T* x, const uint8_t* packed, const c10::BFloat16* sz, T* y, int64_t rows,
               int64_t n, int64_t k, int64_t g, int64_t B) {
  const int64_t groups = k / g;
#if defined(__AVX512BF16__)
  // bf16-rounded rows, 64-column blocks, even groups: int4_block_dp, two inputs at a time.
  if (!Exact && B == 64 && g % 2 == 0) {
    const int64_t half = k / 2;
    const bool amx = g % 32 == 0 && amx_tiles_here();
    // The calling thread's buffers, kept across calls (a call of 1-16 rows takes ~10-50 us);
    // named through references, which the tasks' lambdas capture (a thread_local named in a
    // lambda would be the running thread's own).
    thread_local std::vector<uint32_t> xp_buffer;
    thread_local std::vector<float> xsum_buffer;
    std::vector<uint32_t>& xp = xp_buffer;
    std::vector<float>& xsum = xsum_buffer;
    // On AMX past 16 rows whole 16-row tiles of inputs, the rows past `rows` zero.
    int4_pack_inputs(x, rows, amx && rows > 16 ? (rows + 15) / 16 * 16 : rows, k, g, amx, xp, xsum);
#if defined(CARPOOL_AMX)
    if (amx) {
      at::parallel_for(0, n / B, 1, [&](int64_t b0, int64_t b1) {
        // The thread's buffers, kept across calls (a call of 1-16 rows takes ~10-50 us, and
        // fresh zeroed ones cost it a few percent): codes, sums and totals, one after another.
        thread_local std::vector<__m512> scratch;
        const bool tiles = rows > 16;  // int4_block_amx_tiles
        const int64_t wb_vectors = (tiles ? kInt4AmxSpan : 3) * (g / 2 * 4);
        const int64_t cb_vectors = (tiles ? kInt4AmxSpan : 2) * 64;
        if (static_cast<int64_t>(scratch.size()) < wb_vectors + cb_vectors + rows * 4)
          scratch.resize(wb_vectors + cb_vectors + rows * 4);
        __m512* wb = scratch.data();
        int4_amx_configure(std::min<int64_t>(rows, 16));
        for (int64_t b = b0; b < b1; ++b)
          (tiles ? int4_block_amx_tiles<T> : int4_block_amx<T>)(
              rows, xp.data(), xsum.data(), packed, sz, y, n, k, g, b,
              reinterpret_cast<__m512bh*>(wb), reinterpret_cast<float*>(wb + wb_vectors),
              reinterpret_cast<float*>(wb + wb_vectors + cb_vectors));
      });
      return;
    }
#endif
    if (rows >= kInt4DpWidenedRows) {
      // Spans of at most kInt4RowSpan rows (their inputs stay in L2), as even as they split;
      // the threads take (span, block) pairs, so that a few blocks still split evenly: each
      // thread its own range of them first, then what is left of the others'
      // (shared_ranges.h).
      const int64_t spans = (rows + kInt4RowSpan - 1) / kInt4RowSpan, blocks = n / B;
      run_shared_items(spans * blocks, [&](RangeTaker& taker) {
        const int64_t most = (rows + spans - 1) / spans;
        // The thread's buffers, kept across calls (a span of a block's codes, up to 256 KB: a
        // fresh one a call would be a fresh mapping, its pages faulted in each time):
        // codes, scales and sums, one after another.
        thread_local std::vector<__m512> scratch;
        const int64_t span = int4_span_groups(k, g);
        const int64_t wb_vectors = span * g / 2 * 4, sc_vectors = span * 8;
        if (static_cast<int64_t>(scratch.size()) < wb_vectors + sc_vectors + most * 4)
          scratch.resize(wb_vectors + sc_vectors + most * 4);
        __m512bh* wb = reinterpret_cast<__m512bh*>(scratch.data());
        __m512* sc = scratch.data() + wb_vectors;
        float* ob = reinterpret_cast<float*>(sc + sc_vectors);
        for (int64_t t, end; taker.take(t, end);) {
          const int64_t p = t / blocks, b = t % blocks;
          const int64_t r0 = rows * p / spans, r = rows * (p + 1) / spans - r0;
          int4_block_dp_widened(r, xp.data() + r0 * half, xsum.data() + r0 * groups, packed, sz,
                                y + r0 * n, n, k, g, b, wb, sc, ob);
        }
      });
      return;
    }
    // One or two rows: two blocks at a time, so that 8 or 16 chains of dot products (each
    // column's sums are sequential) hide the instruction's latency, as 3-4 rows do in one.
    // The threads take units of that many blocks, each its own range first (shared_ranges.h).
    const int64_t blocks = n / B, per = rows <= 2 ? 2 : 1;  // blocks a unit
    run_shared_items((blocks + per - 1) / per, [&](RangeTaker& taker) {
      for (int64_t u, end; taker.take(u, end);) {
        const int64_t b = u * per;
        const bool two = per == 2 && b + 1 < blocks;
        for (int64_t m0 = 0; m0 < rows; m0 += 4) {
          const uint32_t* xg = xp.data() + m0 * half;
          const float* sg = xsum.data() + m0 * groups;
          T* yg = y + m0 * n;
          switch (std::min<int64_t>(4, rows - m0) + (two ? 4 : 0)) {
            case 1: int4_block_dp<1, 1>(xg, sg, packed, sz, yg, n, k, g, b); break;
            case 2: int4_block_dp<2, 1>(xg, sg, packed, sz, yg, n, k, g, b); break;
            case 3: int4_block_dp<3, 1>(xg, sg, packed, sz, yg, n, k, g, b); break;
            case 5: int4_block_dp<1, 2>(xg, sg, packed, sz, yg, n, k, g, b); break;
            case 6: int4_block_dp<2, 2>(xg, sg, packed, sz, yg, n, k, g, b); break;
            default: int4_block_dp<4, 1>(xg, sg, packed, sz, yg, n, k, g, b); break;
          }
        }
      }
    });
    return;
  }
#endif
  std::vector<float> xf, xsum;
  int4_inputs<Exact>(x, rows, k, g, xf, xsum);
#if defined(CARPOOL_AVX2)
  if (B == 32 && rows >= kInt4WidenedRows) {
    // Rows in spans of at most kInt4RowSpan, as even as they split, one after another.
    const int64_t spans = (rows + kInt4RowSpan - 1) / kInt4RowSpan;
    for (int64_t p = 0; p < spans; ++p) {
      const int64_t r0 = rows * p / spans, r = rows * (p + 1) / spans - r0;
      at::parallel_for(0, n / B, 1, [&](int64_t b0, int64_t b1) {
        // 32-byte aligned: a group's widened codes, then the rows' running sums.
        std::vector<float> buffers(g * 32 + r * 32 + 8);
        float* wb = reinterpret_cast<float*>(
            (reinterpret_cast<uintptr_t>(buffers.data()) + 31) & ~uintptr_t{31});
        for (int64_t b = b0; b < b1; ++b)
          int4_block_widened<Exact>(r, xf.data() + r0 * k, xsum.data() + r0 * groups, packed, sz,
                                    y + r0 * n, n, k, g, b, wb, wb + g * 32);
      });
    }
    return;
  }
#endif
  at::parallel_for(0, n / B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m0 = 0; m0 < rows; m0 += 4) {
        const float* xg = xf.data() + m0 * k;
        const float* sg = xsum.data() + m0 * groups;
        T* yg = y + m0 * n;
        switch (std::min<int64_t>(4, rows - m0)) {
          case 1: int4_block<1, Exact>(xg, sg, packed, sz, yg, n, k, g, B, b); break;
          case 2: int4_block<2, Exact>(xg, sg, packed, sz, yg, n, k, g, B, b); break;
          case 3: int4_block<3, Exact>(xg, sg, packed, sz, yg, n, k, g, B, b); break;
          default: int4_block<4, Exact>(xg, sg, packed, sz, yg, n, k, g, B, b); break;
        }
      }
  });
}

// The arguments every int4 product op takes, checked; returns N (the packed columns). logits:
// x must be float32 (int4_logits, int4_logits_at).
int64_t check_int4_args(const char* op, const at::Tensor& x, const at::Tensor& packed,
                        int64_t g, const at::Tensor& scales_zeros, int64_t block, bool logits) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat ||
                   (!logits && x.scalar_type() == at::kBFloat16)),
              op, ": x must be a contiguous [M, K] ", logits ? "float32" : "bfloat16 or float32",
              " tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m >= 1, op, ": at least one input row, got ", m);
  TORCH_CHECK(g > 0 && k % g == 0, op, ": K = ", k, " is not a multiple of the group ", g);
  TORCH_CHECK(block == 32 || block == 64, op, ": block must be 32 or 64, got ", block);
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte &&
                  packed.numel() % (block / 2 * k) == 0,
              op, ": packed must be torch's CPU int4 layout ([N/", block, ", K, ", block / 2,
              "] bytes) for K = ", k, ", got ", packed.sizes(), " ", packed.scalar_type());
  const int64_t n = packed.numel() / (block / 2 * k) * block;
  TORCH_CHECK(scales_zeros.dim() == 3 && scales_zeros.is_contiguous() &&
                  scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.size(0) == k / g &&
                  scales_zeros.size(1) == n && scales_zeros.size(2) == 2,
              op, ": scales_zeros must be [", k / g, ", ", n, ", 2] bfloat16, got ",
              scales_zeros.sizes(), " ", scales_zeros.scalar_type());
  return n;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                     const at::Tensor& scales_zeros, int64_t block) {
  const int64_t n = check_int4_args("int4_gemv", x, packed, group_size, scales_zeros, block, false);
  const int64_t m = x.size(0), k = x.size(1), g = group_size;
  at::Tensor y = at::empty({m, n}, x.options());  // x's dtype (float32: bf16 values widened)
  const uint8_t* qp = packed.data_ptr<uint8_t>();
  const c10::BFloat16* sp = scales_zeros.data_ptr<c10::BFloat16>();
  auto run = [&](auto* xp, auto* yp) { int4_rows<false>(xp, qp, sp, yp, m, n, k, g, block); };
  if (x.scalar_type() == at::kFloat)
    run(x.data_ptr<float>(), y.data_ptr<float>());
  else
    run(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>());
  return y;
}

// An int4 vocabulary head's float32 logits [M, N]: int4_gemv's kernel with a float32 x as it is
// and the float32 sums not rounded, so every logit is what the dequantized weight gives in
// float32 but for the order of the sums (as int8_logits). Why: bf16 logits (0.125 apart at 25)
// tie or swap a float32 model's top tokens, and rescoring the top 64 of them from Python (top-k,
// rows, bmm, scatter) made a 49152 x 576 int4 head 1.41x slower at batch 1 (1.2-1.5x at 1-32
// rows of 32000- to 151936-token heads; BENCHMARKS.md, issue 11, nineteenth pass).
at::Tensor int4_logits(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                       const at::Tensor& scales_zeros, int64_t block) {
  const int64_t n = check_int4_args("int4_logits", x, packed, group_size, scales_zeros, block, true);
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor y = at::empty({m, n}, x.options());
  int4_rows<true>(x.data_ptr<float>(), packed.data_ptr<uint8_t>(),
                  scales_zeros.data_ptr<c10::BFloat16>(), y.data_ptr<float>(), m, n, k,
                  group_size, block);
  return y;
}

// int4_logits at the given columns only: y[r, j] = int4_logits(x)[r, ids[r, j]], the same bits
// (int4_column). Where the head's logits come from another kernel in bf16 (more rows than
// int4_logits takes), their top ones are recomputed by it, so a row's top logits do not depend
// on the path its batch took.
at::Tensor int4_logits_at(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                          const at::Tensor& scales_zeros, int64_t block, const at::Tensor& ids) {
  const int64_t n =
      check_int4_args("int4_logits_at", x, packed, group_size, scales_zeros, block, true);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && ids.is_contiguous() &&
                  ids.scalar_type() == at::kLong,
              "int4_logits_at: ids must be a contiguous [", x.size(0), ", J] int64 tensor, got ",
              ids.sizes(), " ", ids.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), g = group_size, j_count = ids.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < m * j_count; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n, "int4_logits_at: column ", ip[i], " out of [0, ", n, ")");
  std::vector<float> xf, xsum;
  int4_inputs<true>(x.data_ptr<float>(), m, k, g, xf, xsum);
  at::Tensor y = at::empty({m, j_count}, x.options());
  const uint8_t* qp = packed.data_ptr<uint8_t>();
  const c10::BFloat16* sp = scales_zeros.data_ptr<c10::BFloat16>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, m * j_count, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / j_count;
      yp[i] = int4_column(xf.data() + r * k, xsum.data() + r * (k / g), qp, sp, n, k, g, block,
                          ip[i]);
    }
  });
  return y;
}

// int4_weight_bits, its vector helpers and int4_widen_vnni's loop per block: int4_vnni.h.

// int4 codes widened to the bf16 weight [N, K] they stand for, w = (q - 8) * scale + zero per
// group, with the two bf16 roundings of quant.Int4Linear._dense's bf16 ops (the product rounded,
// then the sum): the same bits in one pass. A prefill step widens every int4 weight of every
// layer for its matmuls, and torch's chain of whole-tensor ops (two nibble masks, a cat, a
// transpose copy, the cast, three in-place passes) took as long as a third of those matmuls
// (SmolLM2-135M Q4_1 at 512 rows: 136 ms against 318 a step; here 35), with three weight-sized
// temporaries at once. Per block of B output rows and group of g inputs, each row's g values are
// computed and stored in one contiguous run: with AVX-512 from gathers of the packed bytes, else
// from a B x g code tile (L1) the bytes are first transposed into (65 ms). Finite scales and
// zeros assumed (a GGUF's are).
void int4_widen_block(const uint8_t* packed, const c10::BFloat16* sz, c10::BFloat16* w,
                      int64_t n, int64_t k, int64_t g, int64_t B, int64_t b, uint8_t* codes) {
  const int64_t half = B / 2;
  const uint8_t* qb = packed + b * k * half;  // [K, B/2] bytes of this block
  uint16_t* out = reinterpret_cast<uint16_t*>(w);
#if defined(__AVX512F__)
  if (g % 16 == 0) {
    // Without the code tile: one gather takes 4 bytes (rows j..j+3 and j+B/2..j+B/2+3) of 16
    // consecutive inputs, and each of its 8 nibbles per lane is one row's 16 values.
    const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7,
                                                               6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(static_cast<int>(half)));
    const __m512i nibble = _mm512_set1_epi32(0xF), bias = _mm512_set1_epi32(0x7FFF);
    const __m512i one = _mm512_set1_epi32(1), high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m512 eight = _mm512_set1_ps(8.0f);
    auto narrow = [&](__m512 v) {  // E::narrow in 16 lanes, left in the lanes' low halves
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
      return _mm512_add_epi32(bits, _mm512_add_epi32(bias, odd));
    };
    for (int64_t gi = 0; gi < k / g; ++gi)
      for (int64_t j = 0; j < half; j += 4)
        for (int64_t i0 = 0; i0 < g; i0 += 16) {
          const __m512i v = _mm512_i32gather_epi32(stride, qb + (gi * g + i0) * half + j, 1);
          for (int t = 0; t < 8; ++t) {  // nibble t: byte j + t / 2, low (even t) or high half
            const int64_t row = b * B + j + t / 2 + (t % 2) * half;
            const __m512 sc = _mm512_set1_ps(carpool_kernels::to_float(sz[(gi * n + row) * 2]));
            const __m512 ze = _mm512_set1_ps(carpool_kernels::to_float(sz[(gi * n + row) * 2 + 1]));
            const __m512i q = _mm512_and_si512(_mm512_srli_epi32(v, 4 * t), nibble);
            const __m512 prod = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), eight), sc);
            const __m512 r1 = _mm512_castsi512_ps(_mm512_and_si512(narrow(prod), high));
            const __m512i r2 = _mm512_srli_epi32(narrow(_mm512_add_ps(r1, ze)), 16);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + row * k + gi * g + i0),
                                _mm512_cvtepi32_epi16(r2));
          }
        }
    return;
  }
#endif
  for (int64_t gi = 0; gi < k / g; ++gi) {
    for (int64_t i = 0; i < g; ++i) {
      const uint8_t* bytes = qb + (gi * g + i) * half;
      for (int64_t j = 0; j < half; ++j) {
        codes[j * g + i] = bytes[j] & 0xF;
        codes[(j + half) * g + i] = bytes[j] >> 4;
      }
    }
    for (int64_t c = 0; c < B; ++c) {
      const int64_t row = b * B + c;
      const float scale = carpool_kernels::to_float(sz[(gi * n + row) * 2]);
      const float zero = carpool_kernels::to_float(sz[(gi * n + row) * 2 + 1]);
      const uint8_t* q = codes + c * g;
      uint16_t* dst = out + row * k + gi * g;
      for (int64_t i = 0; i < g; ++i)
        dst[i] = carpool_kernels::int4_weight_bits(q[i], scale, zero);
    }
  }
}

// The inputs both int4 widenings take: torch's CPU int4 layout in `block`-row blocks and its
// bf16 [K / group, N, 2] (scale, zero) pairs. `name` heads the messages.
void check_int4_widen_inputs(const char* name, const at::Tensor& packed, int64_t g,
                             const at::Tensor& scales_zeros, int64_t block) {
  TORCH_CHECK(g > 0, name, ": the group size must be positive, got ", g);
  TORCH_CHECK(block == 32 || block == 64, name, ": block must be 32 or 64, got ", block);
  TORCH_CHECK(scales_zeros.dim() == 3 && scales_zeros.is_contiguous() &&
                  scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.size(2) == 2 &&
                  scales_zeros.size(1) % block == 0,
              name, ": scales_zeros must be a contiguous [K / group, N, 2] bfloat16 tensor ",
              "with N a multiple of ", block, ", got ", scales_zeros.sizes(), " ",
              scales_zeros.scalar_type());
  const int64_t k = scales_zeros.size(0) * g, n = scales_zeros.size(1);
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte &&
                  packed.numel() == n * k / 2,
              name, ": packed must be torch's CPU int4 layout ([N/", block, ", K, ", block / 2,
              "] bytes) for N = ", n, ", K = ", k, ", got ", packed.sizes(), " ",
              packed.scalar_type());
}

at::Tensor int4_widen(const at::Tensor& packed, int64_t group_size, const at::Tensor& scales_zeros,
                      int64_t block) {
  const int64_t g = group_size;
  check_int4_widen_inputs("int4_widen", packed, g, scales_zeros, block);
  const int64_t k = scales_zeros.size(0) * g, n = scales_zeros.size(1);
  at::Tensor w = at::empty({n, k}, scales_zeros.options());
  const uint8_t* qp = packed.data_ptr<uint8_t>();
  const c10::BFloat16* sp = scales_zeros.data_ptr<c10::BFloat16>();
  c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
  at::parallel_for(0, n / block, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> codes(block * g);  // this thread's code tile
    for (int64_t b = b0; b < b1; ++b)
      int4_widen_block(qp, sp, wp, n, k, g, block, b, codes.data());
  });
  return w;
}

// int4 codes widened straight into vnni_linear's layout ([ceil(N / 64), K / 2, 64, 2] bf16,
// zero past N), a block per task (int4_vnni.h has the loop and what it measured).
at::Tensor int4_widen_vnni(const at::Tensor& packed, int64_t group_size,
                           const at::Tensor& scales_zeros, int64_t block, int64_t n) {
  const int64_t g = group_size;
  TORCH_CHECK(g > 0 && g % 2 == 0, "int4_widen_vnni: the group size must be positive and even, got ", g);
  check_int4_widen_inputs("int4_widen_vnni", packed, g, scales_zeros, block);
  const int64_t k = scales_zeros.size(0) * g, rows = scales_zeros.size(1);
  TORCH_CHECK(n > 0 && n <= rows, "int4_widen_vnni: n = ", n, " columns of ", rows);
  const int64_t pairs = k / 2, blocks = (n + 63) / 64;
  at::Tensor out = at::empty({blocks, pairs, 64, 2}, scales_zeros.options());
  const uint8_t* qp = packed.data_ptr<uint8_t>();
  const auto* sz = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr());
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr());
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t vb = b0; vb < b1; ++vb)
      carpool_kernels::int4_widen_vnni_block(qp, sz, k, g, block, rows, n, vb,
                                             dst + vb * pairs * 64);
  });
  return out;
}

// bf16 weights times float32 or bf16 activations, any number of rows, on CPUs without bf16
// matrix units (AVX2 machines such as AMD Zen 3): there torch's bf16 GEMM has no oneDNN path
// and ran 3-5x slower than its float32 one at 8-32 rows (BENCHMARKS.md "Fifth pass"), and
// widening the weights to float32 would double their bytes. Each weight row is widened in
// registers (a shift) and multiplied into up to 4 input rows at once, so a weight load serves
// 4 FMAs; the output columns are split over the threads in blocks of 16 weight rows (16 x K
// bf16 stays in L1/L2 while every group of input rows passes over it). Float32 sums of exact
// products, rounded once to the output dtype (x's): a bf16 GEMM's values in another order.
// Every input row is summed the same way whatever the row count (batch-invariant).
template <int64_t M, typename T>
void bf16_rows(const float* xf, const c10::BFloat16* w, const float* bias, T* y, int64_t n,
               int64_t k, int64_t r0, int64_t r1) {
  using E = Elt<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* wr = w + r * k;
    float acc[M];
    int64_t i = 0;
#if defined(CARPOOL_AVX2)
    __m256 va[M], vb[M];  // two FMA chains per row (one is latency-bound at 1-2 rows)
    for (int64_t m = 0; m < M; ++m) va[m] = vb[m] = _mm256_setzero_ps();
    for (; i + 16 <= k; i += 16) {
      const __m256 w0 = load8(wr + i), w1 = load8(wr + i + 8);
      for (int64_t m = 0; m < M; ++m) {
        va[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + m * k + i), va[m]);
        vb[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xf + m * k + i + 8), vb[m]);
      }
    }
    for (; i + 8 <= k; i += 8) {
      const __m256 wv = load8(wr + i);
      for (int64_t m = 0; m < M; ++m) va[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xf + m * k + i), va[m]);
    }
    for (int64_t m = 0; m < M; ++m) acc[m] = hsum8(_mm256_add_ps(va[m], vb[m]));
#elif defined(__AVX512F__)
    __m512 va[M];
    for (int64_t m = 0; m < M; ++m) va[m] = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) {
      const __m512 wv = load16(wr + i);
      for (int64_t m = 0; m < M; ++m) va[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf + m * k + i), va[m]);
    }
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_reduce_add_ps(va[m]);
#else
    for (int64_t m = 0; m < M; ++m) acc[m] = 0.f;
#endif
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = i; j < k; ++j) acc[m] += carpool_kernels::to_float(wr[j]) * xf[m * k + j];
    const float b = bias != nullptr ? bias[r] : 0.f;
    for (int64_t m = 0; m < M; ++m) E::store(y + m * n, r, E::round(acc[m] + b));
  }
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "bf16_linear: x must be a contiguous [M, K] bfloat16 or float32 tensor, got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() &&
                  weight.scalar_type() == at::kBFloat16 && weight.size(1) == x.size(1),
              "bf16_linear: weight must be a contiguous [N, ", x.size(1), "] bfloat16 tensor, got ",
              weight.sizes(), " ", weight.scalar_type());
  const int64_t m = x.size(0), n = weight.size(0), k = x.size(1);
  at::Tensor b32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bf16_linear: bias must be [", n,
                "], got ", bias->sizes());
    b32 = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  // The input rows in float32 once (bf16 values widen exactly), shared by the threads.
  at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  const c10::BFloat16* wp = weight.data_ptr<c10::BFloat16>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  constexpr int64_t kRowsPerBlock = 16;
  // Small products run on the calling thread: an OpenMP region costs more than ~64k MACs.
  const int64_t grain = std::max<int64_t>(kRowsPerBlock, 65536 / std::max<int64_t>(1, m * k));
  auto run = [&](auto* yp) {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r0 = begin; r0 < end; r0 += kRowsPerBlock) {
        const int64_t r1 = std::min(end, r0 + kRowsPerBlock);
        for (int64_t m0 = 0; m0 < m; m0 += 4) {
          const float* xg = xp + m0 * k;
          auto* yg = yp + m0 * n;
          switch (std::min<int64_t>(4, m - m0)) {
            case 1: bf16_rows<1>(xg, wp, bp, yg, n, k, r0, r1); break;
            case 2: bf16_rows<2>(xg, wp, bp, yg, n, k, r0, r1); break;
            case 3: bf16_rows<3>(xg, wp, bp, yg, n, k, r0, r1); break;
            default: bf16_rows<4>(xg, wp, bp, yg, n, k, r0, r1); break;
          }
        }
      }
    });
  };
  if (x.scalar_type() == at::kFloat)
    run(y.data_ptr<float>());
  else
    run(y.data_ptr<c10::BFloat16>());
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(carpool, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor cs) -> ()");
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int8_logits(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int8_logits_at(Tensor x, Tensor qweight, Tensor scales, Tensor ids) -> Tensor");
  m.def("int8_dot(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int8_dot_fast() -> bool");
  m.def("int4_gemv_amx() -> bool");
  m.def("int8_logits_fixed() -> bool");
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("int4_widen(Tensor packed, int group_size, Tensor scales_zeros, int block) -> Tensor");
  m.def(
      "int4_widen_vnni(Tensor packed, int group_size, Tensor scales_zeros, int block, int n) -> "
      "Tensor");
  m.def(
      "int4_gemv(Tensor x, Tensor packed, int group_size, Tensor scales_zeros, int block) -> "
      "Tensor");
  m.def(
      "int4_logits(Tensor x, Tensor packed, int group_size, Tensor scales_zeros, int block) -> "
      "Tensor");
  m.def(
      "int4_logits_at(Tensor x, Tensor packed, int group_size, Tensor scales_zeros, int block, "
      "Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(carpool, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("rotary_", &rotary_);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int8_logits", &int8_logits);
  m.impl("int8_logits_at", &int8_logits_at);
  m.impl("int8_dot", &int8_dot);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("int4_widen", &int4_widen);
  m.impl("int4_widen_vnni", &int4_widen_vnni);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_logits", &int4_logits);
  m.impl("int4_logits_at", &int4_logits_at);
}

TORCH_LIBRARY_IMPL(carpool, CompositeExplicitAutograd, m) {
  m.impl("int8_dot_fast", &int8_dot_fast);
  m.impl("int4_gemv_amx", &amx_tiles_here);
  m.impl("int8_logits_fixed", &amx_tiles_here);
}
