// Decode attention that reads the paged KV cache in place (CPU).
//
// One query token per sequence. For every sequence (and run of kv heads) the kernel walks the
// sequence's block table, and per block: dot products of the group's queries with the block's keys, an
// online (streaming) softmax update, and the weighted sum of the block's values, all in
// float32. K and V are read straight from the cache, once per kv head for all the query heads
// that share it (grouped-query attention); nothing is copied. A long context over a float
// cache is walked in chunks, each on any thread, their softmax sums merged after (see
// decode_kernel's work items).
//
// The cache holds float32 rows, bfloat16 values (also under float32 queries: a float32 model's
// cache at half the bytes), or int8 values (``kv_cache_dtype="int8"``). A bfloat16 block is in
// kv_layout.py's block layout (a region per kv head: keys pair-major, [d / 2][block_size][2],
// then value rows), which the pair loops read with AVX-512 or AVX2 (vec_math.h,
// block_pair_dots: pair p of 16 tokens, or 8, one vector, the scores without a reduction:
// 1.0-1.5x over the row loops' reductions, BENCHMARKS.md, issue 11, thirty-fourth pass); in a
// plain build a block's keys are copied back into rows for the row loops. An int8 cache's
// (token, K/V, kv head) row is head_dim int8 values and a float32 scale, in kv_quant.py's block
// layout (a region per kv head: keys word-major, key scales, value rows, value scales), which
// the VNNI loops read as they are; the other loops get a block's keys copied back into rows.
// The scale multiplies the dot product (K) or the softmax weight (V): dequantization costs one
// multiply per row, not per element.
//
// Registered as the torch operators carpool::paged_decode_attention, carpool::kv_store_int8,
// carpool::kv_store and carpool::kv_gather_rows (CPU only), so they show in torch.profiler under those names and need no
// pybind11 (a much shorter build).
//
// The inner loops (vec_math.h) use AVX-512 intrinsics where the build machine has them
// (-march=native), else AVX2 + FMA ones, and plain loops otherwise. A bfloat16 or int8 cache
// goes through "grouped" loops (with AVX-512 too, where a kv head has 2 or more query heads):
// each K/V vector loaded once for up to 4 query heads of its kv head, bfloat16 rows widened by
// one shift or mask per vector (BENCHMARKS.md, issue 11, eighth and ninth passes); 8 lanes, or
// 16 with AVX-512 where head_dim is a multiple of 32 (twenty-first pass).
// Where the CPU has AVX-512 BF16 (Zen 4, Sapphire Rapids), bfloat16 queries over a bfloat16 or
// int8 cache take VDPBF16PS loops instead (32 multiply-adds an instruction; int8 rows widened
// to bfloat16 exactly), with the softmax weights rounded to bfloat16 for the value sums as GPU
// flash-attention kernels round them, and the softmax of a block in one vector pass: with the
// next blocks prefetched (prefetch_ahead), 1.45x (GQA) / 1.16x (MHA) / 1.77x (batch 1) over the grouped
// loops on a bfloat16 cache at 2k (BENCHMARKS.md, issue 11, tenth pass). An int8 cache with
// AVX-512 VNNI (head_dim a multiple of 64) takes integer dot products instead, queries rounded
// to int8 (int8_attention.h; issue 11, twelfth pass); so does one on an AVX2 CPU without
// AVX-512, each VNNI instruction as two (the same integers; twenty-third pass). Both are "the
// VNNI loops" below.

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
#include <utility>
#include <vector>

#include "int8_attention.h"
#include "shared_ranges.h"
#include "vec_math.h"

namespace {

using namespace carpool_kernels;  // NOLINT: the helpers of vec_math.h

// A sequence's context is split into work items ("chunks", see decode_kernel's work items): a
// context of at most kChunkTokens tokens (rounded down to whole blocks) is one, a longer one as
// many as chunks of kChunkTokens would cover it rounded up to an even count, at most kMaxChunks,
// of equal sizes (to a block; so from about a third of kChunkTokens). Why bounds: every chunk
// starts its softmax afresh (its running max found again, the sums rescaled each time it grows),
// ~2.5 us a chunk on GQA 16/4; chunks of 512 tokens cost 3% at batch 8 x 8k with a bfloat16
// cache. An int8 cache is not split: its kernel is already near the memory's speed at batch 1
// (1.09-1.3x from chunks) and the restarts cost it 5-8% at batch 8 (BENCHMARKS.md, issue 11,
// twenty-fourth pass).
constexpr int64_t kChunkTokens = 512;
constexpr int64_t kMaxChunks = 8;

// How many blocks ahead the kernel asks for a block's rows (see prefetch_next).
constexpr int64_t kPrefetchBlocks = 2;

// Ask for a cache line of a block two blocks ahead, into L1 (prefetcht0) or L2 (prefetcht1).
// The requests are spread over the block's work (a few lines per reduction or tile phase): on
// the Zen 4 of issue 11, 16 KiB of them at once per block filled L1's miss buffers and stalled
// the loads of the block being computed, so the tenth pass asked into L2 (1.20x on GQA 8 x 2k,
// 1.76x at batch 1 over no prefetch). Spread, L1 is the better target on the Zen 5: 1.02-1.12x
// on bf16 caches at 2k-8k in the kernel A/B, the default model's batch-16 step at 2k 1.04x,
// batch 1 and the int8 cache level (BENCHMARKS.md, issue 11, twenty-first pass). On the Zen 4
// L1 is not: there L2 measured 1.26-1.48x (int8 cache) and 1.25-1.47x (bf16) on GQA 16/4 at
// 8 x 2k, 1.56-1.57x / 1.41x on 9/3 at 16 x 2k, 1.15x / 1.33x at 1 x 8k, level at 1 x 2k
// (benchmarks/ab_paged_kernel.py; BENCHMARKS.md, issue 11, thirtieth pass); prefetcht2 level
// with prefetcht1. On the Intel Xeon with AMX of the fortieth passes L2 is the better target
// too: 1.12-1.17x on bf16 caches (float32 or bf16 queries) at 16 x 320 to 16 x 2k of GQA 9/3
// and 8 x 2k of 16/4, 0.99-1.07x at batch 1, the int8 cache 0.97-1.08x (forty-fifth pass).
// The build tells them apart by AVX-VNNI (the VEX form, which the Zen 5 and Intel's AMX CPUs
// have and the Zen 4 lacks) and AMX (Intel's); AVX2 CPUs keep L1, as measured before.
#if defined(__AVX512F__) && (!defined(__AVXVNNI__) || defined(__AMX_TILE__))
inline void prefetch_ahead(const char* p) { __builtin_prefetch(p, 0, 2); }
#else
inline void prefetch_ahead(const char* p) { __builtin_prefetch(p, 0, 3); }
#endif

// Asks for a range of cache lines in order (the next block's), `count` more at each call. A
// value, which the pair loops copy into a local for their run (pair_dots): as a lambda over
// the kernel's own cursor it was memory gcc could not tell from the keys' loads (intrinsic
// loads may alias anything), so the cursor was stored and reloaded around every pair, a chain
// through memory beside the multiply-adds (prompt rows 0.99-1.23x, decode level; BENCHMARKS.md,
// issue 11, fifty-third pass). The other loops call it a few times a block and take it by
// reference (the same copy in the VNNI loops measured 0.92x on an MHA int8 cache).
struct LinePrefetch {
  const char* at;   // the next line to ask for
  const char* end;  // past the last line
  void operator()(int64_t count) {
    for (; count > 0 && at < end; --count, at += 64) prefetch_ahead(at);
  }
};

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
  // An int8 cache's block holds one region per kv head instead of slots (kv_quant.py's block
  // layout: K words [d / 4][block_size][4], K scales, V rows [block_size][d], V scales); so
  // does a bfloat16 cache's (kv_layout.py: K pairs [d / 2][block_size][2], V rows). A float32
  // cache's block is slots: per token [2][K][d].
  constexpr bool kInt8 = std::is_same<C, int8_t>::value;
  constexpr bool kPairs = std::is_same<C, c10::BFloat16>::value;
  constexpr bool kRegions = kInt8 || kPairs;
  const int64_t region = 2 * block_size * row;  // one kv head's values in a block (regions)
  const int64_t head_off = kRegions ? region : row;  // from one kv head's data to the next's
  // bfloat16 queries over a bfloat16 or int8 cache with AVX-512 BF16: the dot-product loops
  // (vec_math.h, block_dots_bf16 / block_values_bf16), for every group size.
  // An int8 cache with AVX-512 VNNI, or AVX2 without AVX-512: integer dot products
  // (int8_attention.h), for every group size and either query dtype, head_dim a multiple of 64.
#if defined(CARPOOL_INT8_ATTENTION)
  constexpr bool kVnni = kInt8;
  const bool vnni = kVnni && d % 64 == 0;
#else
  constexpr bool kVnni = false;
  const bool vnni = false;
#endif
#if defined(__AVX512BF16__)
  constexpr bool kDp = std::is_same<T, c10::BFloat16>::value &&
                       (std::is_same<C, T>::value || kInt8);
  const bool dp = kDp && d % 32 == 0 && d <= 256 && !vnni;
#else
  constexpr bool kDp = false;
  const bool dp = false;
#endif
  // A bfloat16 or int8 cache: "grouped" loops (8 or 16 lanes, below) that read each K and V vector once for
  // all the query heads of its group (vec_math.h, block_dots_split); bfloat16 rows in split
  // order (load_split), so the queries and accumulators are kept in that order. With AVX-512
  // only for groups of 2 or more query heads: on a Zen 4 the 16-lane per-head loops below win
  // without a group to share a vector with (0.77-0.91x for the grouped ones at group 1, against
  // 1.3-1.6x at groups of 3 and 4; BENCHMARKS.md, issue 11, ninth pass).
#if defined(CARPOOL_GROUPED)
  constexpr bool kGroupable =
      std::is_same<C, c10::BFloat16>::value || kInt8;
#if defined(__AVX512F__)
  const bool grouped = kGroupable && d % 16 == 0 && group >= 2 && !dp && !vnni;
#else
  const bool grouped = kGroupable && d % 16 == 0 && !dp && !vnni;
#endif
  const bool split = grouped && std::is_same<C, c10::BFloat16>::value;
#else
  const bool grouped = false, split = false;
#endif
  // A bfloat16 cache's scores with AVX-512 or AVX2: 16 (or 8) tokens' pair p in one vector
  // (vec_math.h, block_pair_dots), bfloat16 queries in VDPBF16PS where the dp loops run,
  // float32 (or widened) ones in FMAs; the value sums stay the loops' below. In a plain build
  // the keys are copied into rows per block for the row loops (an AVX2 build copying them:
  // 0.47-0.59x against the row layout before; its pair loop 0.96-1.21x).
#if defined(__AVX512F__) || defined(CARPOOL_AVX2)
  const bool pair_dots = kPairs;
#else
  const bool pair_dots = false;
#endif
  // The grouped loops' lanes (vec_math.h, with_lanes): 16 with AVX-512 where head_dim is a
  // multiple of 32, else 8.
#if defined(CARPOOL_GROUPED) && defined(__AVX512F__)
  const bool wide = grouped && d % 32 == 0;
#else
  const bool wide = false;
#endif
  // A work item is one chunk of a sequence's context (whole blocks; kChunkTokens) and a run
  // of its kv heads.
  // Why chunks ("flash decoding"): with a sequence as one item per run of kv heads, batch 1
  // kept 2 threads busy only by splitting its kv heads, each thread reading its heads' slice
  // of every slot (1.7-1.9x slower at 2k-8k on the Zen 2 of issue 11), and a single kv head
  // not at all. The chunks of a sequence run on any thread; their partial results (each head's
  // running max, sum and weighted values) are merged after. The chunks are fixed by the
  // context length alone, never by the batch or the threads, so a sequence computes the same
  // numbers alone or in any batch (what makes every batching strategy's greedy tokens equal).
  // Why a run of kv heads, not one: a token's K (and V) of all kv heads is one contiguous row,
  // and reading whole rows streams through memory, while one head's slice of every row is a
  // 2-cache-line read every few KiB (measured ~10x slower: latency-bound). Chunks are split
  // into runs only as far as needed to give each thread about 2 items (a short sequence alone
  // on 2 threads: 4 runs of K/4 heads).
  // Each sequence's chunks: one up to kChunkTokens (whole blocks), else an even count of equal
  // sizes, at most kMaxChunks; an int8 cache's contexts are not split (see kChunkTokens).
  const int64_t min_chunk = std::max<int64_t>(1, kChunkTokens / block_size);
  std::vector<int64_t> work_seq, work_first, work_end;  // per chunk: sequence, blocks [first, end)
  std::vector<int64_t> seq_work(batch + 1);  // sequence b's chunks: [seq_work[b], seq_work[b+1])
  for (int64_t b = 0; b < batch; ++b) {
    seq_work[b] = static_cast<int64_t>(work_seq.size());
    const int64_t n_blocks = (ctx[b] + block_size - 1) / block_size;
    const int64_t per = kInt8 ? n_blocks
                              : std::max(min_chunk, (n_blocks + kMaxChunks - 1) / kMaxChunks);
    // As many chunks as chunks of `per` blocks cover the context, of equal sizes (to a block):
    // chunks of `per` and a short rest left a thread with the long ones (1 x 9/3 x 528 tokens,
    // 32 blocks and 1, ran as long as 1 x 1024). And an even count: 3, 5 or 7 equal chunks of a
    // sequence alone split unevenly over 2 threads (1 x 9/3 x 1100-3584 1.07-1.36x with one
    // more; batches of 8-16 level but for GQA 16/4's bf16 loops, 0.97x; BENCHMARKS.md, issue
    // 11, thirty-third pass). Still by the context alone, never by the threads.
    int64_t chunks = std::max<int64_t>(1, (n_blocks + per - 1) / per);
    if (chunks > 1 && chunks % 2 == 1) ++chunks;  // at most kMaxChunks, which is even
    for (int64_t c = 0; c < chunks; ++c) {
      work_seq.push_back(b);
      work_first.push_back(c * n_blocks / chunks);
      work_end.push_back((c + 1) * n_blocks / chunks);
    }
  }
  const int64_t works = static_cast<int64_t>(work_seq.size());
  seq_work[batch] = works;
  const int64_t threads = at::get_num_threads();
  const int64_t splits =
      std::min(kv_heads, std::max<int64_t>(1, (2 * threads + works - 1) / works));
  const int64_t run_heads = (kv_heads + splits - 1) / splits;  // kv heads per work item
  const int64_t runs = (kv_heads + run_heads - 1) / run_heads;
  // The blocks [first, end) of an item's chunk.
  auto blocks_of = [&](int64_t w) { return std::make_pair(work_first[w], work_end[w]); };
  // A sequence of several chunks: each chunk's partial result per query head, merged below:
  // [works][heads][d + 2] floats (weighted values in the loops' order, running max, sum).
  const int64_t part_row = d + 2;
  // Kept between calls (the calling thread's): a fresh vector of this size (~135 KB at 8 x 2k,
  // GQA 16/4) is a fresh mapping, its pages faulted in and unmapped in every call.
  static thread_local std::vector<float> part_buf;
  const int64_t part_size = works > batch ? works * heads * part_row : 0;
  if (static_cast<int64_t>(part_buf.size()) < part_size) part_buf.resize(part_size);
  // (A pointer, not the thread_local: in the parallel loops that name is each worker's own.)
  float* const part = part_buf.data();
  // Head h's output op = a / lsum: a holds the weighted values in the order of the loops that
  // made them, lsum the softmax sum.
  auto finish = [&](const float* a, float lsum, T* op) {
    const float inv = 1.0f / lsum;
#if defined(CARPOOL_INT8_ATTENTION)
    if (vnni) {
      store_from_vnni(a, op, d, inv);
      return;
    }
#endif
#if defined(__AVX512BF16__)
    if constexpr (kDp) {
      if (dp) {
        store_from_pairs(a, op, d, inv);
        return;
      }
    }
#endif
#if defined(CARPOOL_GROUPED)
    if (split) {
      with_lanes(wide, [&](auto l) { store_from_split<decltype(l)>(a, op, d, inv); });
      return;
    }
#endif
    for (int64_t i = 0; i < d; ++i) store(op + i, a[i] * inv);
  };
  // Sequence b's head h from its chunks' partial results: the softmax of the whole context,
  // every chunk's sums rescaled to the largest running max, added in chunk order (whichever
  // thread merges, the same bits). a: d floats of scratch.
  auto merge = [&](int64_t b, int64_t h, float* a) {
    const int64_t w0 = seq_work[b], w1 = seq_work[b + 1];
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t w = w0; w < w1; ++w) mx = std::max(mx, part[(w * heads + h) * part_row + d]);
    std::fill(a, a + d, 0.0f);
    float lsum = 0.0f;
    for (int64_t w = w0; w < w1; ++w) {
      const float* pr = part + (w * heads + h) * part_row;
      const float c = exp_nonpositive(pr[d] - mx);
      lsum += c * pr[d + 1];
      for (int64_t i = 0; i < d; ++i) a[i] += c * pr[i];
    }
    finish(a, lsum, out + (b * heads + h) * d);
  };
  // Per (sequence, run): its output written (by its only chunk, or merged by the thread that
  // computed all its chunks: the usual case at a batch of a few sequences per thread); the
  // rest are merged after every item is done.
  std::vector<char> done(part_size ? batch * runs : 0, 0);
  // Each thread one contiguous range of items, of about equal cost (blocks times kv heads, and
  // one block's worth per item for its queries and output): an equal count of items left
  // chunks of other lengths (sequences of other contexts, the last run of fewer kv heads) to
  // fall on one thread. Contiguous, so a thread still computes all the chunks of a (sequence,
  // run) in a row where it can and merges them itself (all_here below). A thread done with
  // its range takes the items left in the others' (shared_ranges.h: a thread slowed for a
  // while no longer holds the call's end).
  const int64_t items = works * runs;
  std::vector<int64_t> bounds(threads + 1, items);
  bounds[0] = 0;
  {
    std::vector<int64_t> cost_before(items + 1, 0);  // the cost of the items before item i
    for (int64_t i = 0; i < items; ++i) {
      const int64_t w = i / runs, nkh = std::min(run_heads, kv_heads - (i % runs) * run_heads);
      cost_before[i + 1] = cost_before[i] + (work_end[w] - work_first[w]) * nkh + 1;
    }
    // Range p ends at the item boundary nearest p / threads of the total cost; on a tie, the
    // later one: the calling thread (range 0) starts first, the others once woken (3 equal
    // items on 2 threads: 2 on the calling thread, as an equal count of items gave them).
    int64_t i = 0;
    for (int64_t p = 1; p < threads; ++p) {
      const int64_t target = cost_before[items] * p;  // in units of 1 / threads
      while (i < items && cost_before[i + 1] * threads <= target) ++i;
      const bool next_nearer = i < items && cost_before[i + 1] * threads - target <=
                                                target - cost_before[i] * threads;
      bounds[p] = std::max(bounds[p - 1], next_nearer ? i + 1 : i);
    }
  }
  const auto compute = [&](carpool_kernels::RangeTaker& taker) {
    // Per-thread scratch for one run: queries, accumulators, running max/sum, block scores.
    const int64_t rh = run_heads * group;  // query heads of a run
    std::vector<float> qf(rh * d), acc(rh * d), m(rh), l(rh), s(rh * block_size);
    std::vector<float> ks(row_extra<C>() ? run_heads * block_size : 0);  // int8: K row scales
    std::vector<float> vs(row_extra<C>() ? run_heads * block_size : 0);  // int8: V row scales
    std::vector<float> pw(row_extra<C>() ? block_size : 0);  // int8: weight x V scale
    // int8 without the VNNI loops: the run's keys of a block as rows [block_size][nkh][d].
    // A bfloat16 cache without the pair loops likewise (pairs [d / 2][block_size][2]).
    std::vector<C> krows(kRegions ? block_size * run_heads * d : 0);
    // The dot-product loops: each head's softmax weights in bfloat16, padded to an even count.
    const int64_t p_stride = (block_size + 15) / 16 * 16;  // softmax_weights_bf16 writes 16s
    std::vector<c10::BFloat16> pb(kDp ? rh * p_stride : 0);
    // The VNNI loops: int8 queries (each 32-bit word, broadcast to a vector with AVX-512) with
    // a scale and an offset per 64 values, and the running sums of the softmax as 16 lanes a
    // head.
#if defined(CARPOOL_INT8_ATTENTION)
    std::vector<QWord> qb(kVnni ? rh * d / 4 : 0);
    std::vector<float> qsc(kVnni ? rh * d / 64 : 0), lv(kVnni ? rh * 16 : 0);
    std::vector<int32_t> qo(kVnni ? rh * d / 64 : 0);
#endif
    int64_t q_ready = -1;  // the (sequence, run) whose queries qf / qb hold
    // The items this thread takes: its own range's in order, then others' (shared_ranges.h);
    // `begin`: the first of the latest items it took one after another.
    int64_t begin = -1, last = -2;
    for (int64_t item, end; taker.take(item, end);) {
      if (item != last + 1) begin = item;
      last = item;
      const int64_t w = item / runs;
      const int64_t b = work_seq[w];
      const auto [n_first, n_end] = blocks_of(w);
      const int64_t run = item % runs;
      const int64_t kh0 = run * run_heads;
      const int64_t nkh = std::min(run_heads, kv_heads - kh0);
      const int64_t nh = nkh * group;
      const int64_t h0 = kh0 * group;
      const int64_t n_ctx = ctx[b];
      [[maybe_unused]] const T* qrun = q + b * q_stride + h0 * d;  // the run's query rows
      // The queries of a run, prepared once for all the chunks of its sequence this thread
      // computes in a row.
      const int64_t q_id = b * runs + run;
      for (int64_t h = 0; h < nh; ++h) {
        if (dp || q_id == q_ready) break;  // dp: read as they are (bfloat16, unscaled)
#if defined(CARPOOL_INT8_ATTENTION)
        if (vnni) {
          quantize_query(qrun + h * d, d, scale, qb.data() + h * d / 4, qsc.data() + h * d / 64,
                         qo.data() + h * d / 64);
          continue;
        }
#endif
        const T* qp = q + b * q_stride + (h0 + h) * d;
#if defined(CARPOOL_GROUPED)
        if (split && !pair_dots) {  // (the pair loops read queries in their order)
          with_lanes(wide, [&](auto l) { to_split<decltype(l)>(qp, qf.data() + h * d, d, scale); });
          continue;
        }
#endif
        for (int64_t i = 0; i < d; ++i) qf[h * d + i] = to_float(qp[i]) * scale;
      }
      q_ready = q_id;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
#if defined(CARPOOL_INT8_ATTENTION)
      std::fill(lv.begin(), lv.end(), 0.0f);
#endif
      for (int64_t n = n_first; n < n_end; ++n) {
        const C* base = kv + tables[b * max_blocks + n] * block_stride + kh0 * head_off;
        const int64_t n_tok = std::min(block_size, n_ctx - n * block_size);
        // The next block is elsewhere in memory (the table is random): ask for its rows
        // while this block computes, a token's K and V run per token of this one. Near the
        // end of a sequence, the next work item's first blocks: at short contexts (batch 32
        // at 64 tokens: 4 blocks a sequence) a sequence's first blocks arriving cold cost
        // more than computing them (1.7x on the kernel there, with the vector store of
        // store_from_pairs; tenth pass).
        const char* next = nullptr;
        if (n + kPrefetchBlocks < n_end) {
          next = reinterpret_cast<const char*>(
              kv + tables[b * max_blocks + n + kPrefetchBlocks] * block_stride + kh0 * head_off);
        } else if (item + 1 < end) {
          const int64_t nw = (item + 1) / runs;
          const auto [nf, ne] = blocks_of(nw);
          const int64_t nn = nf + n + kPrefetchBlocks - n_end;
          if (nn < ne) {
            next = reinterpret_cast<const char*>(
                kv + tables[work_seq[nw] * max_blocks + nn] * block_stride +
                ((item + 1) % runs) * run_heads * head_off);
          }
        }
        const int64_t run_bytes = nkh * row * static_cast<int64_t>(sizeof(C));
        const int64_t kv_bytes = kv_heads * row * static_cast<int64_t>(sizeof(C));
        // The next block's rows of token t (K and V of the run): asked for while this block
        // computes, spread over the work so a few requests are in flight at a time.
        // int8 or bfloat16: the run's regions are one contiguous span.
        const int64_t span = nkh * region * static_cast<int64_t>(sizeof(C));
        auto prefetch_next = [&](int64_t t) {
          if (next == nullptr || t >= block_size) return;
          if constexpr (kRegions) {  // token t's share of the span
            for (int64_t off = t * span / block_size / 64 * 64; off < (t + 1) * span / block_size;
                 off += 64) {
              prefetch_ahead(next + off);
            }
            return;
          }
          const char* nrow = next + t * token_stride * static_cast<int64_t>(sizeof(C));
          for (int64_t off = 0; off < run_bytes; off += 64) {
            prefetch_ahead(nrow + off);
            prefetch_ahead(nrow + kv_bytes + off);
          }
        };
        // Scores of the block: q . k for every token and query head of the run; 16 tokens at
        // a time where the vector path allows.
        int64_t t0 = 0;
        // The next block's regions (a bfloat16 or int8 cache), line by line, for the loops that
        // take a prefetcher; a float32 cache's loops ask token by token (prefetch_next).
        const int64_t lines = next == nullptr || !kRegions ? 0 : (span + 63) / 64;
        LinePrefetch prefetch_lines{next, next + lines * 64};
#if defined(CARPOOL_INT8_ATTENTION)
        if constexpr (kVnni) {
          if (vnni) {
            vnni_block(qb.data(), qsc.data(), qo.data(), d, reinterpret_cast<const int8_t*>(base),
                       block_size, region, n_tok, nkh, group, m.data(), lv.data(), acc.data(),
                       prefetch_lines, lines);
            prefetch_lines(lines);  // what is left (a short block)
            continue;
          }
        }
#endif
        // Where the loops below read K and V: token stride and kv-head stride of each. An int8
        // cache's keys are word-major (for the VNNI loops above): copied into rows for these.
        const C* kbase = base;
        const C* vbase = base + kv_heads * row;
        int64_t kts = token_stride, krw = row, vts = token_stride, vrw = row;
        if constexpr (kRegions) {
          // Keys as rows [n_tok][nkh][d] for the row loops (not for the pair loops): 4-byte
          // words (4 int8 values or 2 bfloat16 ones) from their word-major places.
          if (kInt8 || !pair_dots) {
            constexpr int64_t kWord = 4 / static_cast<int64_t>(sizeof(C));  // values a word
            C* kr = krows.data();
            for (int64_t k = 0; k < nkh; ++k) {
              const C* kw = base + k * region;
              for (int64_t w = 0; w < d / kWord; ++w) {
                for (int64_t t = 0; t < n_tok; ++t) {
                  std::memcpy(kr + (t * nkh + k) * d + kWord * w,
                              kw + (w * block_size + t) * kWord, 4);
                }
              }
            }
            kbase = kr;
            kts = nkh * d;
            krw = d;
          }
          vbase = base + block_size * row;
          vts = d;
          vrw = region;
        }
#if defined(__AVX512F__) || defined(CARPOOL_AVX2)
        if constexpr (kPairs) {
          if (pair_dots) {
            bool scored = false;
#if defined(__AVX512BF16__)
            if constexpr (kDp) {
              if (dp) {  // bfloat16 queries as they are
                block_pair_dots(qrun, d, base, region, block_size, n_tok, nkh, group, s.data(),
                                block_size, scale, prefetch_lines, lines);
                scored = true;
              }
            }
#endif
            if (!scored) {  // float32 queries, scaled (qf)
              block_pair_dots(qf.data(), d, base, region, block_size, n_tok, nkh, group,
                              s.data(), block_size, scale, prefetch_lines, lines);
            }
            prefetch_lines(lines);  // what is left
            t0 = n_tok;
          }
        }
#endif
#if defined(__AVX512BF16__)
        if constexpr (kDp) {
          if (dp && !pair_dots) {
            block_dots_bf16(qrun, d, kbase, kts, krw, n_tok, nkh, group, s.data(),
                            block_size, scale, prefetch_lines, lines);
            prefetch_lines(lines);  // what is left (a short block)
            t0 = n_tok;
          }
        }
#endif
#if defined(CARPOOL_GROUPED)
        if constexpr (kGroupable) {
          if (grouped && !pair_dots) {
            with_lanes(wide, [&](auto l) {
              block_dots_split<decltype(l)>(qf.data(), d, kbase, kts, krw, n_tok, nkh, group,
                                            s.data(), block_size, prefetch_lines, lines);
            });
            prefetch_lines(lines);  // what is left (a short block)
            t0 = n_tok;
          }
        }
#endif
#if defined(__AVX512F__)
        if (d % 16 == 0 && d <= 128) {
          for (; t0 + 16 <= n_tok; t0 += 16) {
            for (int64_t h = 0; h < nh; ++h) {
              for (int64_t t = t0 + h * 16 / nh; t < t0 + (h + 1) * 16 / nh; ++t) prefetch_next(t);
              dot16(qf.data() + h * d, kbase + t0 * kts + (h / group) * krw, kts, d,
                    s.data() + h * block_size + t0);
            }
          }
        }
#elif defined(CARPOOL_AVX2)
        if (d % 8 == 0 && d <= 256) {
          for (; t0 + 8 <= n_tok; t0 += 8) {
            for (int64_t h = 0; h < nh; ++h) {
              for (int64_t t = t0 + h * 8 / nh; t < t0 + (h + 1) * 8 / nh; ++t) prefetch_next(t);
              dot8(qf.data() + h * d, kbase + t0 * kts + (h / group) * krw, kts, d,
                   s.data() + h * block_size + t0);
            }
          }
        }
#endif
        for (int64_t t = t0; t < n_tok; ++t) {
          prefetch_next(t);
          const C* krow = kbase + t * kts;
          for (int64_t h = 0; h < nh; ++h) {
            s[h * block_size + t] = dot(qf.data() + h * d, krow + (h / group) * krw, d);
          }
        }
        if constexpr (kInt8) {
          // Each row's scale: K's multiplies its score, V's joins the softmax weight below.
          for (int64_t k = 0; k < nkh; ++k) {
            const int8_t* hb = base + k * region;
            std::memcpy(ks.data() + k * block_size, hb + d * block_size, n_tok * sizeof(float));
            std::memcpy(vs.data() + k * block_size, hb + block_size * row + d * block_size,
                        n_tok * sizeof(float));
          }
          for (int64_t h = 0; h < nh; ++h) {
            const float* kh = ks.data() + (h / group) * block_size;
            float* sh = s.data() + h * block_size;
            for (int64_t t = 0; t < n_tok; ++t) sh[t] *= kh[t];
          }
        }
#if defined(__AVX512BF16__)
        if constexpr (kDp) {
          if (dp) {
            // Online softmax and the weights in bfloat16 for the value sums; an int8 cache's
            // V row scales join the weights.
            for (int64_t h = 0; h < nh; ++h) {
              const float* mul = nullptr;
              if constexpr (kInt8) mul = vs.data() + (h / group) * block_size;
              softmax_weights_bf16(s.data() + h * block_size, n_tok, m[h], l[h],
                                   acc.data() + h * d, d, mul, pb.data() + h * p_stride);
            }
            block_values_bf16(acc.data(), d, vbase, vts, vrw, n_tok, nkh, group, pb.data(),
                              p_stride);
            continue;
          }
        }
#endif
        // Online softmax: rescale what was accumulated when the running max grows.
        for (int64_t h = 0; h < nh; ++h) {
          float* sh = s.data() + h * block_size;
          const float mx = max_block(sh, n_tok, m[h]);
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
#if defined(CARPOOL_GROUPED)
        if constexpr (kGroupable) {
          if (grouped) {
            if constexpr (kInt8) {
              // The V row scales join the softmax weights (the sum l is taken already).
              for (int64_t h = 0; h < nh; ++h) {
                const float* sv = vs.data() + (h / group) * block_size;
                float* ph = s.data() + h * block_size;
                for (int64_t t = 0; t < n_tok; ++t) ph[t] *= sv[t];
              }
            }
            with_lanes(wide, [&](auto l) {
              block_values_split<decltype(l)>(acc.data(), d, vbase, vts, vrw, n_tok, nkh, group,
                                              s.data(), block_size);
            });
            continue;
          }
        }
#endif
        for (int64_t h = 0; h < nh; ++h) {
          const float* ph = s.data() + h * block_size;
          if constexpr (kInt8) {
            // sum_t p_t (scale_t v_t) = sum_t (p_t scale_t) v_t: the V scale joins the weight.
            const float* sv = vs.data() + (h / group) * block_size;
            for (int64_t t = 0; t < n_tok; ++t) pw[t] = ph[t] * sv[t];
            ph = pw.data();
          }
          head_values(acc.data() + h * d, vbase + (h / group) * vrw, vts, n_tok, ph, d);
        }
      }
      const bool alone = seq_work[b + 1] - seq_work[b] == 1;
      for (int64_t h = 0; h < nh; ++h) {
        float lsum = l[h];
#if defined(CARPOOL_INT8_ATTENTION)
        if (vnni) lsum = lane_sum16(lv.data() + h * 16);
#endif
        if (alone) {
          finish(acc.data() + h * d, lsum, out + (b * heads + h0 + h) * d);
          continue;
        }
        float* pr = part + (w * heads + h0 + h) * part_row;
        std::copy(acc.begin() + h * d, acc.begin() + (h + 1) * d, pr);
        pr[d] = m[h];
        pr[d + 1] = lsum;
      }
      // This thread computed every chunk of the (sequence, run) (alone: its only one), one
      // after another.
      const bool all_here = w + 1 == seq_work[b + 1] && seq_work[b] * runs + run >= begin;
      if (all_here && !alone) {
        for (int64_t h = 0; h < nh; ++h) merge(b, h0 + h, acc.data());
      }
      if (all_here && !done.empty()) done[q_id] = 1;
    }
  };
  carpool_kernels::run_shared_ranges(bounds, compute);
  if (std::all_of(done.begin(), done.end(), [](char c) { return c != 0; })) return;
  at::parallel_for(0, batch * heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> a(d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads, h = item % heads;
      if (!done[b * runs + h / (run_heads * group)]) {
        merge(b, h, a.data());
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
  } else if (kv_cache.scalar_type() != q.scalar_type()) {
    // Float32 queries over a float32 model's bfloat16 cache: the one mixed case the caller
    // admits (T is float here).
    decode_kernel<float, c10::BFloat16>(
        q.data_ptr<float>(), q.stride(0), kv_cache.data_ptr<c10::BFloat16>(),
        tables.data_ptr<int64_t>(), max_blocks, lens.data_ptr<int64_t>(), out.data_ptr<float>(),
        batch, heads, kv_heads, d, block_size, sc);
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
  TORCH_CHECK(int8 || query.scalar_type() == kv_cache.scalar_type() ||
                  (query.scalar_type() == at::kFloat && kv_cache.scalar_type() == at::kBFloat16),
              "query and cache dtypes differ (a bfloat16 cache takes float32 or bfloat16 "
              "queries, an int8 cache either, any other cache its own dtype)");
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  const int64_t batch = query.size(0), heads = query.size(1), d = query.size(2);
  const int64_t kv_heads = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == d + (int8 ? 4 : 0),
              "head_dim of query and cache differ (an int8 cache row is head_dim + 4 bytes)");
  TORCH_CHECK(!int8 || d % 4 == 0, "an int8 cache needs head_dim a multiple of 4, got ", d);
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

// Tokens a thread at least in the KV stores (store_rows, store_pairs). A decode step's tokens
// (one a sequence, each in a block of its own whose lines are cold) write a word into each of
// many lines and wait on their fills, which overlap across threads: 8-32 tokens x 3-8 kv heads,
// lines cold, 1.2-1.9x faster on two threads than on one (issue 11, thirty-fifth pass; the next
// token's lines asked for ahead gained nothing on one). Fewer than 4 a thread: a fork (~1 us)
// for little; a prompt's tokens share their blocks' lines.
constexpr int64_t kStoreGrain = 4;

// Quantize rows of `src` ([T, 2, K, D], float32 or bfloat16, rows of any stride) into the
// int8 cache slots `slots` ([T] int64, block * bs + offset) of `cache` ([N, bs, 2, K, D + 4]
// int8, kv_quant.py's block layout): per (token, K/V, head) row, scale = amax / 127,
// q = round(x * (127 / amax)) (half to even, as torch.round); an all-zero row gets scale 0 and
// zeros. The same arithmetic as `carpool.model.kv_quant.quantize` (torch ops), and the same
// places as `kv_quant.store`, so both write identical bytes. K values go word by word to their
// word-major places, V values as a row; each scale to its token's place after them.
template <typename T>
void store_rows(const T* src, int64_t src_stride, int8_t* cache, const int64_t* slots,
                int64_t tokens, int64_t kvh, int64_t d, int64_t bs) {
  const int64_t row = d + 4;
  const int64_t region = 2 * bs * row;  // one kv head's bytes in a block
  // K's words land in d / 4 lines a kv head: kStoreGrain.
  at::parallel_for(0, tokens, kStoreGrain, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(d);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = slots[t] / bs, slot = slots[t] % bs;
      for (int64_t r = 0; r < 2 * kvh; ++r) {
        const T* x = src + t * src_stride + r * d;
        const bool is_v = r >= kvh;
        int8_t* hb = cache + (block * kvh + r % kvh) * region + (is_v ? bs * row : 0);
        // V rows land in place; K values go through q to their words.
        int8_t* dst = is_v ? hb + slot * d : q.data();
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
          const __m128i b = _mm512_cvtepi32_epi8(v);
          if (is_v) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), b);
            continue;
          }
          // K: the 4 words straight from the register to their places (through q, each 4-byte
          // reload of the 16-byte store missed store forwarding: 3.6x slower at 512 tokens).
          int8_t* kw = hb + (i / 4 * bs + slot) * 4;
          const int32_t w[4] = {_mm_extract_epi32(b, 0), _mm_extract_epi32(b, 1),
                                _mm_extract_epi32(b, 2), _mm_extract_epi32(b, 3)};
          for (int e = 0; e < 4; ++e) std::memcpy(kw + e * bs * 4, w + e, 4);
        }
#endif
        const int64_t i0 = i;  // where the scalar tail starts
        for (; i < d; ++i) {
          const float v = std::nearbyint(to_float(x[i]) * inv);
          dst[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
        }
        if (!is_v) {  // K values the vector loop above did not place
          for (int64_t w = i0 / 4; w < d / 4; ++w) {
            std::memcpy(hb + (w * bs + slot) * 4, q.data() + 4 * w, 4);
          }
        }
        std::memcpy(hb + d * bs + slot * 4, &s, sizeof(s));
      }
    }
  });
}

// The argument checks both cache writers share: src [T, 2, K, D], a contiguous cache
// [N, S, 2, K, D + extra] (extra: 4 scale bytes for int8), slots [T] int64 inside the cache.
// Returns src with each token's [2, K, D] contiguous (a row of the fused qkv output is; rows
// may be strided) and the slots contiguous.
std::pair<at::Tensor, at::Tensor> checked_store_args(const at::Tensor& src,
                                                     const at::Tensor& cache,
                                                     const at::Tensor& slots, int64_t extra) {
  TORCH_CHECK(src.dim() == 4 && src.size(1) == 2, "src must be [T, 2, K, D]");
  TORCH_CHECK(cache.dim() == 5 && cache.is_contiguous(),
              "cache must be a contiguous [N, S, 2, K, D", extra ? " + 4]" : "]");
  const int64_t tokens = src.size(0), kvh = src.size(2), d = src.size(3);
  TORCH_CHECK(cache.size(2) == 2 && cache.size(3) == kvh && cache.size(4) == d + extra,
              "cache rows must be [2, K, D", extra ? " + 4" : "", "] for src rows [2, K, D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == tokens,
              "slots must be [T] int64");
  const bool packed = src.stride(3) == 1 && src.stride(2) == d && src.stride(1) == kvh * d;
  at::Tensor sl = slots.contiguous();
  const int64_t capacity = cache.size(0) * cache.size(1);
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "slot ", sp[t], " outside the cache");
  }
  return {packed ? src : src.contiguous(), sl};
}

void kv_store_int8(const at::Tensor& src,    // [T, 2, K, D]
                   at::Tensor cache,         // [N, S, 2, K, D + 4] int8
                   const at::Tensor& slots)  // [T] int64: block * S + offset
{
  TORCH_CHECK(cache.scalar_type() == at::kChar, "kv_store_int8: the cache must be int8");
  const auto [x, sl] = checked_store_args(src, cache, slots, 4);
  const int64_t tokens = src.size(0), kvh = src.size(2), d = src.size(3);
  TORCH_CHECK(d % 4 == 0, "an int8 cache needs head_dim a multiple of 4, got ", d);
  const int64_t* sp = sl.data_ptr<int64_t>();
  if (x.scalar_type() == at::kFloat) {
    store_rows<float>(x.data_ptr<float>(), x.stride(0), cache.data_ptr<int8_t>(), sp, tokens,
                      kvh, d, cache.size(1));
  } else if (x.scalar_type() == at::kBFloat16) {
    store_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), x.stride(0),
                              cache.data_ptr<int8_t>(), sp, tokens, kvh, d, cache.size(1));
  } else {
    TORCH_CHECK(false, "kv_store_int8: float32 or bfloat16 only, got ", x.scalar_type());
  }
}

// Rows of `src` ([T, 2, K, D], T = float or bfloat16) into the bfloat16 cache slots `slots` of
// `cache` ([N, bs, 2, K, D], kv_layout.py's block layout): per token and kv head, K's pairs to
// their pair-major places, V's row in place; float32 values rounded to nearest even, as
// Tensor.to(torch.bfloat16). The same places as `kv_layout.store`.
template <typename T>
void store_pairs(const T* src, int64_t src_stride, c10::BFloat16* cache, const int64_t* slots,
                 int64_t tokens, int64_t kvh, int64_t d, int64_t bs) {
  const int64_t region = 2 * bs * d;  // one kv head's values in a block
  // Token t's K pairs land in d / 2 lines of each kv head's region (a 4-byte word in each), its
  // V row in one or two: kStoreGrain.
  at::parallel_for(0, tokens, kStoreGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = slots[t] / bs, slot = slots[t] % bs;
      for (int64_t k = 0; k < kvh; ++k) {
        c10::BFloat16* hb = cache + (block * kvh + k) * region;
        const T* kx = src + t * src_stride + k * d;
        const T* vx = src + t * src_stride + (kvh + k) * d;
        for (int64_t p = 0; p < d / 2; ++p) {
          c10::BFloat16* kp = hb + (p * bs + slot) * 2;
          kp[0] = c10::BFloat16(kx[2 * p]);
          kp[1] = c10::BFloat16(kx[2 * p + 1]);
        }
        c10::BFloat16* vd = hb + bs * d + slot * d;
        if constexpr (std::is_same<T, c10::BFloat16>::value) {
          std::memcpy(vd, vx, d * sizeof(T));
        } else {
          for (int64_t i = 0; i < d; ++i) vd[i] = c10::BFloat16(vx[i]);
        }
      }
    }
  });
}

// Copy rows of `src` ([T, 2, K, D], rows of any stride, each token's [2, K, D] contiguous) into
// the float32 or bfloat16 cache slots `slots` ([T] int64) of `cache` ([N, S, 2, K, D]): into a
// float32 cache a token's K and V in one copy; into a bfloat16 one in its block layout
// (store_pairs). Float32 rows into a bfloat16 cache are rounded to nearest even, as
// Tensor.to(torch.bfloat16). index_copy_ took 16 us for a decode step's 32 tokens (its
// TensorIterator set-up), ~1% of a medium batch-32 step over 16 layers; this is a loop of
// memcpy.
void kv_store(const at::Tensor& src, at::Tensor cache, const at::Tensor& slots) {
  const auto st = src.scalar_type(), ct = cache.scalar_type();
  TORCH_CHECK((st == ct && (ct == at::kFloat || ct == at::kBFloat16)) ||
                  (st == at::kFloat && ct == at::kBFloat16),
              "kv_store: float32 or bfloat16 rows into a cache of their dtype, or float32 into "
              "bfloat16; got ", st, " into ", ct);
  const auto [x, sl] = checked_store_args(src, cache, slots, 0);
  const int64_t tokens = src.size(0);
  const int64_t* sp = sl.data_ptr<int64_t>();
  if (ct == at::kBFloat16) {
    const int64_t kvh = src.size(2), d = src.size(3), bs = cache.size(1);
    TORCH_CHECK(d % 2 == 0, "a bfloat16 cache needs an even head_dim, got ", d);
    c10::BFloat16* cs = cache.data_ptr<c10::BFloat16>();
    if (st == at::kFloat) {
      store_pairs<float>(x.data_ptr<float>(), x.stride(0), cs, sp, tokens, kvh, d, bs);
    } else {
      store_pairs<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), x.stride(0), cs, sp, tokens, kvh,
                                 d, bs);
    }
    return;
  }
  // A float32 cache (the dtype check above leaves no other): a token's row in one copy.
  const int64_t bytes = 2 * src.size(2) * src.size(3) * static_cast<int64_t>(x.element_size());
  const char* xs = static_cast<const char*>(x.data_ptr());
  char* cs = static_cast<char*>(cache.data_ptr());
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(cs + sp[t] * bytes, xs + t * x.stride(0) * x.element_size(), bytes);
  }
}

// Blocks `block_ids` ([B] int64) of the bfloat16 cache `cache` ([N, S, 2, K, D], kv_layout.py's
// block layout) as rows into `out` ([B, S, 2, K, D], float32 or bfloat16, contiguous): the
// gather path's index_select and kv_layout.rows_of_blocks in one pass, the same values (a
// bfloat16 value widened exactly). Why: rows_of_blocks' strided copy of the pair-major keys
// (pairs of 2 values) took 280 us a layer for a 512-token prompt's blocks of SmolLM2 (3 kv
// heads of 64), 8 ms of its 246 ms step on the AMX Xeon (issue 11, forty-first pass).
template <typename T>
void gather_pair_rows(const c10::BFloat16* cache, const int64_t* ids, T* out, int64_t nb,
                      int64_t bs, int64_t kvh, int64_t d) {
  const int64_t region = 2 * bs * d;  // one kv head's values in a block
  at::parallel_for(0, nb * kvh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / kvh, k = i % kvh;
      const c10::BFloat16* hb = cache + (ids[b] * kvh + k) * region;  // its 4 KiB in L1
      T* ob = out + b * bs * 2 * kvh * d;  // block b's rows: [S][2][K][D]
      for (int64_t s = 0; s < bs; ++s) {
        T* kr = ob + (s * 2 * kvh + k) * d;
        T* vr = ob + (s * 2 * kvh + kvh + k) * d;
        for (int64_t p = 0; p < d / 2; ++p) {
          const c10::BFloat16* kp = hb + (p * bs + s) * 2;
          kr[2 * p] = static_cast<T>(kp[0]);
          kr[2 * p + 1] = static_cast<T>(kp[1]);
        }
        const c10::BFloat16* v = hb + bs * d + s * d;
        for (int64_t j = 0; j < d; ++j) vr[j] = static_cast<T>(v[j]);
      }
    }
  });
}

void kv_gather_rows(const at::Tensor& cache, const at::Tensor& block_ids, at::Tensor out) {
  TORCH_CHECK(cache.dim() == 5 && cache.size(2) == 2 && cache.scalar_type() == at::kBFloat16 &&
                  cache.is_contiguous(),
              "kv_gather_rows: the cache must be a contiguous [N, S, 2, K, D] bfloat16 tensor, got ",
              cache.sizes(), " ", cache.scalar_type());
  TORCH_CHECK(block_ids.dim() == 1 && block_ids.scalar_type() == at::kLong,
              "kv_gather_rows: block_ids must be a [B] int64 tensor, got ", block_ids.sizes(), " ",
              block_ids.scalar_type());
  const int64_t nb = block_ids.size(0), n = cache.size(0), bs = cache.size(1),
                kvh = cache.size(3), d = cache.size(4);
  TORCH_CHECK(d % 2 == 0, "kv_gather_rows: a bfloat16 cache needs an even head_dim, got ", d);
  TORCH_CHECK(out.is_contiguous() && out.dim() == 5 && out.size(0) == nb &&
                  out.size(1) == bs && out.size(2) == 2 && out.size(3) == kvh &&
                  out.size(4) == d &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "kv_gather_rows: out must be a contiguous [", nb, ", ", bs, ", 2, ", kvh, ", ", d,
              "] float32 or bfloat16 tensor, got ", out.sizes(), " ", out.scalar_type());
  const at::Tensor ids = block_ids.contiguous();
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < nb; ++b)
    TORCH_CHECK(ip[b] >= 0 && ip[b] < n, "kv_gather_rows: block id ", ip[b], " outside [0, ", n,
                ")");
  const c10::BFloat16* cp = cache.data_ptr<c10::BFloat16>();
  if (out.scalar_type() == at::kFloat) {
    gather_pair_rows<float>(cp, ip, out.data_ptr<float>(), nb, bs, kvh, d);
  } else {
    gather_pair_rows<c10::BFloat16>(cp, ip, out.data_ptr<c10::BFloat16>(), nb, bs, kvh, d);
  }
}

}  // namespace

TORCH_LIBRARY(carpool, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor kv_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
  m.def("kv_store_int8(Tensor src, Tensor(a!) cache, Tensor slots) -> ()");
  m.def("kv_store(Tensor src, Tensor(a!) cache, Tensor slots) -> ()");
  m.def("kv_gather_rows(Tensor cache, Tensor block_ids, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(carpool, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("kv_store_int8", &kv_store_int8);
  m.impl("kv_store", &kv_store);
  m.impl("kv_gather_rows", &kv_gather_rows);
}
