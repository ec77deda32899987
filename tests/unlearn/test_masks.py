"""Weight-saliency masks (SalUn, WAGLE): they keep the stated fraction, the weights with the largest scores,
and, applied in the Unlearner, the masked-out weights stay bit-identical under every optimizer with weight
decay on, also across a resume."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from soulkit.cli import main
from soulkit.unlearn.masks import (
    MASKS,
    MaskedWeights,
    gradient_sums,
    load_mask,
    salun_mask,
    save_mask,
    top_fraction,
    wagle_mask,
)
from soulkit.unlearn.models import model_meta
from soulkit.unlearn.objectives import make_objective, sequence_nll
from soulkit.unlearn.qa import QADataset, pad_token_id, qa_batches
from soulkit.unlearn.unlearner import MASK_FILE, OPTIMIZERS, UnlearnConfig, Unlearner

from ._corpus import FORGET, RETAIN, _state


def _batches(tok, records, batch_size=2):
    return list(qa_batches(QADataset(list(records), tok, max_length=128), batch_size, pad_id=pad_token_id(tok)))


def _grad_by_backward(model, batches) -> dict[str, torch.Tensor]:
    """The summed gradient the plain way: .backward() batch after batch into .grad."""
    model.zero_grad(set_to_none=True)
    model.eval()
    for b in batches:
        sequence_nll(model, b).backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _assert_kept_are_the_largest(mask, scores):
    kept = torch.cat([scores[n][mask[n]].flatten() for n in mask])
    dropped = torch.cat([scores[n][~mask[n]].flatten() for n in mask])
    assert kept.numel() and dropped.numel()
    assert kept.min() >= dropped.max()
    assert kept.min() > 0  # the largest magnitudes, not the smallest (the published code's direction)


# ------------------------------------------------------------------------------------------ the masks
@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 1.0])
def test_salun_keeps_the_ratio_of_the_largest_gradient_magnitudes(tiny_model, tiny_tokenizer, ratio):
    batches = _batches(tiny_tokenizer, FORGET)
    mask = salun_mask(tiny_model, batches, ratio)
    names = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert list(mask) == names
    assert all(m.dtype == torch.bool and m.shape == p.shape for m, p in zip(mask.values(), tiny_model.parameters()))
    n = _n_params(tiny_model)
    assert sum(int(m.sum()) for m in mask.values()) == max(1, math.floor(ratio * n))
    if ratio < 1.0:
        g = _grad_by_backward(tiny_model, batches)
        torch.testing.assert_close(gradient_sums(tiny_model, batches), g, rtol=1e-5, atol=1e-7)
        _assert_kept_are_the_largest(mask, {k: v.abs() for k, v in g.items()})
    assert all(p.grad is None for p in tiny_model.parameters())  # computing a mask leaves .grad alone
    assert not tiny_model.training


def test_the_threshold_is_global_across_tensors():
    scores = {"a": torch.tensor([5.0, 4.0, 3.0]), "b": torch.tensor([[0.1, 0.2], [0.3, 9.0]])}
    mask = top_fraction(scores, 0.6)  # floor(0.6 * 7) = 4: 9, 5, 4, 3
    assert mask["a"].tolist() == [True, True, True]
    assert mask["b"].tolist() == [[False, False], [False, True]]
    assert sum(int(m.sum()) for m in top_fraction(scores, 1e-9).values()) == 1  # at least one weight


@pytest.mark.parametrize("mu", [1e-6, 1e3])
def test_wagle_keeps_the_largest_attribution_scores(tiny_model, tiny_tokenizer, mu):
    fb, rb = _batches(tiny_tokenizer, FORGET), _batches(tiny_tokenizer, RETAIN)
    mask = wagle_mask(tiny_model, fb, rb, 0.2, mu=mu)
    assert sum(int(m.sum()) for m in mask.values()) == math.floor(0.2 * _n_params(tiny_model))
    g_f, g_r = _grad_by_backward(tiny_model, fb), _grad_by_backward(tiny_model, rb)
    theta = dict(tiny_model.named_parameters())
    scores = {n: ((theta[n].detach() - g_r[n] / mu) * g_f[n]).abs() for n in g_f}  # |(theta - g_r/mu) g_f|
    kept = torch.cat([scores[n][mask[n]].flatten() for n in mask])
    dropped = torch.cat([scores[n][~mask[n]].flatten() for n in mask])
    assert kept.min() >= dropped.max() * (1 - 1e-5)  # float32 sums: a tie at the threshold may swap
    if mu == 1e3:  # a large mu: close to |theta * g_f|, unlike SalUn's |g_f|
        assert not all(torch.equal(a, b) for a, b in zip(mask.values(), salun_mask(tiny_model, fb, 0.2).values()))


def test_save_and_load_round_trip(tiny_model, tiny_tokenizer, tmp_path):
    mask = salun_mask(tiny_model, _batches(tiny_tokenizer, FORGET), 0.4)
    save_mask(tmp_path / "m.safetensors", mask, {"mask": "salun"})
    back, meta = load_mask(tmp_path / "m.safetensors", tiny_model)
    assert meta == {"mask": "salun"} and back.keys() == mask.keys()
    assert all(torch.equal(back[n], mask[n]) for n in mask)
    bad = dict(mask)
    bad.pop(next(iter(bad)))
    save_mask(tmp_path / "bad.safetensors", bad)
    with pytest.raises(ValueError, match="does not fit the model's trainable parameters"):
        load_mask(tmp_path / "bad.safetensors", tiny_model)


# ------------------------------------------------------------------------------------------ applying them
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.5),
])
def test_masked_weights_do_not_move_under_decay_and_momentum(make):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    mask = top_fraction({n: torch.rand_like(p) for n, p in model.named_parameters()}, 0.5)
    before = _state(model)
    masked = MaskedWeights(model, mask)
    assert masked.fraction == pytest.approx(math.floor(0.5 * 23) / 23)
    opt = make(list(model.parameters()))
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        masked.mask_grads()
        opt.step()
        masked.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach()[~mask[n]], before[n][~mask[n]]), n
        assert (p.detach()[mask[n]] != before[n][mask[n]]).all(), n


def _masked_cfg(**kw) -> UnlearnConfig:
    base = dict(lr=2e-3, steps=3, batch_size=2, weight_decay=0.1, mask="salun", mask_ratio=0.3, show_progress=False)
    base.update(kw)
    return UnlearnConfig(**base)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("mask", MASKS)
def test_only_masked_weights_move_in_the_unlearner(memorised, tiny_tokenizer, tmp_path, optimizer, mask):
    assert set(OPTIMIZERS) >= {"adamw", "sophia", "soul-released", "signum"}
    kw = {"optimizer_kwargs": {"hessian_update_interval": 2}} if optimizer == "sophia" else {}
    cfg = _masked_cfg(mask=mask, **kw)
    before = _state(memorised)
    res = Unlearner(memorised, tiny_tokenizer, make_objective("graddiff"), forget=FORGET, retain=RETAIN,
                    optimizer=optimizer, config=cfg, out_dir=tmp_path / "run").run()
    assert res.stopped == "completed" and res.steps == 3
    saved, meta = load_mask(tmp_path / "run" / MASK_FILE, memorised)
    assert meta["mask"] == mask and float(meta["mask_ratio"]) == 0.3
    # the saved mask is the one computed at the starting weights (SalUn: from the forget QA as given)
    if mask == "salun":
        again = salun_mask(memorised, _batches(tiny_tokenizer, FORGET), 0.3)
        assert all(torch.equal(again[n], saved[n]) for n in saved)
    after = dict(res.model.named_parameters())
    moved = 0
    for n, keep in saved.items():
        assert torch.equal(after[n].detach()[~keep], before[n][~keep]), n  # bit-identical
        moved += int((after[n].detach()[keep] != before[n][keep]).sum())
    assert moved > 0.5 * sum(int(k.sum()) for k in saved.values())  # the kept weights did move
    assert res.log[-1]["forget_nll"] > res.log[0]["forget_nll"]
    assert model_meta(tmp_path / "run" / "model")["config"]["mask"] == mask  # recorded with the model


def test_a_resumed_masked_run_reads_its_mask_back(memorised, tiny_tokenizer, tmp_path):
    cfg = _masked_cfg(steps=4, checkpoint_every=2, optimizer_kwargs={"hessian_update_interval": 2})
    obj = make_objective("npo", retain_loss="nll")

    def unlearner(config, out_dir, evaluate_fn=None):
        return Unlearner(memorised, tiny_tokenizer, obj, forget=FORGET, retain=RETAIN, optimizer="sophia",
                         config=config, out_dir=out_dir, evaluate_fn=evaluate_fn)

    full = unlearner(cfg, tmp_path / "full").run()

    class Stop(Exception):
        pass

    def stop_at_3(model, step):
        if step == 3:
            raise Stop
        return {}

    cut = tmp_path / "cut"
    with pytest.raises(Stop):
        unlearner(dataclasses.replace(cfg, eval_every=1), cut, stop_at_3).run()
    assert (cut / MASK_FILE).is_file() and (cut / "checkpoint").is_dir()
    with pytest.raises(ValueError, match="another configuration"):  # other mask settings: refused
        unlearner(dataclasses.replace(cfg, mask_ratio=0.6), cut).run()
    resumed = unlearner(cfg, cut).run()
    assert resumed.steps == 4
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n
    # a checkpoint whose mask file is gone cannot be resumed with a mask recomputed from moved weights
    with pytest.raises(Stop):
        unlearner(dataclasses.replace(cfg, eval_every=1), tmp_path / "cut2", stop_at_3).run()
    (tmp_path / "cut2" / MASK_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="mask cannot be recomputed"):
        unlearner(cfg, tmp_path / "cut2").run()


def test_config_records_mask_settings_only_when_masking():
    plain = UnlearnConfig().to_dict()
    assert not {"mask", "mask_ratio", "mask_mu"} & set(plain)  # older run records still compare equal
    assert {"mask": "wagle", "mask_ratio": 0.95}.items() <= UnlearnConfig(mask="wagle", mask_ratio=0.95).to_dict().items()


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw, needle", [
    ({"mask": "snip"}, r"UnlearnConfig.mask must be one of \('salun', 'wagle'\) or None, got 'snip'"),
    ({"mask": "salun", "mask_ratio": 0.0}, r"UnlearnConfig.mask_ratio must be a number in \(0, 1\], got 0.0"),
    ({"mask": "salun", "mask_ratio": 1.5}, r"UnlearnConfig.mask_ratio must be a number in \(0, 1\]"),
    ({"mask": "salun", "mask_ratio": math.nan}, r"UnlearnConfig.mask_ratio must be a number in \(0, 1\]"),
    ({"mask": "wagle", "mask_mu": 0.0}, "UnlearnConfig.mask_mu must be a finite number > 0"),
])
def test_bad_mask_config(kw, needle):
    with pytest.raises(ValueError, match=needle):
        UnlearnConfig(**kw)


def test_bad_mask_arguments(tiny_model, tiny_tokenizer):
    fb = _batches(tiny_tokenizer, FORGET)
    for ratio in (0, -0.1, 1.01, math.inf, True):
        with pytest.raises(ValueError, match=r"mask_ratio must be a number in \(0, 1\]"):
            salun_mask(tiny_model, fb, ratio)
    with pytest.raises(ValueError, match="mu must be a finite number > 0"):
        wagle_mask(tiny_model, fb, fb, 0.5, mu=-1.0)
    with pytest.raises(ValueError, match="the forget batches are empty"):
        salun_mask(tiny_model, [], 0.5)
    with pytest.raises(ValueError, match="mask 'wagle' needs a retain set"):
        Unlearner(tiny_model, tiny_tokenizer, make_objective("ga"), forget=FORGET,
                  config=UnlearnConfig(mask="wagle"))


@pytest.mark.parametrize("extra, needle", [
    (["--mask", "snip"], "unknown --mask 'snip'; choose one of salun, wagle"),
    (["--mask", "salun", "--mask-ratio", "0"], "--mask-ratio must be in (0, 1], got 0.0"),
    (["--mask", "wagle", "--mask-ratio", "1.5"], "--mask-ratio must be in (0, 1], got 1.5"),
    (["--mask", "wagle", "--mask-ratio", "nan"], "--mask-ratio must be in (0, 1], got nan"),
    (["--mask-ratio", "0.5"], "--mask-ratio is a setting of --mask; add --mask salun or --mask wagle"),
])
def test_cli_bad_mask_is_one_line_and_writes_nothing(extra, needle, tmp_path, capsys):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    argv = ["unlearn", "--method", "ga", *extra, "--scale", "demo", "--cache-dir", str(cache), "--no-progress",
            "--out", str(out)]
    assert main(argv) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("soulkit") and needle in err[0], err
    assert not out.exists() and not cache.exists()


def test_cli_accepts_the_mask_flags():
    from soulkit.cli import _mask_overrides, build_parser

    args = build_parser().parse_args(["unlearn", "--method", "ga", "--out", "x", "--mask", "wagle",
                                      "--mask-ratio", "0.95"])
    assert _mask_overrides(args) == {"mask": "wagle", "mask_ratio": 0.95}
    assert _mask_overrides(build_parser().parse_args(["unlearn", "--method", "ga", "--out", "x"])) == {}


def test_cli_unlearn_with_a_mask(tmp_path, monkeypatch, capsys):
    from soulkit.unlearn import suite as suite_mod

    from .test_cli_unlearn import TINY

    monkeypatch.setitem(suite_mod.SCALES, "tiny", TINY)
    out = tmp_path / "out"
    argv = ["unlearn", "--method", "graddiff", "--optimizer", "soul-released", "--split", "forget10",
            "--scale", "tiny", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--out", str(out),
            "--steps", "2", "--lr", "1e-3", "--mask", "salun", "--mask-ratio", "0.25"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["optimizer"], res["config"]["mask"], res["config"]["mask_ratio"]) == ("soul-released", "salun", 0.25)
    assert res["config"]["weight_decay"] == 0.1  # soul-released: SOUL's released weight decay
    mask, meta = load_mask(out / MASK_FILE)
    n = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == math.floor(0.25 * n) and meta["mask"] == "salun"
    capsys.readouterr()
    assert main(argv) == 0  # the same command again: the finished run is reported, nothing recomputed
    assert "holds this run's results already" in capsys.readouterr().out
