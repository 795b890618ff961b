// bf16 linear layers over one weight layout for every row count: oneDNN's AMX micro-kernel
// (through ATen's cpublas::brgemm, the next column block prefetched into L2 meanwhile), and a
// prefetching AVX-512 BF16 matrix-vector kernel for up to `gemv_max_rows` rows (the caller's
// choice: carpool.model.vnni_linear.GEMV_MAX_ROWS says why it defaults to 0).
// Registers torch.ops.carpool.vnni_linear.
//
// The layout ("VNNI", what the dot-product instructions read): a [N, K] weight becomes
// [ceil(N / 64), K / 2, 64, 2]; block b holds output columns 64b..64b+63, and for each pair of
// input elements (2p, 2p+1) the 64 columns' two weights side by side. Why this layout:
//  - one row of x times a block is, for each pair p, one broadcast of x's pair and four
//    VDPBF16PS over 256 contiguous bytes into 64 float32 sums: no horizontal reductions, and
//    each thread reads one contiguous run of blocks, which a software prefetch a few KiB
//    ahead keeps streaming (measured on an AMX Xeon, 2 threads, the small model's 33 weights:
//    ~34 GB/s against ~11 GB/s for oneDNN's product on its own packed layout at one row);
//  - it is exactly the B operand of a bf16 brgemm with ld_b = 64, so the same bytes serve
//    the AMX path, at oneDNN's own speed from 8 rows and ~2.5x it at one row (prefetched):
//    one copy of each weight, not two.
// Sums are float32, rounded once to bf16 (round to nearest even), with the bias added in
// float32 before the rounding, as oneDNN's bf16 linear does; only the order of the sums
// differs from oneDNN (results within a bf16 rounding of each other). Within the AMX path a
// row's result does not depend on the other rows of the call (tested); between the two paths
// about one output in a few thousand rounds the other way.
//
// Built with -march=native: without AVX-512 BF16 the matrix-vector kernel is a plain loop
// (same sums), and without AMX (cpublas::could_pack false) every row count takes it;
// carpool.model.vnni_linear only picks this layout where both are there.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vec_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using B16 = c10::BFloat16;
constexpr int64_t kBlockN = 64;  // output columns per block: four vectors of 16 float32 sums
constexpr int64_t kBlockM = 32;  // input rows per AMX call (two 16-row tiles)
// Software prefetch distance of the matrix-vector kernel, in K pairs (256 bytes each): 16
// pairs = 4 KiB ahead measured fastest of 0/4/8/16/32 (0: ~14 GB/s, 16: ~34 GB/s in L3).
constexpr int64_t kPrefetchPairs = 16;

bool has_amx_brgemm() { return at::native::cpublas::could_pack(at::kBFloat16); }

// Rows [0, MR) of x (row stride k) times one 64-column block `wb` ([k/2, 64, 2]) into y (row
// stride ldy), columns [0, ncols) of the block kept.
template <int MR>
void gemv_block(const B16* x, int64_t k, const B16* wb, const float* bias, B16* y, int64_t ldy,
                int64_t ncols) {
  const int64_t pairs = k / 2;
#if defined(__AVX512BF16__)
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const char* row = reinterpret_cast<const char*>(wb + p * kBlockN * 2);
    // Past the block's end this reads ahead into the next block (contiguous) or, at the
    // weight's end, nowhere: a prefetch never faults.
    const char* ahead = row + kPrefetchPairs * kBlockN * 2 * sizeof(B16);
    for (int c = 0; c < 4; ++c) _mm_prefetch(ahead + 64 * c, _MM_HINT_T0);
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
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < 4 && 16 * j < ncols; ++j) {
      const int64_t c0 = 16 * j, cn = std::min<int64_t>(16, ncols - c0);
      const __mmask16 mask = static_cast<__mmask16>((1u << cn) - 1);
      __m512 v = acc[m][j];
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + c0));
      _mm256_mask_storeu_epi16(y + m * ldy + c0, mask, (__m256i)_mm512_cvtneps_pbh(v));
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

// All rows of x times one block, four rows at a time (the block stays in L1/L2 between them).
void gemv_rows(const B16* x, int64_t rows, int64_t k, const B16* wb, const float* bias, B16* y,
               int64_t ldy, int64_t ncols) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) gemv_block<4>(x + m * k, k, wb, bias, y + m * ldy, ldy, ncols);
  const B16* xm = x + m * k;
  B16* ym = y + m * ldy;
  switch (rows - m) {
    case 3: gemv_block<3>(xm, k, wb, bias, ym, ldy, ncols); break;
    case 2: gemv_block<2>(xm, k, wb, bias, ym, ldy, ncols); break;
    case 1: gemv_block<1>(xm, k, wb, bias, ym, ldy, ncols); break;
    default: break;
  }
}

// float32 sums of `rows` rows (stride ldc) plus bias, rounded to bf16 into y (stride ldy).
void store_rows(const float* c, int64_t ldc, int64_t rows, const float* bias, B16* y,
                int64_t ldy, int64_t ncols) {
  for (int64_t i = 0; i < rows; ++i) {
    int64_t j = 0;
#if defined(__AVX512BF16__)
    for (; j < ncols; j += 16) {
      const int64_t cn = std::min<int64_t>(16, ncols - j);
      const __mmask16 mask = static_cast<__mmask16>((1u << cn) - 1);
      __m512 v = _mm512_maskz_loadu_ps(mask, c + i * ldc + j);
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + j));
      _mm256_mask_storeu_epi16(y + i * ldy + j, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
#endif
    for (; j < ncols; ++j) y[i * ldy + j] = B16(c[i * ldc + j] + (bias ? bias[j] : 0.0f));
  }
}

at::Tensor vnni_linear(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t n, int64_t gemv_max_rows) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "vnni_linear: x must be a contiguous [M, K] bfloat16 tensor, got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.is_contiguous() &&
                  weight.scalar_type() == at::kBFloat16 && weight.size(1) * 2 == k &&
                  weight.size(2) == kBlockN && weight.size(3) == 2,
              "vnni_linear: weight must be a contiguous [blocks, ", k / 2, ", ", kBlockN,
              ", 2] bfloat16 tensor (vnni_linear.pack of a [N, ", k, "] weight), got ",
              weight.sizes(), " ", weight.scalar_type());
  const int64_t blocks = weight.size(0);
  TORCH_CHECK(n > (blocks - 1) * kBlockN && n <= blocks * kBlockN, "vnni_linear: n = ", n,
              " does not fit ", blocks, " blocks of ", kBlockN, " columns");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat,
                "vnni_linear: bias must be a contiguous [", n, "] float32 tensor, got ",
                bias->sizes(), " ", bias->scalar_type());
    bp = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({rows, n}, x.options());
  if (rows == 0) return y;
  const B16* xp = x.data_ptr<B16>();
  const B16* wp = weight.data_ptr<B16>();
  B16* yp = y.data_ptr<B16>();
  const int64_t block_elems = (k / 2) * kBlockN * 2;
  const bool amx = rows > gemv_max_rows && has_amx_brgemm();
  // One task per column block: each thread reads its own contiguous run of the weight once,
  // whatever the row count (an AMX task loops over the rows' 32-row slices with its block hot).
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float c[kBlockM * kBlockN];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t col = b * kBlockN, ncols = std::min<int64_t>(kBlockN, n - col);
      const B16* wb = wp + b * block_elems;
      const float* bb = bp != nullptr ? bp + col : nullptr;
      if (!amx) {
        gemv_rows(xp, rows, k, wb, bb, yp + col, n, ncols);
        continue;
      }
      if (b + 1 < b1) {  // the next block into L2 while AMX works on this one (~1.5x at 1 row)
        const char* nxt = reinterpret_cast<const char*>(wb + block_elems);
        for (int64_t o = 0; o < block_elems * 2; o += 64) _mm_prefetch(nxt + o, _MM_HINT_T1);
      }
      for (int64_t m0 = 0; m0 < rows; m0 += kBlockM) {
        const int64_t mr = std::min<int64_t>(kBlockM, rows - m0);
        at::native::cpublas::brgemm(mr, kBlockN, k, k, kBlockN, kBlockN, false, xp + m0 * k, wb,
                                    c, true);
        store_rows(c, kBlockN, mr, bb, yp + m0 * n + col, n, ncols);
      }
    }
    if (amx) at::native::cpublas::brgemm_release(true);
  });
  return y;
}

// Whether this build and CPU run the fast paths: AVX-512 BF16 for few rows, AMX for more.
bool vnni_linear_fast() {
#if defined(__AVX512BF16__)
  return has_amx_brgemm();
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(carpool, m) {
  m.def("vnni_linear(Tensor x, Tensor weight, Tensor? bias, int n, int gemv_max_rows) -> Tensor");
  m.def("vnni_linear_fast() -> bool");
}

TORCH_LIBRARY_IMPL(carpool, CPU, m) { m.impl("vnni_linear", &vnni_linear); }

TORCH_LIBRARY_IMPL(carpool, CompositeExplicitAutograd, m) {
  m.impl("vnni_linear_fast", &vnni_linear_fast);
}
