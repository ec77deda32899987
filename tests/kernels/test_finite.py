"""soulkit.kernels.finite: the first tensor holding a NaN or an infinity is found, with its position,
in small tensors (one foreach norm for all) and large ones (>= 32768 elements, a sum each), in every
floating dtype; huge finite values that overflow the fast test's sum or squares are not reported."""

from __future__ import annotations

import pytest
import torch

from soulkit.kernels import finite
from soulkit.kernels.finite import all_finite, first_nonfinite

SMALL, LARGE = 1000, 40_000  # below and above the small/large boundary
BAD = [float("nan"), float("inf"), float("-inf")]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def test_the_sizes_straddle_the_boundary():
    assert SMALL < finite._SMALL <= LARGE and finite._SMALL == 32768


def _tensors(sizes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype) for n in sizes]


def test_empty_list_and_finite_tensors():
    assert first_nonfinite([]) is None and all_finite([])
    ts = _tensors([SMALL, LARGE, 1, SMALL]) + [torch.zeros(0), torch.tensor(3.0), torch.zeros(2, 3, 4)]
    assert first_nonfinite(ts) is None and all_finite(ts)


@pytest.mark.parametrize("bad", BAD, ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("n", [SMALL, LARGE, finite._SMALL, 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_bad_value_is_found_with_its_index(bad, n, dtype):
    ts = _tensors([SMALL, LARGE, n, 7], dtype)
    where = n // 2
    ts[2][where] = bad
    assert first_nonfinite(ts) == 2 and not all_finite(ts)
    assert first_nonfinite(ts[2:]) == 0
    assert first_nonfinite(ts[:2] + ts[3:]) is None  # the others are finite


@pytest.mark.parametrize("sizes, bad_at, first", [
    ([LARGE, SMALL, LARGE, SMALL], [2, 3], 2),  # large before small
    ([SMALL, LARGE, SMALL, LARGE], [2, 3], 2),  # small before large
    ([SMALL, LARGE, SMALL, LARGE], [3, 0], 0),
    ([LARGE, LARGE, SMALL, SMALL, LARGE], [4, 3, 1], 1),
])
def test_several_bad_tensors_report_the_first(sizes, bad_at, first):
    # small and large tensors are tested in two batches; the answer is still the first position
    ts = _tensors(sizes)
    for k, i in enumerate(bad_at):
        ts[i][-1 - k] = BAD[k % 3]
    assert first_nonfinite(ts) == first


@pytest.mark.parametrize("dtype, huge, n", [
    (torch.float32, 3e38, SMALL), (torch.float32, 3e38, LARGE),
    (torch.bfloat16, 3e38, SMALL), (torch.bfloat16, 3e38, LARGE),
    (torch.float16, 6e4, SMALL),  # a large fp16 tensor is summed in fp32, which does not overflow
    (torch.float64, 1e308, SMALL), (torch.float64, 1e308, LARGE),
])
def test_huge_finite_values_that_overflow_the_fast_test_are_not_reported(dtype, huge, n):
    t = torch.full((n,), huge, dtype=dtype)
    assert torch.isfinite(t).all()
    # the fast test (a sum of the large tensor, a 2-norm of the small ones) overflows here...
    assert not bool(finite._fast_flags([t])[0])
    # ...and the element-wise confirmation clears it
    assert first_nonfinite([t]) is None and all_finite([t])
    # a bad tensor after it is still found, and only it
    bad = torch.ones(5, dtype=dtype)
    bad[2] = float("nan")
    assert first_nonfinite([t, torch.ones(3, dtype=dtype), bad]) == 2


def test_opposite_infinities_in_one_large_tensor():
    t = torch.zeros(LARGE)
    t[0], t[-1] = float("inf"), float("-inf")  # the sum is NaN, not inf: still caught
    assert first_nonfinite([torch.zeros(3), t]) == 1


def test_views_and_shapes():
    base = torch.zeros(300, 300)
    base[7, 200] = float("nan")
    view = base.t()[::2]  # non-contiguous, large (150 x 300); its row 100 is base's column 200
    assert not view.is_contiguous() and view.numel() >= finite._SMALL and view[100, 7].isnan()
    assert first_nonfinite([torch.zeros(4, 4), view]) == 1
    assert first_nonfinite([torch.zeros(4, 4), base.t()[1::2]]) is None  # the odd columns: no NaN
    assert first_nonfinite([base[:, :100]]) is None  # the NaN sits outside this view
    assert first_nonfinite([base[:10].view(10, 30, 10)]) == 0


def test_float64_precision_is_kept():
    # values above float32's range must not overflow to inf in a float32 reduction
    t = torch.full((LARGE,), 1e300, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(LARGE // 2).double()
    assert first_nonfinite([t]) is None
    assert bool(finite._fast_flags([t])[0]), "a float64 sum of +-1e300 is finite: no confirmation needed"
