"""soulkit.kernels.dispatch: which implementation runs a call (per family, device and size), the
optimizers' foreach/fused flags as an implementation, and the split that sends tensors a fused path
cannot take (non-contiguous ones) to the foreach path with the same result as the reference.

``project``/``project_chunks`` are tested in test_projection.py.
"""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch

from soulkit.kernels import dispatch
from soulkit.kernels._common import compile_available
from soulkit.kernels.adahessian import adahessian_step_foreach, adahessian_step_reference
from soulkit.kernels.dispatch import (
    ADAHESSIAN_IMPLEMENTATIONS,
    COMPILE_MIN_NUMEL,
    SOPHIA_IMPLEMENTATIONS,
    adahessian_step,
    implementation_from_flags,
    resolve_implementation,
    sophia_step,
    triton_usable,
)
from soulkit.kernels.sophia import sophia_step_foreach, sophia_step_reference

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a cuda device object needs no GPU
FAMILIES = ("sophia", "adahessian")


# ------------------------------------------------------------------------------- resolve_implementation
def test_auto_dispatch_picks_a_path_by_device_and_size(monkeypatch):
    assert resolve_implementation(CPU, "auto", numel=10) == "foreach"
    big = resolve_implementation(CPU, "auto", numel=COMPILE_MIN_NUMEL)
    assert big == ("compiled" if compile_available() else "foreach")
    assert resolve_implementation(CPU, "reference") == "reference"


@pytest.mark.parametrize("compiler", [True, False])
def test_auto_on_the_cpu_compiles_only_large_sophia_groups(monkeypatch, compiler):
    monkeypatch.setattr(dispatch, "compile_available", lambda: compiler)
    assert resolve_implementation(CPU, "auto", numel=COMPILE_MIN_NUMEL) == ("compiled" if compiler else "foreach")
    assert resolve_implementation(CPU, numel=COMPILE_MIN_NUMEL - 1) == "foreach"  # "auto" is the default
    assert resolve_implementation(CPU, "auto") == "foreach"
    # AdaHessian has no compiled step: foreach at any size
    assert resolve_implementation(CPU, "auto", 10 * COMPILE_MIN_NUMEL, family="adahessian") == "foreach"
    # another device type never gets the CPU's compiled step
    assert resolve_implementation(torch.device("meta"), "auto", 10 * COMPILE_MIN_NUMEL) == "foreach"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("usable", [True, False])
def test_auto_on_cuda_is_triton_where_it_can_run(monkeypatch, family, usable):
    seen = []
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: seen.append(device) or usable)
    monkeypatch.setattr(dispatch, "compile_available", lambda: True)
    for numel in (1, COMPILE_MIN_NUMEL * 4):
        assert resolve_implementation(CUDA, "auto", numel, family=family) == ("triton" if usable else "foreach")
    assert seen == [CUDA, CUDA]


@pytest.mark.parametrize("family, choices", [("sophia", SOPHIA_IMPLEMENTATIONS),
                                             ("adahessian", ADAHESSIAN_IMPLEMENTATIONS)])
def test_named_implementations_are_returned_as_given(monkeypatch, family, choices):
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: pytest.fail("a named path needs no probe"))
    for name in choices:
        if name != "auto":
            for device in (CPU, CUDA):
                assert resolve_implementation(device, name, COMPILE_MIN_NUMEL, family=family) == name


@pytest.mark.parametrize("family, name", [("sophia", "magic"), ("sophia", "Foreach"), ("sophia", "torch"),
                                          ("adahessian", "compiled"), ("adahessian", "")])
def test_bad_implementation_names_the_choices(family, name):
    choices = SOPHIA_IMPLEMENTATIONS if family == "sophia" else ADAHESSIAN_IMPLEMENTATIONS
    with pytest.raises(ValueError, match=re.escape(f"implementation must be one of {choices!r}, got {name!r}")):
        resolve_implementation(CPU, name, family=family)


def test_bad_family_is_named():
    with pytest.raises(ValueError, match="family must be 'sophia' or 'adahessian', got 'projection'"):
        resolve_implementation(CPU, "auto", family="projection")


# ------------------------------------------------------------------------------- flags
def test_flags_map_to_implementations(monkeypatch):
    assert implementation_from_flags(None, None, CPU) == "auto"
    assert implementation_from_flags(None, False, CPU) == "auto"
    assert implementation_from_flags(True, None, CPU) == "foreach"
    assert implementation_from_flags(True, False, CPU) == "foreach"
    assert implementation_from_flags(False, None, CPU) == "reference"
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    assert implementation_from_flags(None, True, CUDA) == "triton"
    assert implementation_from_flags(False, True, CUDA) == "triton"  # fused wins; the optimizers refuse the pair


def test_fused_true_where_triton_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_usable(CPU) is False
    with pytest.raises(RuntimeError, match="fused=True needs the Triton kernel.*not on cpu; leave fused=None"):
        implementation_from_flags(None, True, CPU)
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: False)
    with pytest.raises(RuntimeError, match="not on cuda"):
        implementation_from_flags(True, True, CUDA)


# ------------------------------------------------------------------------------- the split
def _strided(t):
    """``t``'s values in a non-contiguous tensor (every other column of a wider one)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    view = wide[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


def _sophia_lists(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5, 2), (7, 3), (2, 6), (4, 4)]

    def r(s, pos=False):
        t = torch.randn(s, generator=gen, dtype=torch.float64)
        return t.abs() if pos else t

    return [[r(s) for s in shapes], [r(s) for s in shapes], [0.1 * r(s) for s in shapes],
            [r(s, pos=True) for s in shapes], [r(s, pos=True) for s in shapes]]


# which tensor of which position is non-contiguous: (list index, position); 4 = hessian_estimates
ODD = [(0, 1), (2, 3), (4, 4)]
SOPHIA_KW = dict(lr=0.05, beta1=0.9, rho=0.3, weight_decay=0.1, eps=1e-12, beta2=0.95, bias_correction1=0.5)


def _spy(calls, name, fn, *, contiguous=False):
    def spy(*lists, **kwargs):
        if contiguous:  # what a fused path may assume
            tensors = [t for lst in lists[:4] for t in lst] + list(kwargs.get("hessian_estimates") or [])
            assert all(t.is_contiguous() for t in tensors), f"{name} was given a non-contiguous tensor"
        calls.append((name, [id(p) for p in lists[0]]))
        return fn(*lists, **kwargs)

    return spy


@pytest.mark.parametrize("odd", [ODD, []], ids=["mixed", "all-contiguous"])
def test_sophia_step_sends_non_contiguous_tensors_to_foreach(monkeypatch, odd):
    want = _sophia_lists(0)
    got = [list(lst) for lst in _sophia_lists(0)]
    for li, pos in odd:
        got[li][pos] = _strided(got[li][pos])
    calls = []
    # a stand-in for the compiled kernel (the routing is what is tested; compiling costs seconds)
    monkeypatch.setattr("soulkit.kernels.sophia_compiled.sophia_step_compiled",
                        _spy(calls, "fused", sophia_step_reference, contiguous=True))
    monkeypatch.setattr(dispatch, "sophia_step_foreach", _spy(calls, "foreach", sophia_step_foreach))
    wins = [torch.zeros((), dtype=torch.int64) for _ in range(2)]
    sophia_step_reference(*want[:4], hessian_estimates=want[4], win_count=wins[0], **SOPHIA_KW)
    sophia_step(*got[:4], hessian_estimates=got[4], win_count=wins[1], implementation="compiled", **SOPHIA_KW)
    odd_positions = sorted({pos for _, pos in odd})
    even_positions = [i for i in range(5) if i not in odd_positions]
    expected = [("fused", [id(got[0][i]) for i in even_positions])]
    if odd_positions:
        expected.append(("foreach", [id(got[0][i]) for i in odd_positions]))
    assert calls == expected
    for lw, lg in zip(want[:4], got[:4]):  # params, state: updated in place, strided views included
        for w, g in zip(lw, lg):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    assert int(wins[1]) == int(wins[0]) > 0  # both parts count into the one win counter
    assert not torch.equal(got[0][1], _sophia_lists(0)[0][1])  # the strided parameter was really updated


@pytest.mark.parametrize("impl", ["auto", "foreach", "reference"])
def test_sophia_step_without_a_fused_path_does_not_split(monkeypatch, impl):
    lists = _sophia_lists(1)
    lists[0][1] = _strided(lists[0][1])
    calls = []
    monkeypatch.setattr(dispatch, "sophia_step_foreach", _spy(calls, "foreach", sophia_step_foreach))
    monkeypatch.setattr(dispatch, "sophia_step_reference", _spy(calls, "reference", sophia_step_reference))
    sophia_step(*lists[:4], implementation=impl, **SOPHIA_KW)  # small tensors on the CPU: auto is foreach
    assert calls == [("reference" if impl == "reference" else "foreach", [id(p) for p in lists[0]])]


@pytest.mark.skipif(not compile_available(), reason="no C++ compiler for inductor")
def test_sophia_step_compiled_for_real_with_a_large_strided_tensor():
    # without the split the compiled step refuses the strided tensor ("tensor 1 is not contiguous")
    gen = torch.Generator().manual_seed(3)
    shapes = [(256, 160), (256, 160), (9,)]  # two above the compiled step's small-tensor limit
    lists = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    lists.append([torch.rand(s, generator=gen) for s in shapes])
    want = [[t.clone() for t in lst] for lst in lists]
    lists[0][1] = _strided(lists[0][1])
    kw = dict(lr=0.05, beta1=0.9, rho=0.3, weight_decay=0.1, eps=1e-12)
    sophia_step_reference(*want, **kw)
    sophia_step(*lists, implementation="compiled", **kw)
    for lw, lg in zip(want, lists):
        for w, g in zip(lw, lg):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def _adahessian_lists(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5, 2), (2, 3, 3, 3), (4, 4)]

    def r(s, pos=False):
        t = torch.randn(s, generator=gen, dtype=torch.float64)
        return t.abs() if pos else t

    return [[r(s) for s in shapes], [r(s) for s in shapes], [r(s) for s in shapes], [r(s, pos=True) for s in shapes],
            [r(s) for s in shapes]]


ADAHESSIAN_KW = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-4, weight_decay=0.01, hessian_power=0.7)


@pytest.mark.parametrize("odd", [[(1, 0), (4, 2)], []], ids=["mixed", "all-contiguous"])
def test_adahessian_step_sends_non_contiguous_tensors_to_foreach(monkeypatch, odd):
    steps = [1, 4, 2, 9]  # per tensor: they must travel with their tensors
    want = _adahessian_lists(2)
    got = [list(lst) for lst in _adahessian_lists(2)]
    for li, pos in odd:
        got[li][pos] = _strided(got[li][pos])
    calls, step_lists = [], {}

    def fused(params, grads, exp_avgs, sqs, diags, st, **kwargs):
        assert all(t.is_contiguous() for lst in (params, grads, exp_avgs, sqs, diags) for t in lst)
        calls.append(("fused", [id(p) for p in params]))
        step_lists["fused"] = list(st)
        return adahessian_step_reference(params, grads, exp_avgs, sqs, diags, st, **kwargs)

    def foreach(params, grads, exp_avgs, sqs, diags, st, **kwargs):
        calls.append(("foreach", [id(p) for p in params]))
        step_lists["foreach"] = list(st)
        return adahessian_step_foreach(params, grads, exp_avgs, sqs, diags, st, **kwargs)

    # triton is not needed to test the routing: a stand-in module for the Triton kernel
    monkeypatch.setitem(sys.modules, "soulkit.kernels.adahessian_triton",
                        types.SimpleNamespace(adahessian_step_triton=fused))
    monkeypatch.setattr(dispatch, "adahessian_step_foreach", foreach)
    adahessian_step_reference(*want, steps, **ADAHESSIAN_KW)
    adahessian_step(*got, steps, implementation="triton", **ADAHESSIAN_KW)
    odd_positions = sorted({pos for _, pos in odd})
    even_positions = [i for i in range(4) if i not in odd_positions]
    expected = [("fused", [id(got[0][i]) for i in even_positions])]
    if odd_positions:
        expected.append(("foreach", [id(got[0][i]) for i in odd_positions]))
    assert calls == expected
    assert step_lists["fused"] == [steps[i] for i in even_positions]
    if odd_positions:
        assert step_lists["foreach"] == [steps[i] for i in odd_positions]
    for lw, lg in zip(want[:4], got[:4]):  # params and state, updated in place
        for w, g in zip(lw, lg):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_adahessian_step_reference_and_foreach_are_not_split(monkeypatch):
    lists = _adahessian_lists(3)
    lists[0][0] = _strided(lists[0][0])
    calls = []
    monkeypatch.setattr(dispatch, "adahessian_step_foreach", _spy(calls, "foreach", adahessian_step_foreach))
    monkeypatch.setattr(dispatch, "adahessian_step_reference", _spy(calls, "reference", adahessian_step_reference))
    for impl in ("auto", "foreach", "reference"):
        adahessian_step(*lists, [1, 1, 1, 1], implementation=impl, **ADAHESSIAN_KW)
    ids = [id(p) for p in lists[0]]
    assert calls == [("foreach", ids), ("foreach", ids), ("reference", ids)]
    with pytest.raises(ValueError, match="implementation must be one of"):
        adahessian_step(*lists, [1, 1, 1, 1], implementation="compiled", **ADAHESSIAN_KW)
