"""The Triton AdaHessian kernel against the per-tensor reference (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from soulkit.kernels._triton_tables import BLOCK, HAS_TRITON, triton_usable
from soulkit.kernels.adahessian import adahessian_step_reference
from soulkit.kernels.adahessian_triton import adahessian_step_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not (HAS_TRITON and triton_usable(DEVICE)), reason="triton not usable here")

SIZES = [1, 13, BLOCK - 1, BLOCK + 1]
CASES = [
    (torch.float32, torch.float32, 2e-6),
    (torch.float64, torch.float64, 1e-6),  # scalars reach the kernel as fp32
    (torch.bfloat16, torch.float32, 1e-2),
    (torch.float16, torch.float32, 2e-3),
]


def _inputs(pdt, sdt, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda scale=1.0, pos=False: [  # noqa: E731
        ((torch.rand(n, generator=gen, dtype=torch.float64) if pos else torch.randn(n, generator=gen, dtype=torch.float64)) * scale)
        for n in SIZES
    ]
    return (
        [t.to(DEVICE, pdt) for t in r()],
        [t.to(DEVICE, pdt) for t in r()],
        [t.to(DEVICE, sdt) for t in r(0.1)],
        [t.to(DEVICE, sdt) for t in r(0.5, pos=True)],
        [t.to(DEVICE, sdt) for t in r(2.0)],
    )


@pytest.mark.parametrize("pdt, sdt, tol", CASES)
@pytest.mark.parametrize("hessian_power", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("maximize", [False, True])
def test_triton_matches_reference(pdt, sdt, tol, hessian_power, maximize):
    p, g, m, v, d = _inputs(pdt, sdt, seed=2)
    ref = [[t.clone() for t in lst] for lst in (p, m, v)]
    out = [[t.clone() for t in lst] for lst in (p, m, v)]
    steps = [1, 2, 5, 40]
    kw = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.01, hessian_power=hessian_power,
              maximize=maximize)
    adahessian_step_reference(ref[0], g, ref[1], ref[2], d, steps, **kw)
    adahessian_step_triton(out[0], g, out[1], out[2], d, steps, **kw)
    for a_list, b_list in zip(ref, out):
        for a, b in zip(a_list, b_list):
            assert a.dtype == b.dtype
            torch.testing.assert_close(b.double(), a.double(), rtol=tol, atol=tol)


def test_bad_inputs_raise_before_launch():
    p, g, m, v, d = _inputs(torch.float32, torch.float32, seed=0)
    before = [t.clone() for t in p]
    nc = torch.zeros(SIZES[2], 2, device=DEVICE)[:, 0]
    with pytest.raises(ValueError, match=r"grads\[2\] is not contiguous"):
        adahessian_step_triton(p, g[:2] + [nc] + g[3:], m, v, d, [1] * 4, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-4)
    with pytest.raises(ValueError, match="steps has 3"):
        adahessian_step_triton(p, g, m, v, d, [1] * 3, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(p, before))
