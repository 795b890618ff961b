// Decode attention that reads the paged KV cache in place (CPU).
//
// One query token per sequence. For every (sequence, kv head) the kernel walks the sequence's
// block table, and per block: dot products of the group's queries with the block's keys, an
// online (streaming) softmax update, and the weighted sum of the block's values, all in
// float32. K and V are read straight from the cache, once per kv head for all the query heads
// that share it (grouped-query attention); nothing is copied.
//
// Registered as the torch operator carpool::paged_decode_attention (CPU only), so it shows in
// torch.profiler under that name and needs no pybind11 (a much shorter build).
//
// The inner loops are plain loops over head_dim and the block's tokens, written so that gcc
// vectorizes them at -O3 (the reductions carry `omp simd reduction` for -fopenmp-simd; exp is
// a polynomial, not libm, so it vectorizes too).

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
#include <vector>

namespace {

inline float to_float(float x) { return x; }

inline float to_float(c10::BFloat16 x) {
  // bfloat16 is the top half of a float32: widening is a shift.
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void store(float* dst, float x) { *dst = x; }

inline void store(c10::BFloat16* dst, float x) { *dst = c10::BFloat16(x); }

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

template <typename T>
void decode_kernel(
    const T* q,           // [B, H, D] rows of stride q_stride (elements) per sequence
    int64_t q_stride,
    const T* kv,          // [num_blocks, block_size, 2, K, D], contiguous
    const int64_t* tables,  // [B, max_blocks]
    int64_t max_blocks,
    const int64_t* ctx,   // [B]
    T* out,               // [B, H, D], contiguous
    int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
    float scale) {
  const int64_t group = heads / kv_heads;  // query heads per kv head
  const int64_t d = head_dim;
  const int64_t token_stride = 2 * kv_heads * d;  // one cache slot: K and V of all kv heads
  const int64_t block_stride = block_size * token_stride;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch: the group's queries, accumulators, running max/sum, block scores.
    std::vector<float> qf(group * d), acc(group * d), m(group), l(group), s(group * block_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads;
      const int64_t kh = item % kv_heads;
      const int64_t n_ctx = ctx[b];
      for (int64_t g = 0; g < group; ++g) {
        const T* qp = q + b * q_stride + (kh * group + g) * d;
        for (int64_t i = 0; i < d; ++i) qf[g * d + i] = to_float(qp[i]) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t n_blocks = (n_ctx + block_size - 1) / block_size;
      for (int64_t n = 0; n < n_blocks; ++n) {
        const T* base = kv + tables[b * max_blocks + n] * block_stride + kh * d;
        const int64_t n_tok = std::min(block_size, n_ctx - n * block_size);
        // Scores of the block: q . k for every token and query head of the group.
        for (int64_t t = 0; t < n_tok; ++t) {
          const T* kp = base + t * token_stride;
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * d;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d; ++i) dot += qg[i] * to_float(kp[i]);
            s[g * block_size + t] = dot;
          }
        }
        // Online softmax: rescale what was accumulated when the running max grows.
        for (int64_t g = 0; g < group; ++g) {
          float* sg = s.data() + g * block_size;
          float mx = m[g];
          for (int64_t t = 0; t < n_tok; ++t) mx = std::max(mx, sg[t]);
          if (mx > m[g]) {
            const float corr = exp_nonpositive(m[g] - mx);  // exp(-inf) -> 0 on the first block
            l[g] *= corr;
            float* ag = acc.data() + g * d;
            for (int64_t i = 0; i < d; ++i) ag[i] *= corr;
            m[g] = mx;
          }
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < n_tok; ++t) {
            const float p = exp_nonpositive(sg[t] - mx);
            sg[t] = p;
            sum += p;
          }
          l[g] += sum;
        }
        // Weighted sum of the block's values.
        for (int64_t t = 0; t < n_tok; ++t) {
          const T* vp = base + t * token_stride + kv_heads * d;
          for (int64_t g = 0; g < group; ++g) {
            const float p = s[g * block_size + t];
            float* ag = acc.data() + g * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) ag[i] += p * to_float(vp[i]);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* op = out + (b * heads + kh * group + g) * d;
        const float inv = 1.0f / l[g];
        for (int64_t i = 0; i < d; ++i) store(op + i, acc[g * d + i] * inv);
      }
    }
  });
}

at::Tensor paged_decode_attention(
    const at::Tensor& query,         // [B, H, D]
    const at::Tensor& kv_cache,      // [num_blocks, block_size, 2, K, D]
    const at::Tensor& block_tables,  // [B, max_blocks] int64
    const at::Tensor& context_lens,  // [B] int64, each >= 1
    double scale) {
  TORCH_CHECK(query.dim() == 3, "query must be [B, H, D]");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(2) == 2, "kv_cache must be [N, S, 2, K, D]");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type(), "query and cache dtypes differ");
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  const int64_t batch = query.size(0), heads = query.size(1), d = query.size(2);
  const int64_t kv_heads = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == d, "head_dim of query and cache differ");
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.size(0) == batch && context_lens.size(0) == batch, "batch mismatch");
  // The query is usually a strided view into the fused qkv output: any row stride is fine as
  // long as each row's heads are contiguous.
  at::Tensor q = (query.stride(2) == 1 && query.stride(1) == d) ? query : query.contiguous();
  at::Tensor tables = block_tables.contiguous();
  at::Tensor lens = context_lens.contiguous();
  at::Tensor out = at::empty({batch, heads, d}, query.options());
  const int64_t max_blocks = tables.size(1);
  const float sc = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat) {
    decode_kernel<float>(q.data_ptr<float>(), q.stride(0), kv_cache.data_ptr<float>(),
                         tables.data_ptr<int64_t>(), max_blocks, lens.data_ptr<int64_t>(),
                         out.data_ptr<float>(), batch, heads, kv_heads, d, kv_cache.size(1), sc);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_kernel<c10::BFloat16>(
        q.data_ptr<c10::BFloat16>(), q.stride(0), kv_cache.data_ptr<c10::BFloat16>(),
        tables.data_ptr<int64_t>(), max_blocks, lens.data_ptr<int64_t>(),
        out.data_ptr<c10::BFloat16>(), batch, heads, kv_heads, d, kv_cache.size(1), sc);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only, got ",
                q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(carpool, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor kv_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(carpool, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
