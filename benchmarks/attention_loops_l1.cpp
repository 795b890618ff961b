// The decode attention kernel's inner loops on one block held in L1, with nothing else around
// them: the arithmetic side of the kernel alone (issue 11, twenty-third pass; BENCHMARKS.md).
// One block of 16 tokens, GQA 16/4, head_dim 64, a bfloat16 cache, the AVX2 grouped loops
// (Lanes8) of vec_math.h: the scores (block_dots_split), the value sums (block_values_split)
// and the online softmax step, each called N times; cycles per (token, kv head) at the clock
// given (an FMA loop measures it: see BENCHMARKS.md).
//
//   g++ -O3 -march=native -fno-math-errno -std=c++17 \
//       $(.venv/bin/python -c "import torch.utils.cpp_extension as c; \
//         print(' '.join('-I' + p for p in c.include_paths()))") \
//       -Isrc/carpool/model/csrc benchmarks/attention_loops_l1.cpp -o /tmp/attention_loops_l1
//   /tmp/attention_loops_l1 3.35     # the clock in GHz
#include "vec_math.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace carpool_kernels;

int main(int argc, char** argv) {
#if defined(CARPOOL_GROUPED)
  const double ghz = argc > 1 ? std::atof(argv[1]) : 3.0;
  const int d = 64, bs = 16, nkh = 4, group = 4, nh = nkh * group;
  const int ts = 2 * nkh * d;  // a cache slot: K and V of every kv head
  std::vector<c10::BFloat16> block(bs * ts);
  for (size_t i = 0; i < block.size(); ++i) block[i] = c10::BFloat16(0.01f * (i % 13) - 0.05f);
  std::vector<float> q(nh * d), acc(nh * d), s(nh * bs), m(nh, -1e30f), l(nh, 0.0f);
  for (int i = 0; i < nh * d; ++i) q[i] = 0.001f * (i % 17);
  auto no_prefetch = [](int64_t) {};
  const long n = 400000;
  const char* names[] = {"scores", "value sums", "softmax"};
  for (int which = 0; which < 3; ++which) {
    const auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < n; ++i) {
      if (which == 0) {
        block_dots_split<Lanes8>(q.data(), d, block.data(), ts, d, bs, nkh, group, s.data(), bs,
                                 no_prefetch, 0);
      } else if (which == 1) {
        block_values_split<Lanes8>(acc.data(), d, block.data() + nkh * d, ts, d, bs, nkh, group,
                                   s.data(), bs);
      } else {  // the kernel's softmax step for the block (paged_attention.cpp)
        for (int h = 0; h < nh; ++h) {
          float* sh = s.data() + h * bs;
          const float mx = max_block(sh, bs, m[h]);
          if (mx > m[h]) {
            const float corr = exp_nonpositive(m[h] - mx);
            l[h] *= corr;
            for (int j = 0; j < d; ++j) acc[h * d + j] *= corr;
            m[h] = mx;
          }
          l[h] += exp_block(sh, bs, mx);
        }
      }
      asm volatile("" ::: "memory");  // every call's stores happen
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%-10s %6.1f cycles per (token, kv head)\n", names[which],
                dt * ghz * 1e9 / n / (bs * nkh));
  }
  std::printf("(checksum %g)\n", acc[5] + s[3]);
  return 0;
#else
  std::printf("needs AVX2 and FMA\n");
  return 1;
#endif
}
