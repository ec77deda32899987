"""The AdaHessian update kernels of soulkit.kernels.adahessian: the foreach path against the
per-tensor reference, and input validation (moved unchanged from tests/optim/test_adahessian.py)."""

from __future__ import annotations

import pytest
import torch

from soulkit.kernels import adahessian_step
from soulkit.kernels.adahessian import adahessian_step_foreach, adahessian_step_reference

DT = torch.float64


SHAPES = [(1,), (13,), (3, 5), (4, 3, 3, 3)]


def kernel_inputs(seed, dtype=DT, state_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    sdt = state_dtype or dtype

    def r(s, dt, pos=False):
        t = torch.randn(s, generator=gen, dtype=torch.float64)
        return (t.abs() if pos else t).to(dt)

    return dict(
        params=[r(s, dtype) for s in SHAPES],
        grads=[r(s, dtype) for s in SHAPES],
        exp_avgs=[r(s, sdt) for s in SHAPES],
        exp_hessian_diag_sqs=[r(s, sdt, pos=True) for s in SHAPES],
        hessian_diags=[r(s, sdt) for s in SHAPES],
    )


@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=0.15, beta1=0.9, beta2=0.999, eps=1e-4),
        dict(lr=0.03, beta1=0.5, beta2=0.9, eps=1e-2, weight_decay=0.1, hessian_power=0.5, maximize=True),
        dict(lr=0.1, beta1=0.0, beta2=0.0, eps=1e-8, hessian_power=0.0),
    ],
)
def test_foreach_kernel_matches_reference_float64(hyper):
    a = kernel_inputs(0)
    b = {k: [t.clone() for t in v] for k, v in a.items()}
    steps = [1, 2, 5, 40]
    for s in range(4):
        new_d = kernel_inputs(100 + s)
        for x in (a, b):  # fresh gradients and estimates each step
            for j in range(len(SHAPES)):
                x["grads"][j].copy_(new_d["grads"][j])
                x["hessian_diags"][j].copy_(new_d["hessian_diags"][j])
        t = [k + s for k in steps]
        adahessian_step_reference(*a.values(), t, **hyper)
        adahessian_step_foreach(*b.values(), t, **hyper)
    for key in ("params", "exp_avgs", "exp_hessian_diag_sqs"):
        for x, y in zip(a[key], b[key]):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_foreach_kernel_matches_reference_bf16_params_float32_state():
    a = kernel_inputs(3, dtype=torch.bfloat16, state_dtype=torch.float32)
    b = {k: [t.clone() for t in v] for k, v in a.items()}
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.01)
    adahessian_step(*a.values(), [1, 1, 2, 3], implementation="reference", **hyper)
    adahessian_step(*b.values(), [1, 1, 2, 3], implementation="foreach", **hyper)
    for key in ("params", "exp_avgs", "exp_hessian_diag_sqs"):
        for x, y in zip(a[key], b[key]):
            assert x.dtype == y.dtype
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_kernel_input_validation_and_dispatch():
    a = kernel_inputs(0)
    a["hessian_diags"][2] = torch.zeros(5, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"hessian_diags\[2\]"):
        adahessian_step_foreach(*a.values(), [1] * 4, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-4)
    with pytest.raises(ValueError, match="implementation"):
        adahessian_step(
            *kernel_inputs(0).values(),
            [1] * 4,
            implementation="magic",
            lr=0.1,
            beta1=0.9,
            beta2=0.99,
            eps=1e-4,
        )
    with pytest.raises(ValueError, match="steps"):
        adahessian_step_reference(
            *kernel_inputs(0).values(), [0] * 4, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-4
        )
