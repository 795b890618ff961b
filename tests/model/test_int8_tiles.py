"""An int8 weight's rows on AMX tiles (``vnni_linear.linear_int8``: a prompt's rows on an AMX
CPU): up to 16 rows ``amx_int8_rows`` (the codes as they lie in A tiles, the rows in B), past
them the widened block's ``amx_tile_rows``. Both must give the same bits, so that a row's
result does not depend on how many rows share its step.
"""

from __future__ import annotations

import torch

from carpool.model import vnni_linear


def _tiles_here() -> bool:
    # Where vnni_linear has no AMX tiles (a Zen 4, an AVX2 CPU) its matrix-vector loops take
    # every row (their own tests); the few-rows tile kernel is not built there.
    return vnni_linear.load() and vnni_linear.amx()


def test_few_rows_on_tiles_are_the_widened_blocks_bits():
    # amx_int8_rows (1-16 rows) against amx_tile_rows on the same codes widened and packed: the
    # same products added in the same order, the operands' roles swapped. N past a block's 64
    # columns and not (a partial block), K of 3 and 43 steps of 32, bf16 and float32 x.
    if not _tiles_here():
        return
    torch.manual_seed(0)
    for n, k in ((100, 96), (200, 1376)):
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        s = (torch.rand(n) * 0.01 + 1e-4).bfloat16()
        packed = vnni_linear.pack_int8(q)
        for rows in (1, 2, 3, 5, 8, 13, 16, 17, 33):
            for dtype in (torch.float32, torch.bfloat16):
                x = (torch.randn(rows, k) * 3).to(dtype)
                got = vnni_linear.linear_int8(x, q, s)
                assert torch.equal(got, vnni_linear.linear_packed(x, packed, n, s)), (n, rows)
                # ... and each row alone (1 row: the tiles' sums stored straight as a row).
                for r in (0, rows - 1):
                    assert torch.equal(vnni_linear.linear_int8(x[r : r + 1], q, s), got[r : r + 1])


def test_the_scaled_sum_is_rounded_once():
    # The row scale multiplies the float32 sum before its one rounding to bf16 (as int8_dot),
    # not the sum rounded to bf16 and multiplied again: closer to the exact product.
    if not _tiles_here():
        return
    torch.manual_seed(1)
    n, k = 512, 256
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    s = (torch.rand(n) * 0.01 + 1e-4).bfloat16()
    x = torch.randn(16, k).bfloat16()
    got = vnni_linear.linear_int8(x, q, s).double()
    unscaled = vnni_linear.linear_int8(x, q, None)  # the sums rounded to bf16
    twice = (unscaled.float() * s.float()).bfloat16().double()
    exact = x.double() @ (q.double() * s.double()[:, None]).T
    assert not torch.equal(got, twice)
    assert (got - exact).abs().mean() < 0.8 * (twice - exact).abs().mean()
