"""``csrc/shared_ranges.h``: the threads' ranges of items, each taken item by item, a thread
done with its own range taking what is left of the others'.

The kernels that split their work this way (the paged attention kernel, the int4 and int8
products) are checked for their numbers at several thread counts in their own tests; here a
small probe built against the header shows what those cannot force: every item is taken
exactly once, a thread held up at its first item has the rest of its range taken by the
others, and one thread alone takes every range in order.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from carpool.model import kernel_build

pytestmark = pytest.mark.slow

PROBE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "shared_ranges.h"

namespace {
// Row 0: how many times each item was taken; row 1: the range of the thread that took it
// (the thread's own first range). The thread of range 0 sleeps sleep_ms at its first item.
at::Tensor trace(int64_t count, int64_t ranges, int64_t sleep_ms) {
  at::Tensor out = at::zeros({2, count}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  std::unique_ptr<std::atomic<int64_t>[]> taken(new std::atomic<int64_t>[count]);
  for (int64_t i = 0; i < count; ++i) taken[i].store(0);
  const auto bounds = carpool_kernels::equal_ranges(count, ranges);
  carpool_kernels::run_shared_ranges(bounds, [&](carpool_kernels::RangeTaker& taker) {
    int64_t own = -1;
    for (int64_t i, end; taker.take(i, end);) {
      if (own < 0) {
        own = 0;
        while (i >= bounds[own + 1]) ++own;
        if (own == 0 && sleep_ms > 0)
          std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
      }
      taken[i].fetch_add(1);
      o[count + i] = own;
    }
  });
  for (int64_t i = 0; i < count; ++i) o[i] = taken[i].load();
  return out;
}
}  // namespace

TORCH_LIBRARY(carpool, m) { m.def("trace", &trace); }
"""


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory):
    csrc = tmp_path_factory.mktemp("shared_ranges")
    shutil.copy(Path(kernel_build.CSRC) / "shared_ranges.h", csrc)
    (csrc / "probe.cpp").write_text(PROBE)
    kernel_build.build_as(csrc, "probe.cpp", "shared_ranges_probe")
    return torch.ops.shared_ranges_probe.trace


def with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("count,ranges", [(1, 1), (7, 2), (64, 2), (1000, 2), (9, 5)])
def test_every_item_is_taken_once(trace, count, ranges):
    # Ranges beyond the pool's threads (5 on 2): the takers visit every range all the same.
    counts, _ = with_threads(2, lambda: trace(count, ranges, 0))
    assert counts.tolist() == [1] * count


def test_a_held_up_thread_has_its_range_taken_by_the_others(trace):
    counts, owner = with_threads(2, lambda: trace(200, 2, 200))
    assert counts.tolist() == [1] * 200
    # The held-up thread took one item (none if the other took all before it started); the
    # other did its own 100 and then the rest of range 0 (200 ms is ample for all of them).
    assert (owner == 0).sum().item() <= 1, owner.tolist()
    assert (owner[:100] == 1).sum().item() >= 99, owner.tolist()
    assert (owner[100:] == 1).all(), owner.tolist()


def test_one_thread_takes_every_range_in_order(trace):
    counts, owner = with_threads(1, lambda: trace(50, 2, 0))
    assert counts.tolist() == [1] * 50
    assert (owner == 0).all()
