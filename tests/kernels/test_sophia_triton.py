"""The Triton Sophia kernel against the per-tensor reference (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from soulkit.kernels.sophia import sophia_step_reference
from soulkit.kernels.sophia_triton import BLOCK, HAS_TRITON, sophia_step_triton, triton_usable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not (HAS_TRITON and triton_usable(DEVICE)), reason="triton not usable here")

# 1, a prime, a block multiple +- 1; the interpreter is slow, so sizes stay small
SIZES = [1, 13, BLOCK - 1, BLOCK, BLOCK + 1]
CASES = [
    (torch.float32, torch.float32, 2e-6),
    (torch.float64, torch.float64, 1e-6),  # scalars reach the kernel as fp32
    (torch.bfloat16, torch.float32, 1e-2),
    (torch.float16, torch.float32, 2e-3),
    (torch.float32, torch.bfloat16, 1e-2),
]


def _make(pdt, sdt, seed):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda scale=1.0, rand=False: [  # noqa: E731
        ((torch.rand if rand else torch.randn)(n, generator=gen, dtype=torch.float64) * scale) for n in SIZES
    ]
    ps = [t.to(DEVICE, pdt) for t in mk()]
    gs = [t.to(DEVICE, pdt) for t in mk()]
    ms = [t.to(DEVICE, sdt) for t in mk(0.1)]
    hs = [t.to(DEVICE, sdt) for t in mk(1.0, rand=True)]
    es = [t.to(DEVICE, sdt) for t in mk(3.0, rand=True)]
    return ps, gs, ms, hs, es


@pytest.mark.parametrize("pdt, sdt, tol", CASES)
@pytest.mark.parametrize("with_estimate", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_triton_matches_reference(pdt, sdt, tol, with_estimate, maximize):
    ps, gs, ms, hs, es = _make(pdt, sdt, seed=3)
    ref = [[t.clone() for t in lst] for lst in (ps, ms, hs)]
    out = [[t.clone() for t in lst] for lst in (ps, ms, hs)]
    kw = dict(lr=0.03, beta1=0.9, rho=0.5, weight_decay=0.1, eps=1e-12, maximize=maximize,
              bias_correction1=0.5, beta2=0.95, hessian_estimates=es if with_estimate else None)
    w_ref = torch.zeros((), dtype=torch.int64, device=DEVICE)
    w_out = torch.zeros((), dtype=torch.int64, device=DEVICE)
    sophia_step_reference(ref[0], gs, ref[1], ref[2], win_count=w_ref, **kw)
    sophia_step_triton(out[0], gs, out[1], out[2], win_count=w_out, **kw)
    for a_list, b_list in zip(ref, out):
        for a, b in zip(a_list, b_list):
            assert a.dtype == b.dtype
            torch.testing.assert_close(b.double(), a.double(), rtol=tol, atol=tol)
    assert abs(int(w_ref) - int(w_out)) <= (0 if pdt in (torch.float32, torch.float64) and sdt == pdt else 20)


def test_every_element_is_written():
    # The kernel updates in place, so NaN poisoning cannot apply (0 * NaN is NaN in the EMA).
    # Instead every element is given a value that must change and be exactly the reference's:
    # an element the kernel forgets keeps its old value and fails.
    n = 2 * BLOCK + 3
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(n, generator=gen).to(DEVICE)
    g = (torch.rand(n, generator=gen) + 0.5).to(DEVICE)  # nonzero everywhere
    m, h, e = torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE), (torch.rand(n, generator=gen) + 1).to(DEVICE)
    ref = [t.clone() for t in (p, m, h)]
    kw = dict(lr=0.1, beta1=0.5, rho=1.0, weight_decay=0.1, eps=1e-12, hessian_estimates=[e], beta2=0.5)
    sophia_step_reference([ref[0]], [g], [ref[1]], [ref[2]], **kw)
    old = [t.clone() for t in (p, m, h)]
    sophia_step_triton([p], [g], [m], [h], **kw)
    for new, before, expected in zip((p, m, h), old, ref):
        assert (new != before).all()
        torch.testing.assert_close(new, expected)


def test_many_small_tensors_in_one_launch():
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 1, 5, 1, 7, 2] * 5
    ps = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    gs = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    ms = [torch.zeros(n, device=DEVICE) for n in sizes]
    hs = [torch.ones(n, device=DEVICE) for n in sizes]
    ref = [[t.clone() for t in lst] for lst in (ps, ms, hs)]
    kw = dict(lr=0.1, beta1=0.9, rho=0.05, weight_decay=0.0, eps=1e-12)
    sophia_step_reference(ref[0], gs, ref[1], ref[2], **kw)
    sophia_step_triton(ps, gs, ms, hs, **kw)
    for a, b in zip(ref[0], ps):
        torch.testing.assert_close(b, a)


def test_bad_inputs_raise_before_launch():
    p = [torch.zeros(4, device=DEVICE), torch.zeros(6, device=DEVICE)]
    g = [torch.zeros(4, device=DEVICE), torch.zeros(6, device=DEVICE)]
    m = [torch.zeros(4, device=DEVICE), torch.zeros(6, device=DEVICE)]
    h = [torch.zeros(4, device=DEVICE), torch.zeros(6, device=DEVICE)]
    kw = dict(lr=0.1, beta1=0.9, rho=0.5, weight_decay=0.0, eps=1e-12)
    nc = torch.zeros(6, 2, device=DEVICE)[:, 0]
    with pytest.raises(ValueError, match=r"grads\[1\] is not contiguous"):
        sophia_step_triton(p, [g[0], nc], m, h, **kw)
    with pytest.raises(ValueError, match=r"hessians has 1"):
        sophia_step_triton(p, g, m, h[:1], **kw)
    with pytest.raises(TypeError, match=r"params\[0\]"):
        sophia_step_triton([torch.zeros(4, dtype=torch.int32, device=DEVICE), p[1]], g, m, h, **kw)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\]"):
        sophia_step_triton(p, g, [torch.zeros(5, device=DEVICE), m[1]], h, **kw)
    assert torch.count_nonzero(p[0]) == 0


@pytest.mark.gpu
def test_gpu_matches_foreach_on_a_model_sized_list():
    from soulkit.kernels.sophia import sophia_step_foreach

    gen = torch.Generator(device="cuda").manual_seed(0)
    sizes = [768 * 768, 768, 3072 * 768, 1, 50257 * 768 // 64]
    ps = [torch.randn(n, device="cuda", generator=gen) for n in sizes]
    gs = [torch.randn(n, device="cuda", generator=gen) for n in sizes]
    ms = [torch.zeros(n, device="cuda") for n in sizes]
    hs = [torch.rand(n, device="cuda", generator=gen) for n in sizes]
    ref = [[t.clone() for t in lst] for lst in (ps, ms, hs)]
    kw = dict(lr=1e-3, beta1=0.965, rho=0.04, weight_decay=0.1, eps=1e-15)
    sophia_step_foreach(ref[0], gs, ref[1], ref[2], **kw)
    sophia_step_triton(ps, gs, ms, hs, **kw)
    for a, b in zip(ref[0], ps):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
