// carpool's CPU allocator: large blocks are mappings of their own, kept by size class and handed
// out again; smaller requests go on to the allocator installed before (torch's default).
//
// Why: a prefill step allocates and frees the same large tensors layer after layer (a
// 512-token step of SmolLM2-135M: activations of 0.5-3 MiB, int4 weights widened to bf16, a
// GEMM's packing buffers). glibc serves them from its heap once its adaptive mmap threshold has
// risen past their sizes; the heap fragments, and the process's peak resident size varied by
// 10 MiB from run to run (472-482 MiB). Fixing glibc's mmap threshold keeps them off the heap
// but maps and faults every block anew (prefill 1.45x slower; BENCHMARKS.md, issue 11's seventh
// pass). Here a request of at least `g_min_bytes` is rounded up to a size class (at most 1/8 over
// it) and served from that class's free list, or else from a fresh anonymous mapping; a freed
// block goes back on its list. A layer thus reuses the blocks the layer before it freed, already
// faulted in (SmolLM2's prefill steps 1.07-1.22x faster, decode unchanged, the peak steady at
// 472 MiB; sixteenth pass). `release` unmaps the lists; carpool calls it wherever it trims
// glibc's heap (after a load, the weights' move, a prefill step: `pages.trim_heap`).
// `end_step`, after every step, unmaps the blocks no request has taken for a few steps (sizes
// that did not come again); past `kMaxCachedBytes` in the lists a freed block is unmapped at
// once.
//
// `install` puts it in front of the current CPU allocator (c10::SetCPUAllocator, at a priority
// above the default registration's): every CPU tensor allocated afterwards asks it first.
// Tensors allocated before keep their own deleters. Thread-safe: one mutex (a few dozen large
// allocations per layer of a step; small ones never take it).

#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr size_t kPage = 4096;
// Free blocks kept at most: a large model's prefill step frees tens of MB a layer (Llama-3 8B,
// 512 tokens: 29 MiB per MLP activation), and the lists are emptied at every trim anyway.
constexpr int64_t kMaxCachedBytes = int64_t(256) << 20;
// Requests below this go to the previous allocator (glibc's bins serve them well). Settable:
// `set_min_bytes` with a huge value turns the block path off (A/B runs in one process).
std::atomic<size_t> g_min_bytes{256 << 10};

// The request rounded up to a multiple of an eighth of its largest power of two (and of a
// page): sizes within 1/8 of each other share a class, and so share blocks.
size_t size_class(size_t n) {
  size_t top = size_t(1) << (63 - __builtin_clzll(n));
  size_t grain = std::max(top / 8, kPage);
  return (n + grain - 1) / grain * grain;
}

class BlockAllocator final : public c10::Allocator {
 public:
  explicit BlockAllocator(c10::Allocator* next) : next_(next), next_raw_(next->raw_deleter()) {
    TORCH_CHECK(next_raw_ != nullptr, "carpool CPU allocator: the current one has no raw deleter");
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < g_min_bytes.load(std::memory_order_relaxed)) {
      return next_->allocate(n);
    }
    size_t bytes = size_class(n);
    void* p = take(bytes);
    if (p == nullptr) {
      p = map(bytes);
    }
    report(p, int64_t(bytes));
    return {p, p, &BlockAllocator::free_any, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    // raw_allocate / raw_deallocate (oneDNN's scratch buffers, for one) free whatever this
    // gave out through one function, which hands the previous allocator's pointers back to it.
    return &BlockAllocator::free_any;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  static void free_any(void* p);

  void give_back(void* p) {
    size_t bytes;
    bool keep;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = sizes_.find(p);
      if (it == sizes_.end()) {
        // Not one of our blocks: a small request of the previous allocator, freed through
        // raw_deallocate (its DataPtrs otherwise carry that allocator's own deleter).
        next_raw_(p);
        return;
      }
      bytes = it->second;
      keep = cached_ + int64_t(bytes) <= kMaxCachedBytes;
      if (keep) {
        free_[bytes].push_back({p, step_});
        cached_ += int64_t(bytes);
      } else {
        sizes_.erase(it);
        mapped_ -= int64_t(bytes);
      }
    }
    report(p, -int64_t(bytes));
    if (!keep) {
      munmap(p, bytes);
    }
  }

  int64_t release() {
    std::vector<std::pair<void*, size_t>> gone;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& [bytes, list] : free_) {
        for (const Free& f : list) {
          gone.emplace_back(f.p, bytes);
          sizes_.erase(f.p);
        }
      }
      free_.clear();
      mapped_ -= cached_;
      cached_ = 0;
    }
    return unmap(gone);
  }

  // One step ended: unmap the free blocks no request has taken for `max_idle` whole steps
  // (sizes of a step that did not come again: another prompt length, a batch that shrank).
  // A decode step reuses the blocks the step before it freed, so those stay.
  int64_t end_step(int64_t max_idle) {
    std::vector<std::pair<void*, size_t>> gone;
    {
      std::lock_guard<std::mutex> g(mu_);
      step_ += 1;
      for (auto it = free_.begin(); it != free_.end();) {
        auto& list = it->second;
        // Freed in step order, so the idle ones lead the list (take() pops the newest).
        size_t n = 0;
        while (n < list.size() && list[n].step + max_idle < step_) {
          gone.emplace_back(list[n].p, it->first);
          sizes_.erase(list[n].p);
          n += 1;
        }
        list.erase(list.begin(), list.begin() + n);
        cached_ -= int64_t(n * it->first);
        mapped_ -= int64_t(n * it->first);
        it = list.empty() ? free_.erase(it) : std::next(it);
      }
    }
    return unmap(gone);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {mapped_, cached_, maps_, reuses_};
  }

 private:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = free_.find(bytes);
    if (it == free_.end() || it->second.empty()) {
      return nullptr;
    }
    void* p = it->second.back().p;  // the most recently freed: the likeliest still cached
    it->second.pop_back();
    cached_ -= int64_t(bytes);
    reuses_ += 1;
    return p;
  }

  void* map(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      release();  // what the lists hold may be what is missing
      p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "carpool CPU allocator: cannot map ", bytes, " bytes: ",
                  std::strerror(errno));
    }
    std::lock_guard<std::mutex> g(mu_);
    sizes_[p] = bytes;
    mapped_ += int64_t(bytes);
    maps_ += 1;
    return p;
  }

  // torch.profiler's memory columns (profile_memory=True), as torch's own CPU allocator
  // reports: a block's bytes when handed out and when given back; in use = mapped - free.
  // Called outside the lock (the profiler records on its own).
  void report(void* p, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) {
      return;
    }
    int64_t mapped, in_use;
    {
      std::lock_guard<std::mutex> g(mu_);
      mapped = mapped_;
      in_use = mapped_ - cached_;
    }
    c10::reportMemoryUsageToProfiler(p, delta, size_t(in_use), size_t(mapped),
                                     c10::Device(c10::DeviceType::CPU));
  }

  static int64_t unmap(const std::vector<std::pair<void*, size_t>>& blocks) {
    int64_t total = 0;
    for (auto& [p, bytes] : blocks) {  // outside the lock: munmap takes the kernel's mm lock
      munmap(p, bytes);
      total += int64_t(bytes);
    }
    return total;
  }

  struct Free {
    void* p;
    int64_t step;  // `step_` when it was freed
  };

  c10::Allocator* next_;
  c10::DeleterFnPtr next_raw_;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<Free>> free_;  // size class -> free blocks, oldest first
  std::unordered_map<void*, size_t> sizes_;              // every block mapped -> its bytes
  int64_t mapped_ = 0;       // bytes of blocks mapped, in use or free
  int64_t cached_ = 0;       // bytes of free blocks
  int64_t maps_ = 0;         // blocks mapped
  int64_t reuses_ = 0;       // requests served from a free list
  int64_t step_ = 0;         // steps ended (`end_step`)
};

// Never destroyed: tensors may be freed after every static destructor has run.
BlockAllocator* g_allocator = nullptr;
std::mutex g_install_mu;

void BlockAllocator::free_any(void* p) {
  g_allocator->give_back(p);
}

bool install() {
  std::lock_guard<std::mutex> g(g_install_mu);
  if (g_allocator != nullptr) {
    return false;
  }
  g_allocator = new BlockAllocator(c10::GetCPUAllocator());
  c10::SetCPUAllocator(g_allocator, /*priority=*/1);  // the default registers at 0
  return true;
}

int64_t release() {
  return g_allocator == nullptr ? 0 : g_allocator->release();
}

std::vector<int64_t> stats() {
  return g_allocator == nullptr ? std::vector<int64_t>(4, 0) : g_allocator->stats();
}

int64_t end_step(int64_t max_idle) {
  TORCH_CHECK(max_idle >= 0, "carpool CPU allocator: max_idle must be >= 0, got ", max_idle);
  return g_allocator == nullptr ? 0 : g_allocator->end_step(max_idle);
}

void set_min_bytes(int64_t n) {
  TORCH_CHECK(n > 0, "carpool CPU allocator: min_bytes must be positive, got ", n);
  g_min_bytes.store(size_t(n));
}

int64_t min_bytes() {
  return int64_t(g_min_bytes.load());
}

int64_t size_class_of(int64_t n) {
  TORCH_CHECK(n > 0, "carpool CPU allocator: a size must be positive, got ", n);
  return int64_t(size_class(size_t(n)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(carpool, m) {
  m.def("cpu_allocator_install() -> bool", &install);
  m.def("cpu_allocator_release() -> int", &release);
  m.def("cpu_allocator_end_step(int max_idle) -> int", &end_step);
  m.def("cpu_allocator_stats() -> int[]", &stats);
  m.def("cpu_allocator_set_min_bytes(int n) -> ()", &set_min_bytes);
  m.def("cpu_allocator_min_bytes() -> int", &min_bytes);
  m.def("cpu_allocator_size_class(int n) -> int", &size_class_of);
}
