// Items split into one contiguous range a thread, each range taken item by item through an
// atomic cursor, so that a thread done with its own range takes what is left of the others'.
//
// A parallel region ends when its slowest thread does. With fixed ranges (at::parallel_for's
// split, or a split by cost) a thread that runs slower than the others for a while (another
// process on its core, a vCPU the host takes away, a core at a lower clock) holds every other
// thread at the region's end; on the 2-core VM of issue 11's fifty-fourth pass the same
// prompt-row call measured 0.67-0.74 of two threads' worth in some phases and 0.94-0.99 in
// others. Here each thread still starts on its own range in order (its rows stay in its
// caches, as with a fixed split), and only when it has run out does it take the next items of
// the other ranges, one at a time, from their fronts: the region ends within about an item of
// the last thread's. ggml's matrix products take their chunks from one atomic counter for the
// same reason. Which thread computes an item never changes its numbers.
//
// Header-only, included by each kernel that splits its work this way; the kernel build hashes
// it with each source.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace carpool_kernels {

// A range's next item, alone on its cache line (the owner takes from it at every item; a
// neighbour's cursor on the same line would make each take a transfer between cores).
struct alignas(64) RangeCursor {
  std::atomic<int64_t> next{0};
};

// Hands out the items of a thread's own range first, then those left in the others' (the
// next range on first), each item exactly once over all the threads.
class RangeTaker {
 public:
  RangeTaker(RangeCursor* cursors, const int64_t* bounds, int64_t ranges, int64_t own)
      : cursors_(cursors), bounds_(bounds), ranges_(ranges), at_(own) {}

  // The next item into `item` (and the end of the range it is from into `end`: the items up
  // to it are the ones this thread likely takes next, which a kernel may prefetch for);
  // false when every range is used up.
  bool take(int64_t& item, int64_t& end) {
    while (visited_ < ranges_) {
      const int64_t i = cursors_[at_].next.fetch_add(1, std::memory_order_relaxed);
      if (i < bounds_[at_ + 1]) {
        item = i;
        end = bounds_[at_ + 1];
        return true;
      }
      at_ = at_ + 1 == ranges_ ? 0 : at_ + 1;
      ++visited_;
    }
    return false;
  }

 private:
  RangeCursor* cursors_;
  const int64_t* bounds_;
  int64_t ranges_;
  int64_t at_;
  int64_t visited_ = 0;
};

// Runs body(taker) once on each thread of a parallel region of bounds.size() - 1 threads (at
// most the pool's), thread p's taker starting at range p = [bounds[p], bounds[p + 1]).
// Every item of [bounds.front(), bounds.back()) is taken exactly once; with fewer threads
// than ranges (a nested call runs on the calling thread alone) the takers still visit every
// range. The items' results are visible to the caller when it returns (the region's end).
template <typename Body>
void run_shared_ranges(const std::vector<int64_t>& bounds, const Body& body) {
  const int64_t ranges = static_cast<int64_t>(bounds.size()) - 1;
  if (ranges <= 0 || bounds.front() >= bounds.back()) return;
  std::unique_ptr<RangeCursor[]> cursors(new RangeCursor[ranges]);
  for (int64_t p = 0; p < ranges; ++p) cursors[p].next.store(bounds[p], std::memory_order_relaxed);
  at::parallel_for(0, ranges, 1, [&](int64_t p0, int64_t /*p1*/) {
    RangeTaker taker(cursors.get(), bounds.data(), ranges, p0);
    body(taker);
  });
}

// count items as `ranges` contiguous ranges as even as they divide.
inline std::vector<int64_t> equal_ranges(int64_t count, int64_t ranges) {
  std::vector<int64_t> bounds(ranges + 1);
  for (int64_t p = 0; p <= ranges; ++p) bounds[p] = count * p / ranges;
  return bounds;
}

// run_shared_ranges over count items in as many ranges as the pool has threads (at most
// count), as even as they divide: at::parallel_for(0, count, 1, ...)'s split, shared.
template <typename Body>
void run_shared_items(int64_t count, const Body& body) {
  if (count <= 0) return;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  run_shared_ranges(equal_ranges(count, threads), body);
}

}  // namespace carpool_kernels
