// Decode attention that reads the paged KV cache in place (CPU).
//
// One query token per sequence. For every sequence (and run of kv heads) the kernel walks the
// sequence's block table, and per block: dot products of the group's queries with the block's keys, an
// online (streaming) softmax update, and the weighted sum of the block's values, all in
// float32. K and V are read straight from the cache, once per kv head for all the query heads
// that share it (grouped-query attention); nothing is copied.
//
// The cache holds float32 or bfloat16 rows, or int8 rows (``kv_cache_dtype="int8"``): each
// (token, K/V, kv head) row is head_dim int8 values followed by its float32 scale (4 bytes), so a
// row is head_dim + 4 bytes. The scale multiplies the dot product (K) or the softmax weight (V):
// dequantization costs one multiply per row, not per element.
//
// Registered as the torch operators carpool::paged_decode_attention and carpool::kv_store_int8
// (CPU only), so they show in torch.profiler under those names and need no pybind11 (a much
// shorter build).
//
// The inner loops over head_dim use AVX-512 intrinsics where the build machine has them
// (-march=native) and plain loops otherwise; the loop over a block's tokens for exp is a plain
// loop gcc vectorizes (exp is a polynomial, not libm).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

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

// Elements of one (token, K/V, kv head) row in the cache, and its dequantization scale: an
// int8 row carries its float32 scale in 4 bytes after the head_dim values.
template <typename C>
constexpr int64_t row_extra() { return std::is_same<C, int8_t>::value ? 4 : 0; }

template <typename C>
inline float row_scale(const C* row, int64_t d) {
  if constexpr (std::is_same<C, int8_t>::value) {
    float s;
    std::memcpy(&s, row + d, sizeof(s));
    return s;
  } else {
    (void)row;
    (void)d;
    return 1.0f;
  }
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

// exp(x) for x <= 0 (scores minus their running max), relative error ~2e-7: 2^t split into
// 2^floor(t) (exponent bits) times a degree-6 polynomial of 2^frac(t). Branch-free so the loop
// over a block's tokens vectorizes.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below this exp(x) is under float's normal range: ~0
  const float t = x * 1.44269504088896341f;  // log2(e)
  const float fi = std::floor(t);
  const float f = t - fi;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t e = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

#if defined(__AVX512F__)
// exp_nonpositive on 16 lanes: the same steps (floor, the same polynomial, the exponent bits).
// gcc left the `omp simd` loop over a block's scores scalar (the float -> int bit cast).
inline __m512 exp16_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, fi);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(fi), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

// sh[t] = exp(sh[t] - mx) for t < n; returns their sum.
inline float exp_block(float* sh, int64_t n, float mx) {
  float sum = 0.0f;
  int64_t t = 0;
#if defined(__AVX512F__)
  const __m512 m = _mm512_set1_ps(mx);
  for (; t < n; t += 16) {
    const __mmask16 k = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
    const __m512 p = exp16_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sh + t), m));
    _mm512_mask_storeu_ps(sh + t, k, p);
    sum += _mm512_mask_reduce_add_ps(k, p);
  }
#endif
  for (; t < n; ++t) {
    const float p = exp_nonpositive(sh[t] - mx);
    sh[t] = p;
    sum += p;
  }
  return sum;
}

// How many blocks ahead the kernel asks for a block's rows (see prefetch_next).
constexpr int64_t kPrefetchBlocks = 2;

template <typename T, typename C>
void decode_kernel(
    const T* q,             // [B, H, D] rows of stride q_stride (elements) per sequence
    int64_t q_stride,
    const C* kv,            // [num_blocks, block_size, 2, K, D (+ 4 for int8)], contiguous
    const int64_t* tables,  // [B, max_blocks]
    int64_t max_blocks,
    const int64_t* ctx,     // [B]
    T* out,                 // [B, H, D], contiguous
    int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
    float scale) {
  const int64_t group = heads / kv_heads;  // query heads per kv head
  const int64_t d = head_dim;
  const int64_t row = d + row_extra<C>();  // cache elements of one kv head's K (or V)
  const int64_t token_stride = 2 * kv_heads * row;  // one cache slot: K and V of all kv heads
  const int64_t block_stride = block_size * token_stride;
  // A work item is one sequence and a run of its kv heads. Why a run, not one kv head: a
  // token's K (and V) of all kv heads is one contiguous row, and reading whole rows streams
  // through memory, while one head's slice of every row is a 2-cache-line read every few KiB
  // (measured ~10x slower: latency-bound). Sequences are split into runs only as far as
  // needed to give each thread about 2 items (batch 1 on 2 threads: 4 runs of K/4 heads).
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min(kv_heads, std::max<int64_t>(1, (2 * threads + batch - 1) / batch));
  const int64_t run_heads = (kv_heads + splits - 1) / splits;  // kv heads per work item
  const int64_t runs = (kv_heads + run_heads - 1) / run_heads;
  at::parallel_for(0, batch * runs, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch for one run: queries, accumulators, running max/sum, block scores.
    const int64_t rh = run_heads * group;  // query heads of a run
    std::vector<float> qf(rh * d), acc(rh * d), m(rh), l(rh), s(rh * block_size);
    std::vector<float> ks(row_extra<C>() ? run_heads * block_size : 0);  // int8: K row scales
    std::vector<float> vs(row_extra<C>() ? run_heads * block_size : 0);  // int8: V row scales
    std::vector<float> pw(row_extra<C>() ? block_size : 0);  // int8: weight x V scale
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / runs;
      const int64_t kh0 = (item % runs) * run_heads;
      const int64_t nkh = std::min(run_heads, kv_heads - kh0);
      const int64_t nh = nkh * group;
      const int64_t h0 = kh0 * group;
      const int64_t n_ctx = ctx[b];
      for (int64_t h = 0; h < nh; ++h) {
        const T* qp = q + b * q_stride + (h0 + h) * d;
        for (int64_t i = 0; i < d; ++i) qf[h * d + i] = to_float(qp[i]) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t n_blocks = (n_ctx + block_size - 1) / block_size;
      for (int64_t n = 0; n < n_blocks; ++n) {
        const C* base = kv + tables[b * max_blocks + n] * block_stride + kh0 * row;
        const int64_t n_tok = std::min(block_size, n_ctx - n * block_size);
        // The next block is elsewhere in memory (the table is random): ask for its rows
        // while this block computes, a token's K and V run per token of this one.
        const char* next = n + kPrefetchBlocks < n_blocks
            ? reinterpret_cast<const char*>(
                  kv + tables[b * max_blocks + n + kPrefetchBlocks] * block_stride + kh0 * row)
            : nullptr;
        const int64_t run_bytes = nkh * row * static_cast<int64_t>(sizeof(C));
        const int64_t kv_bytes = kv_heads * row * static_cast<int64_t>(sizeof(C));
        // The next block's rows of token t (K and V of the run): asked for while this block
        // computes, spread over the work so a few requests are in flight at a time.
        auto prefetch_next = [&](int64_t t) {
          if (next == nullptr || t >= block_size) return;
          const char* nrow = next + t * token_stride * static_cast<int64_t>(sizeof(C));
          for (int64_t off = 0; off < run_bytes; off += 64) {
            __builtin_prefetch(nrow + off);
            __builtin_prefetch(nrow + kv_bytes + off);
          }
        };
        // Scores of the block: q . k for every token and query head of the run; 16 tokens at
        // a time where the vector path allows.
        int64_t t0 = 0;
#if defined(__AVX512F__)
        if (d % 16 == 0 && d <= 128) {
          for (; t0 + 16 <= n_tok; t0 += 16) {
            for (int64_t h = 0; h < nh; ++h) {
              for (int64_t t = t0 + h * 16 / nh; t < t0 + (h + 1) * 16 / nh; ++t) prefetch_next(t);
              dot16(qf.data() + h * d, base + t0 * token_stride + (h / group) * row, token_stride,
                    d, s.data() + h * block_size + t0);
            }
          }
        }
#endif
        for (int64_t t = t0; t < n_tok; ++t) {
          prefetch_next(t);
          const C* krow = base + t * token_stride;
          for (int64_t h = 0; h < nh; ++h) {
            s[h * block_size + t] = dot(qf.data() + h * d, krow + (h / group) * row, d);
          }
        }
        if constexpr (std::is_same<C, int8_t>::value) {
          // Each row's scale: K's multiplies its score, V's joins the softmax weight below.
          for (int64_t t = 0; t < n_tok; ++t) {
            const C* krow = base + t * token_stride;
            for (int64_t k = 0; k < nkh; ++k) {
              ks[k * block_size + t] = row_scale(krow + k * row, d);
              vs[k * block_size + t] = row_scale(krow + (kv_heads + k) * row, d);
            }
          }
          for (int64_t h = 0; h < nh; ++h) {
            const float* kh = ks.data() + (h / group) * block_size;
            float* sh = s.data() + h * block_size;
            for (int64_t t = 0; t < n_tok; ++t) sh[t] *= kh[t];
          }
        }
        // Online softmax: rescale what was accumulated when the running max grows.
        for (int64_t h = 0; h < nh; ++h) {
          float* sh = s.data() + h * block_size;
          float mx = m[h];
          for (int64_t t = 0; t < n_tok; ++t) mx = std::max(mx, sh[t]);
          if (mx > m[h]) {
            const float corr = exp_nonpositive(m[h] - mx);  // ~0 on the first block
            l[h] *= corr;
            float* ah = acc.data() + h * d;
            for (int64_t i = 0; i < d; ++i) ah[i] *= corr;
            m[h] = mx;
          }
          l[h] += exp_block(sh, n_tok, mx);
        }
        // Weighted sum of the block's values (the block is in cache by now).
        for (int64_t h = 0; h < nh; ++h) {
          const float* ph = s.data() + h * block_size;
          if constexpr (std::is_same<C, int8_t>::value) {
            // sum_t p_t (scale_t v_t) = sum_t (p_t scale_t) v_t: the V scale joins the weight.
            const float* sv = vs.data() + (h / group) * block_size;
            for (int64_t t = 0; t < n_tok; ++t) pw[t] = ph[t] * sv[t];
            ph = pw.data();
          }
          head_values(acc.data() + h * d, base + kv_heads * row + (h / group) * row,
                      token_stride, n_tok, ph, d);
        }
      }
      for (int64_t h = 0; h < nh; ++h) {
        T* op = out + (b * heads + h0 + h) * d;
        const float inv = 1.0f / l[h];
        for (int64_t i = 0; i < d; ++i) store(op + i, acc[h * d + i] * inv);
      }
    }
  });
}

template <typename T>
void decode_dispatch_cache(const at::Tensor& q, const at::Tensor& kv_cache,
                           const at::Tensor& tables, const at::Tensor& lens, at::Tensor& out,
                           int64_t heads, int64_t kv_heads, int64_t d, float sc) {
  const int64_t batch = q.size(0), max_blocks = tables.size(1), block_size = kv_cache.size(1);
  if (kv_cache.scalar_type() == at::kChar) {
    decode_kernel<T, int8_t>(q.data_ptr<T>(), q.stride(0), kv_cache.data_ptr<int8_t>(),
                             tables.data_ptr<int64_t>(), max_blocks, lens.data_ptr<int64_t>(),
                             out.data_ptr<T>(), batch, heads, kv_heads, d, block_size, sc);
  } else {
    decode_kernel<T, T>(q.data_ptr<T>(), q.stride(0), kv_cache.data_ptr<T>(),
                        tables.data_ptr<int64_t>(), max_blocks, lens.data_ptr<int64_t>(),
                        out.data_ptr<T>(), batch, heads, kv_heads, d, block_size, sc);
  }
}

at::Tensor paged_decode_attention(
    const at::Tensor& query,         // [B, H, D]
    const at::Tensor& kv_cache,      // [num_blocks, block_size, 2, K, D (+ 4 when int8)]
    const at::Tensor& block_tables,  // [B, max_blocks] int64
    const at::Tensor& context_lens,  // [B] int64, each >= 1
    double scale) {
  TORCH_CHECK(query.dim() == 3, "query must be [B, H, D]");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(2) == 2, "kv_cache must be [N, S, 2, K, D]");
  const bool int8 = kv_cache.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || query.scalar_type() == kv_cache.scalar_type(),
              "query and cache dtypes differ");
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  const int64_t batch = query.size(0), heads = query.size(1), d = query.size(2);
  const int64_t kv_heads = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == d + (int8 ? 4 : 0),
              "head_dim of query and cache differ (an int8 cache row is head_dim + 4 bytes)");
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.size(0) == batch && context_lens.size(0) == batch, "batch mismatch");
  // The query is usually a strided view into the fused qkv output: any row stride is fine as
  // long as each row's heads are contiguous.
  at::Tensor q = (query.stride(2) == 1 && query.stride(1) == d) ? query : query.contiguous();
  at::Tensor tables = block_tables.contiguous();
  at::Tensor lens = context_lens.contiguous();
  at::Tensor out = at::empty({batch, heads, d}, query.options());
  const int64_t max_blocks = tables.size(1);
  // Bounds, checked once per call (B x blocks reads, no K/V): a bad length or block id would
  // otherwise read outside the cache.
  const int64_t num_blocks = kv_cache.size(0), block_size = kv_cache.size(1);
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= max_blocks * block_size, "context length ", lp[b],
                " of sequence ", b, " outside [1, ", max_blocks * block_size, "]");
    for (int64_t n = 0; n < (lp[b] + block_size - 1) / block_size; ++n) {
      const int64_t id = tp[b * max_blocks + n];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block id ", id, " outside the cache");
    }
  }
  const float sc = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat) {
    decode_dispatch_cache<float>(q, kv_cache, tables, lens, out, heads, kv_heads, d, sc);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_dispatch_cache<c10::BFloat16>(q, kv_cache, tables, lens, out, heads, kv_heads, d, sc);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only, got ",
                q.scalar_type());
  }
  return out;
}

// Quantize rows of `src` ([T, 2, K, D], float32 or bfloat16, rows of any stride) into the
// int8 cache slots `slots` ([T] int64) of `cache` ([N, S, 2, K, D + 4] int8): per (token, K/V,
// head) row, scale = amax / 127, q = round(x * (127 / amax)) (half to even, as torch.round),
// and the scale's 4 bytes after the values; an all-zero row gets scale 0 and zeros. The same
// arithmetic as `carpool.model.kv_quant.quantize` (torch ops), so both write identical bytes.
template <typename T>
void store_rows(const T* src, int64_t src_stride, int8_t* cache, const int64_t* slots,
                int64_t tokens, int64_t rows, int64_t d) {
  const int64_t row = d + 4;
  // Grain 64 tokens: a decode step's few tokens are not worth waking the other threads.
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t r = 0; r < rows; ++r) {
        const T* x = src + t * src_stride + r * d;
        int8_t* dst = cache + (slots[t] * rows + r) * row;
        float amax = 0.0f;
        int64_t i = 0;
#if defined(__AVX512F__)
        __m512 mx = _mm512_setzero_ps();
        for (; i + 16 <= d; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(load16(x + i)));
        amax = _mm512_reduce_max_ps(mx);
#endif
        for (; i < d; ++i) amax = std::max(amax, std::fabs(to_float(x[i])));
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        const float s = amax / 127.0f;
        i = 0;
#if defined(__AVX512F__)
        // x * inv is within [-127, 127] up to rounding: round to nearest even (the default
        // mode, as std::nearbyint and torch.round), clamp, narrow to int8.
        const __m512 iv = _mm512_set1_ps(inv);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        for (; i + 16 <= d; i += 16) {
          __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + i), iv));
          v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtepi32_epi8(v));
        }
#endif
        for (; i < d; ++i) {
          const float v = std::nearbyint(to_float(x[i]) * inv);
          dst[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
        }
        std::memcpy(dst + d, &s, sizeof(s));
      }
    }
  });
}

void kv_store_int8(const at::Tensor& src,    // [T, 2, K, D]
                   at::Tensor cache,         // [N, S, 2, K, D + 4] int8
                   const at::Tensor& slots)  // [T] int64: block * S + offset
{
  TORCH_CHECK(src.dim() == 4 && src.size(1) == 2, "src must be [T, 2, K, D]");
  TORCH_CHECK(cache.dim() == 5 && cache.scalar_type() == at::kChar && cache.is_contiguous(),
              "cache must be a contiguous int8 [N, S, 2, K, D + 4]");
  const int64_t tokens = src.size(0), kvh = src.size(2), d = src.size(3);
  TORCH_CHECK(cache.size(2) == 2 && cache.size(3) == kvh && cache.size(4) == d + 4,
              "cache rows must be [2, K, D + 4] for src rows [2, K, D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == tokens,
              "slots must be [T] int64");
  // A token's [2, K, D] must be contiguous (a row of the fused qkv output is); rows may be
  // strided.
  const bool packed = src.stride(3) == 1 && src.stride(2) == d && src.stride(1) == kvh * d;
  at::Tensor x = packed ? src : src.contiguous();
  at::Tensor sl = slots.contiguous();
  const int64_t capacity = cache.size(0) * cache.size(1);
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "slot ", sp[t], " outside the cache");
  }
  if (x.scalar_type() == at::kFloat) {
    store_rows<float>(x.data_ptr<float>(), x.stride(0), cache.data_ptr<int8_t>(), sp, tokens,
                      2 * kvh, d);
  } else if (x.scalar_type() == at::kBFloat16) {
    store_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), x.stride(0),
                              cache.data_ptr<int8_t>(), sp, tokens, 2 * kvh, d);
  } else {
    TORCH_CHECK(false, "kv_store_int8: float32 or bfloat16 only, got ", x.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(carpool, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor kv_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
  m.def("kv_store_int8(Tensor src, Tensor(a!) cache, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(carpool, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("kv_store_int8", &kv_store_int8);
}
