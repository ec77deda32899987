"""The estimator building blocks: seeds, Rademacher probes, the Hutchinson core, sampled labels."""

from __future__ import annotations

import math

import pytest
import torch

from soulkit.optim import estimators
from soulkit.optim.estimators import (
    derive_seed,
    hutchinson,
    rademacher_like,
    sample_from_logits,
    sampled_label_grads,
    sampled_label_loss,
    seeded_generator,
)


def test_derive_seed_is_a_pure_function_of_seed_and_parts():
    assert derive_seed(5, 0, 0, 0) == derive_seed(5, 0, 0, 0)
    seeds = {derive_seed(5, 0, 0, 0), derive_seed(5, 0, 1, 0), derive_seed(5, 1, 0, 0), derive_seed(5, 0, 0, 1),
             derive_seed(6, 0, 0, 0), derive_seed(5, 0, 0), derive_seed(5, -1, 0, 0)}
    assert len(seeds) == 7  # parameter, step, sample, seed, number of parts and a negative stream all differ
    assert all(0 <= s < 2**63 for s in seeds)
    # splitmix64 of the seed, then of each part xor-ed in: a hand computation of the first step
    mask = (1 << 64) - 1
    x = (0 + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    assert derive_seed(0) == (x ^ (x >> 31)) & ((1 << 63) - 1)


def test_seeded_probes_are_reproducible_per_draw_and_reuse_a_cached_generator():
    p = torch.zeros(20_000)
    cache: dict = {}
    u = rademacher_like(p, seeded_generator(p.device, 5, 0, 0, 0, cache=cache))
    gen = cache[p.device]
    assert torch.equal(u, rademacher_like(p, seeded_generator(p.device, 5, 0, 0, 0, cache=cache)))
    assert cache[p.device] is gen
    for parts in [(0, 1, 0), (1, 0, 0), (0, 0, 1)]:  # another step, parameter, sample
        assert not torch.equal(u, rademacher_like(p, seeded_generator(p.device, 5, *parts)))
    assert not torch.equal(u, rademacher_like(p, seeded_generator(p.device, 6, 0, 0, 0)))


def test_rademacher_has_both_signs_and_zero_mean():
    p = torch.empty(20_000, dtype=torch.float64)
    u = rademacher_like(p, torch.Generator().manual_seed(0))
    assert u.dtype == torch.float64
    assert set(u.unique().tolist()) == {-1.0, 1.0}
    assert abs(u.mean().item()) < 4 / math.sqrt(u.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rademacher_draws_do_not_depend_on_the_dtype(dtype):
    a = rademacher_like(torch.zeros(257, 3, dtype=dtype), torch.Generator().manual_seed(1))
    b = rademacher_like(torch.zeros(257, 3), torch.Generator().manual_seed(1))
    assert a.dtype == dtype and torch.equal(a.float(), b)


def test_hutchinson_core_averages_per_parameter_samples_against_a_dense_hessian():
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64)
    A = a @ a.T
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    probes = {}

    def probe(j, s):
        probes[j, s] = rademacher_like([x, y][j], gen)
        return probes[j, s]

    def hvp_of(us, last):
        # H = blockdiag(A, 2 I): H u per block; None where a parameter takes no part in the sample
        return [None if us[0] is None else A @ us[0], None if us[1] is None else 2 * us[1]]

    est = hutchinson(hvp_of, probe, [x, y], [3, 1])
    want_x = sum(probes[0, s] * (A @ probes[0, s]) for s in range(3)) / 3
    torch.testing.assert_close(est[0], want_x)
    torch.testing.assert_close(est[1], torch.full((2,), 2.0, dtype=torch.float64))
    assert set(probes) == {(0, 0), (0, 1), (0, 2), (1, 0)}
    with pytest.raises(ValueError, match="n_samples"):
        hutchinson(hvp_of, probe, [x, y], [1])
    with pytest.raises(ValueError, match="n_samples"):
        hutchinson(hvp_of, probe, [x, y], 0)


def test_hutchinson_core_keeps_half_precision_estimates_in_float32():
    p = torch.zeros(3, dtype=torch.bfloat16)
    est = hutchinson(lambda us, last: [us[0] * 3], lambda j, s: torch.ones(3, dtype=torch.bfloat16), [p])
    assert est[0].dtype == torch.float32 and torch.equal(est[0], torch.full((3,), 3.0))


def test_sampled_label_grads_are_the_gradients_of_the_summed_sampled_loss():
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(7, 5, dtype=torch.float64) @ w
    grads, n = sampled_label_grads(logits, [w, unused], generator=torch.Generator().manual_seed(4))
    loss, n2 = sampled_label_loss(logits, generator=torch.Generator().manual_seed(4))
    (want,) = torch.autograd.grad(loss, [w])
    assert n == n2 == 7 and grads[1] is None
    torch.testing.assert_close(grads[0], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_from_logits_matches_softmax_frequencies(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 7) * 2).to(dtype)
    logits[1, 4] = float("-inf")  # a class of probability 0 is never drawn
    logits[2] = float("-inf")
    logits[2, 6] = 0.0  # a one-hot row: only the last class has mass
    n = 40_000
    draws = sample_from_logits(logits.repeat_interleave(n, 0), generator=torch.Generator().manual_seed(3))
    assert draws.dtype == torch.int64 and draws.shape == (3 * n,)
    probs = torch.softmax(logits.double(), -1)
    for row in range(3):
        freq = torch.bincount(draws[row * n : (row + 1) * n], minlength=7).double() / n
        # binomial standard error; 5 sigma keeps the test from flaking while catching a wrong law
        sigma = (probs[row] * (1 - probs[row]) / n).sqrt()
        assert torch.all((freq - probs[row]).abs() <= 5 * sigma + 1e-12), (row, freq, probs[row])
    assert not (draws[n : 2 * n] == 4).any()
    assert (draws[2 * n :] == 6).all()
    with pytest.raises(ValueError, match="N, vocab"):
        sample_from_logits(logits[0])


def test_sample_from_logits_never_returns_a_massless_class_when_u_rounds_up(monkeypatch):
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    # force u == total mass (the rounding case): the draw must fall back to the last class with mass
    monkeypatch.setattr(estimators.torch, "rand", lambda *a, **k: torch.ones(1, 1, dtype=k.get("dtype")))
    assert estimators.sample_from_logits(logits).tolist() == [1]


def test_uniforms_key_each_draw_to_its_row_so_a_split_batch_draws_what_the_whole_batch_does():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 9, dtype=torch.float64)
    u = torch.rand(6, 5, dtype=torch.float64)
    labels = torch.randint(0, 9, (6, 5))
    labels[0, :2] = -100
    labels[3, 4] = -100
    whole = sample_from_logits(logits.reshape(-1, 9), uniforms=u.reshape(-1))
    # the same inverse CDF the generator path uses, one uniform per row
    cdf = torch.softmax(logits.reshape(-1, 9), -1).cumsum(-1)
    want = torch.searchsorted(cdf, (u.reshape(-1, 1) * cdf[:, -1:]), side="right").squeeze(-1).clamp(max=8)
    assert torch.equal(whole, want)
    # rows 0::2 and 1::2 (two ranks' shares): their summed losses add up to the whole batch's
    loss, n = sampled_label_loss(logits, labels=labels, uniforms=u)
    parts = [sampled_label_loss(logits[r::2], labels=labels[r::2], uniforms=u[r::2]) for r in (0, 1)]
    assert n == sum(k for _, k in parts) == 27
    torch.testing.assert_close(loss, parts[0][0] + parts[1][0], rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="uniforms shape"):
        sampled_label_loss(logits, uniforms=u[:, :4])
    with pytest.raises(ValueError, match="either generator or uniforms"):
        sample_from_logits(logits[0], uniforms=u[0], generator=torch.Generator())


def test_sampled_label_loss_keeps_float64_and_lifts_half_precision():
    torch.manual_seed(0)
    z64 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    loss, n = sampled_label_loss(z64, generator=torch.Generator().manual_seed(1))
    assert loss.dtype == torch.float64 and n == 5
    labels = sample_from_logits(z64.detach(), generator=torch.Generator().manual_seed(1))
    want = torch.nn.functional.cross_entropy(z64, labels, reduction="sum")
    assert loss.item() == want.item()  # bit for bit: no detour through float32
    zb = z64.detach().to(torch.bfloat16).requires_grad_(True)
    assert sampled_label_loss(zb, generator=torch.Generator().manual_seed(1))[0].dtype == torch.float32
