"""The foreach Sophia step against the per-tensor reference, and input validation."""

from __future__ import annotations

import pytest
import torch

from soulkit.kernels import sophia_step
from soulkit.kernels.sophia import sophia_step_foreach, sophia_step_reference

SIZES = [1, 7, 127, 1023, 1024, 1025, 4099]
DTYPE_CASES = [
    # (param dtype, state dtype, tolerance)
    (torch.float64, torch.float64, 1e-13),
    (torch.float32, torch.float32, 1e-6),
    (torch.bfloat16, torch.float32, 1e-2),
    (torch.float16, torch.float32, 2e-3),
    (torch.float32, torch.bfloat16, 1e-2),
]


def _make(sizes, pdt, sdt, seed):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(n, generator=gen, dtype=torch.float64).to(pdt) for n in sizes]
    gs = [torch.randn(n, generator=gen, dtype=torch.float64).to(pdt) for n in sizes]
    ms = [(0.1 * torch.randn(n, generator=gen, dtype=torch.float64)).to(sdt) for n in sizes]
    hs = [torch.rand(n, generator=gen, dtype=torch.float64).to(sdt) for n in sizes]
    es = [(3 * torch.rand(n, generator=gen, dtype=torch.float64)).to(sdt) for n in sizes]
    return ps, gs, ms, hs, es


def _clone(lists):
    return [[t.clone() for t in lst] for lst in lists]


@pytest.mark.parametrize("pdt, sdt, tol", DTYPE_CASES)
@pytest.mark.parametrize("with_estimate", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_foreach_matches_reference(pdt, sdt, tol, with_estimate, maximize):
    ps, gs, ms, hs, es = _make(SIZES, pdt, sdt, seed=1)
    a = _clone([ps, ms, hs])
    b = _clone([ps, ms, hs])
    kw = dict(lr=0.03, beta1=0.9, rho=0.5, weight_decay=0.1, eps=1e-12, maximize=maximize,
              bias_correction1=0.271, beta2=0.95, hessian_estimates=es if with_estimate else None)
    wa, wb = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    sophia_step_reference(a[0], gs, a[1], a[2], win_count=wa, **kw)
    sophia_step_foreach(b[0], gs, b[1], b[2], win_count=wb, **kw)
    for lst_a, lst_b in zip(a, b):
        for x, y in zip(lst_a, lst_b):
            assert x.dtype == y.dtype
            torch.testing.assert_close(x.double(), y.double(), rtol=tol, atol=tol)
    # win counts may differ only where a ratio sits at the clipping boundary after rounding
    assert abs(int(wa) - int(wb)) <= (0 if pdt == torch.float64 else sum(SIZES) // 200)
    assert 0 < int(wa) < sum(SIZES)


def test_reference_matches_closed_form_float64():
    p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g = torch.tensor([0.2, -0.4, 3.0], dtype=torch.float64)
    m = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    h = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    lr, b1, rho, wd, eps = 0.1, 0.9, 0.5, 0.01, 1e-15
    m_new = b1 * m + (1 - b1) * g
    ratio = torch.clamp(m_new / torch.clamp(rho * h, min=eps), -1, 1)
    p_new = p * (1 - lr * wd) - lr * ratio
    for impl in ("reference", "foreach"):
        pp, mm, hh = p.clone(), m.clone(), h.clone()
        sophia_step([pp], [g], [mm], [hh], lr=lr, beta1=b1, rho=rho, weight_decay=wd, eps=eps, implementation=impl)
        torch.testing.assert_close(pp, p_new, rtol=1e-15, atol=0)
        torch.testing.assert_close(mm, m_new, rtol=1e-15, atol=0)


def test_non_contiguous_tensors_are_handled():
    base = torch.randn(6, 8)
    p_ref = base.clone()[:, ::2].contiguous()
    p_nc = base.clone()[:, ::2]
    g = torch.randn(6, 4)
    m_ref, h_ref = torch.zeros(6, 4), torch.ones(6, 4)
    m_nc = torch.zeros(8, 6).T[:, :4]  # non-contiguous state
    h_nc = torch.ones(8, 6).T[:, :4]
    kw = dict(lr=0.1, beta1=0.9, rho=0.5, weight_decay=0.0, eps=1e-12)
    sophia_step([p_ref], [g], [m_ref], [h_ref], **kw)
    sophia_step([p_nc], [g], [m_nc], [h_nc], **kw)
    torch.testing.assert_close(p_nc, p_ref)
    torch.testing.assert_close(m_nc, m_ref)


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_bad_inputs_name_list_and_index(impl):
    p = [torch.zeros(3), torch.zeros(4)]
    g = [torch.zeros(3), torch.zeros(4)]
    m = [torch.zeros(3), torch.zeros(4)]
    h = [torch.zeros(3), torch.zeros(4)]
    kw = dict(lr=0.1, beta1=0.9, rho=0.5, weight_decay=0.0, eps=1e-12, implementation=impl)
    with pytest.raises(ValueError, match="grads has 1"):
        sophia_step(p, g[:1], m, h, **kw)
    with pytest.raises(ValueError, match=r"exp_avgs\[1\]"):
        sophia_step(p, g, [m[0], torch.zeros(5)], h, **kw)
    with pytest.raises(TypeError, match=r"params\[0\]"):
        sophia_step([torch.zeros(3, dtype=torch.int32), p[1]], g, m, h, **kw)
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        sophia_step(p, [g[0], torch.zeros(4, dtype=torch.int64)], m, h, **kw)
    with pytest.raises(ValueError, match=r"hessian_estimates has 1"):
        sophia_step(p, g, m, h, hessian_estimates=[torch.zeros(3)], **kw)
    with pytest.raises(ValueError, match="implementation"):
        sophia_step(p, g, m, h, lr=0.1, beta1=0.9, rho=0.5, weight_decay=0.0, eps=1e-12, implementation="magic")


@pytest.mark.parametrize("pdt, sdt, tol", [(torch.float32, torch.float32, 1e-6), (torch.bfloat16, torch.float32, 1e-2)])
@pytest.mark.parametrize("with_estimate", [False, True])
@pytest.mark.parametrize("small_numel", [0, 100, None], ids=["all-compiled", "mixed", "default"])
@pytest.mark.parametrize("bc1", [0.271, 1.0], ids=["m-bias-corrected", "no-m-correction"])
def test_compiled_matches_reference(pdt, sdt, tol, with_estimate, small_numel, bc1):
    from soulkit.kernels.sophia_compiled import compile_available, sophia_step_compiled

    if not compile_available():
        pytest.skip("no C++ compiler for inductor")
    # 0: every tensor compiled; 100: the two small ones through the foreach branch, the rest compiled
    ps, gs, ms, hs, es = _make([1, 13, 1025, 40_009], pdt, sdt, seed=4)
    a = _clone([ps, ms, hs])
    b = _clone([ps, ms, hs])
    kw = dict(lr=0.03, beta1=0.9, rho=0.5, weight_decay=0.1, eps=1e-12, maximize=True,
              bias_correction1=bc1, beta2=0.95, hessian_estimates=es if with_estimate else None)
    wa, wb = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    sophia_step_reference(a[0], gs, a[1], a[2], win_count=wa, **kw)
    sophia_step_compiled(b[0], gs, b[1], b[2], win_count=wb, small_tensor_numel=small_numel, **kw)
    for lst_a, lst_b in zip(a, b):
        for x, y in zip(lst_a, lst_b):
            assert x.dtype == y.dtype
            torch.testing.assert_close(x.double(), y.double(), rtol=tol, atol=tol)
    assert abs(int(wa) - int(wb)) <= 2


def test_compiled_chunks_of_large_tensors_match_reference_without_recompiling():
    # more large tensors than one chunk: a full chunk through one compiled call, the rest one by one;
    # equal sizes inside the chunk (as in a transformer's layers) must not tie the graph to that
    # layout, so a second list with other sizes reuses the compiled chunk
    import torch._dynamo.utils

    from soulkit.kernels.sophia_compiled import CHUNK, compile_available, sophia_step_compiled

    if not compile_available():
        pytest.skip("no C++ compiler for inductor")
    kw = dict(lr=0.03, beta1=0.9, rho=0.5, weight_decay=0.1, eps=1e-12, maximize=False,
              bias_correction1=0.5, beta2=0.95)
    layouts = [[64] * (CHUNK - 2) + [97, 131, 64], [50 + 7 * i for i in range(CHUNK + 1)]]
    graphs = []
    for seed, sizes in enumerate(layouts):
        ps, gs, ms, hs, es = _make(sizes, torch.float32, torch.float32, seed=seed)
        a, b = _clone([ps, ms, hs]), _clone([ps, ms, hs])
        wa, wb = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
        sophia_step_reference(a[0], gs, a[1], a[2], win_count=wa, hessian_estimates=es, **kw)
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        sophia_step_compiled(b[0], gs, b[1], b[2], win_count=wb, hessian_estimates=es, small_tensor_numel=0, **kw)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
        for lst_a, lst_b in zip(a, b):
            for x, y in zip(lst_a, lst_b):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        assert abs(int(wa) - int(wb)) <= 2 and int(wb) > 0
    assert graphs[1] == 0, f"the second layout compiled {graphs[1]} new graph(s)"
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        sophia_step_compiled(b[0], gs, b[1], b[2], small_tensor_numel=0, chunk=0, **kw)


def test_compiled_rejects_non_contiguous_before_updating_anything():
    from soulkit.kernels.sophia_compiled import compile_available, sophia_step_compiled

    if not compile_available():
        pytest.skip("no C++ compiler for inductor")
    ps, gs, ms, hs, _ = _make([5, 64 * 64], torch.float32, torch.float32, seed=9)
    gs[1] = gs[1].view(64, 64).t()  # large and not contiguous; tensor 0 is small (foreach branch)
    ps[1], ms[1], hs[1] = ps[1].view(64, 64), ms[1].view(64, 64), hs[1].view(64, 64)
    before = _clone([ps, ms, hs])
    with pytest.raises(ValueError, match="tensor 1 is not contiguous"):
        sophia_step_compiled(ps, gs, ms, hs, lr=0.1, beta1=0.9, rho=0.5, weight_decay=0.1, eps=1e-12,
                             small_tensor_numel=100)
    for lst_b, lst in zip(before, [ps, ms, hs]):
        for x, y in zip(lst_b, lst):
            assert torch.equal(x, y), "a tensor was updated before the error"


def test_compiled_survives_more_configurations_than_dynamos_recompile_limit():
    # dynamo allows 8 recompiles per code object and fails hard under fullgraph=True; one process meets
    # maximize x win counting (refresh steps) x m bias correction x fused refresh x dtypes, so each
    # configuration must compile on its own code object
    from soulkit.kernels.sophia_compiled import compile_available, sophia_step_compiled

    if not compile_available():
        pytest.skip("no C++ compiler for inductor")
    import itertools

    import torch._dynamo

    flags = list(itertools.product([False, True], [False, True], [False, True]))  # maximize, count, estimate
    configs = [(*f, 0.5, torch.float32) for f in flags] + [(True, True, True, 1.0, torch.bfloat16),
                                                           (False, False, False, 1.0, torch.bfloat16)]
    configs.append(configs[0])  # a repeat reuses its kernel
    assert len(set(configs)) > torch._dynamo.config.recompile_limit  # past the limit, or the test means nothing
    for maximize, count, with_estimate, bc1, pdt in configs:
        ps, gs, ms, hs, es = _make([40_009], pdt, torch.float32, seed=5)
        a, b = _clone([ps, ms, hs]), _clone([ps, ms, hs])
        kw = dict(lr=0.03, beta1=0.9, rho=0.5, weight_decay=0.1, eps=1e-12, maximize=maximize,
                  bias_correction1=bc1, beta2=0.95, hessian_estimates=es if with_estimate else None)
        wa = torch.zeros((), dtype=torch.int64) if count else None
        wb = torch.zeros((), dtype=torch.int64) if count else None
        sophia_step_reference(a[0], gs, a[1], a[2], win_count=wa, **kw)
        sophia_step_compiled(b[0], gs, b[1], b[2], win_count=wb, small_tensor_numel=0, **kw)
        tol = 1e-6 if pdt == torch.float32 else 1e-2
        for lst_a, lst_b in zip(a, b):
            torch.testing.assert_close(lst_a[0].double(), lst_b[0].double(), rtol=tol, atol=tol)
