"""RMU (representation misdirection, Li et al. 2024): the loss by hand, the Unlearner run, the options, the CLI."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from soulkit.cli import main
from soulkit.unlearn.models import ModelConfig, build_model
from soulkit.unlearn.objectives import RMU, frozen_reference, layer_activations, make_objective
from soulkit.unlearn.qa import QADataset, collate_qa, pad_token_id
from soulkit.unlearn.unlearner import UnlearnConfig, Unlearner

from ._corpus import FORGET, RETAIN, _assert_same_state, _state
from .test_cli_unlearn import _one_line_error, _tiny_scale  # noqa: F401 (autouse fixture: the tiny test scale)


def _batch(records, tok):
    ds = QADataset(records, tok)
    return collate_qa([ds[i] for i in range(len(ds))], pad_id=pad_token_id(tok))


def _hidden(model, batch, layer):
    """Block ``layer``'s output from ``output_hidden_states`` (index ``layer + 1``; not the last block)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states[layer + 1]


def test_control_vector_is_seeded_uniform_then_normalised():
    obj = RMU(c=2.0, seed=3)
    g = torch.Generator().manual_seed(3)
    u = torch.rand(32, generator=g, dtype=torch.float64)
    expected = (2.0 * u / u.norm()).float()
    assert torch.allclose(obj.control_vector(32), expected)
    assert torch.equal(obj.control_vector(32), RMU(c=2.0, seed=3).control_vector(32))
    assert (obj.control_vector(32) >= 0).all() and abs(obj.control_vector(32).norm().item() - 2.0) < 1e-5
    assert not torch.equal(obj.control_vector(32), RMU(c=2.0, seed=4).control_vector(32))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_losses_equal_a_hand_computation(arch, tiny_tokenizer):
    model = build_model(ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, max_positions=96),
                        tiny_tokenizer, seed=0).eval()
    fb, rb = _batch(FORGET, tiny_tokenizer), _batch(RETAIN, tiny_tokenizer)
    assert (fb["attention_mask"] == 0).any(), "the forget batch should hold padding"
    obj = RMU(layer=0, c=6.5, alpha=3.0)
    with torch.no_grad():
        h = _hidden(model, fb, 0)
        assert torch.allclose(layer_activations(model, fb, 0), h, atol=1e-6)
        cu = obj.control_vector(32)
        rows = [F.mse_loss(h[i, j], cu) for i in range(h.shape[0]) for j in range(h.shape[1])
                if fb["attention_mask"][i, j]]
        forget = torch.stack(rows).mean()
        # a perturbed copy so that the retain distance is not zero
        other = frozen_reference(model)
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
        hr, hr_ref = _hidden(other, rb, 0), _hidden(model, rb, 0)
        rows = [F.mse_loss(hr[i, j], hr_ref[i, j]) for i in range(hr.shape[0]) for j in range(hr.shape[1])
                if rb["attention_mask"][i, j]]
        retain = torch.stack(rows).mean()
        assert torch.allclose(obj.forget_loss(model, fb), forget, rtol=1e-5)
        out = obj(other, fb, rb, reference=model)
        assert torch.allclose(obj.retain_loss(other, model, rb), retain, rtol=1e-5)
        assert retain > 0
        assert abs(out.metrics["rmu_retain"] - retain.item()) < 1e-6 * max(1.0, retain.item())
        assert torch.allclose(out.loss, obj.forget_loss(other, fb) + 3.0 * retain, rtol=1e-5)


def test_padding_does_not_count(tiny_model, tiny_tokenizer):
    fb = _batch(FORGET, tiny_tokenizer)
    obj = RMU(layer=1)
    pad = pad_token_id(tiny_tokenizer)
    wider = {"input_ids": F.pad(fb["input_ids"], (0, 5), value=pad),
             "attention_mask": F.pad(fb["attention_mask"], (0, 5), value=0),
             "labels": F.pad(fb["labels"], (0, 5), value=-100)}
    other_pad = dict(fb, input_ids=fb["input_ids"].masked_fill(fb["attention_mask"] == 0, 7))
    with torch.no_grad():
        base = obj.forget_loss(tiny_model, fb)
        assert torch.allclose(obj.forget_loss(tiny_model, wider), base, rtol=1e-5)
        assert torch.allclose(obj.forget_loss(tiny_model, other_pad), base, rtol=1e-5)
        # = the token-weighted mean of the unpadded sequences, each run alone
        sums, n = 0.0, 0
        for rec in FORGET:
            one = _batch([rec], tiny_tokenizer)
            k = int(one["attention_mask"].sum())
            sums += obj.forget_loss(tiny_model, one).item() * k
            n += k
        assert abs(base.item() - sums / n) < 1e-5 * max(1.0, abs(base.item()))
        # answer tokens only: the prompt's positions drop out
        ans = RMU(layer=1, tokens="answer")
        h = layer_activations(tiny_model, fb, 1)
        keep = (fb["labels"] != -100).float()
        per = (h - ans.control_vector(h.shape[-1])).pow(2).mean(-1)
        assert torch.allclose(ans.forget_loss(tiny_model, fb), (per * keep).sum() / keep.sum(), rtol=1e-5)


def test_default_layers_and_parameters(tiny_model):
    obj = RMU()
    assert obj.resolved_layer(tiny_model) == 0  # (2 - 1) // 4
    assert obj.trainable_parameters(tiny_model) == ["model.layers.0.mlp.down_proj.weight"]
    assert RMU(layer=1).trainable_parameters(tiny_model) == ["model.layers.0.mlp.down_proj.weight",
                                                            "model.layers.1.mlp.down_proj.weight"]
    gpt2 = build_model(ModelConfig(arch="gpt2", hidden_size=32, num_layers=2, num_heads=2, max_positions=96),
                       vocab_size=50)
    assert RMU(layer=1, update_layers=(1,)).trainable_parameters(gpt2) == ["transformer.h.1.mlp.c_proj.weight"]
    assert RMU(layer=1, params=("mlp.up_proj.weight", "input_layernorm.weight"), update_layers=(1,)
               ).trainable_parameters(tiny_model) == ["model.layers.1.mlp.up_proj.weight",
                                                      "model.layers.1.input_layernorm.weight"]
    big = build_model(ModelConfig(hidden_size=32, num_layers=32, num_heads=2, max_positions=16), vocab_size=50)
    assert RMU().resolved_layer(big) == 7  # the paper's layer for Zephyr-7B's 32 blocks
    assert RMU().resolved_update_layers(big) == (5, 6, 7)


def test_unlearner_moves_forget_activations_and_only_the_chosen_weights(memorised, tiny_tokenizer):
    obj = make_objective("rmu", layer=1, alpha=10.0)
    fb, rb = _batch(FORGET, tiny_tokenizer), _batch(RETAIN, tiny_tokenizer)
    before = _state(memorised)
    result = Unlearner(memorised, tiny_tokenizer, obj, forget=FORGET, retain=RETAIN, optimizer="adamw",
                       config=UnlearnConfig(lr=1e-2, steps=20, batch_size=4, show_progress=False)).run()
    _assert_same_state(before, _state(memorised))  # the input model is untouched
    after = _state(result.model)
    trained = set(obj.trainable_parameters(memorised))
    assert trained == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    for k in before:
        if k in trained:
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k  # bit-identical outside the chosen layers
    assert all(p.requires_grad for p in result.model.parameters())  # restored after the run
    with torch.no_grad():
        f0 = obj.forget_loss(memorised, fb).item()
        f1 = obj.forget_loss(result.model, fb).item()
        r1 = obj.retain_loss(result.model, memorised, rb).item()
    assert f1 < f0 - 0.1 * f0, (f0, f1)  # forget activations move toward c*u
    assert r1 < 0.1 * (f0 - f1), (f0, f1, r1)  # retain activations stay near the frozen model's
    assert [e["step"] for e in result.log] == list(range(1, 21))
    assert {"rmu_forget", "rmu_retain"} <= set(result.log[-1])


def test_alpha_zero_needs_no_retain_set(tiny_model, tiny_tokenizer):
    obj = RMU(layer=1, alpha=0.0)
    assert not obj.needs_retain and not obj.needs_reference
    result = Unlearner(tiny_model, tiny_tokenizer, obj, forget=FORGET, optimizer="adamw",
                       config=UnlearnConfig(lr=1e-3, steps=2, batch_size=4, show_progress=False)).run()
    assert set(result.log[-1]) >= {"rmu_forget"} and "rmu_retain" not in result.log[-1]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"c": 0.0}, "RMU.c must be a finite number > 0"),
        ({"c": -1.0}, "RMU.c must be a finite number > 0"),
        ({"c": float("nan")}, "RMU.c"),
        ({"alpha": -0.5}, "RMU.alpha must be a finite number >= 0"),
        ({"layer": -1}, "RMU.layer must be an int >= 0"),
        ({"layer": 1.5}, "RMU.layer"),
        ({"update_layers": ()}, "RMU.update_layers"),
        ({"params": "mlp.down_proj.weight"}, "RMU.params"),
        ({"tokens": "prompt"}, "RMU.tokens"),
    ],
)
def test_bad_options_raise(kwargs, needle):
    with pytest.raises(ValueError) as err:
        make_objective("rmu", **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"layer": 2}, "RMU.layer must be in [0, 1]"),
        ({"layer": 1, "update_layers": (1, 5)}, "RMU.update_layers must be in [0, 1]"),
        ({"params": ("mlp.nope.weight",)}, "RMU.params: unknown parameter name(s) ['mlp.nope.weight']"),
    ],
)
def test_options_checked_against_the_model(kwargs, needle, tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError) as err:
        Unlearner(tiny_model, tiny_tokenizer, RMU(**kwargs), forget=FORGET, retain=RETAIN)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_gamma_is_not_an_rmu_option():
    with pytest.raises(ValueError, match="gamma"):
        make_objective("rmu", gamma=1.0)


@pytest.mark.parametrize(("optimizer", "mask"), [("sophia", None), ("adamw", "salun"), ("signum", None)])
def test_other_optimizers_and_masks_keep_the_other_weights(optimizer, mask, tiny_model, tiny_tokenizer):
    obj = RMU(layer=1, update_layers=(1,))
    before = _state(tiny_model)
    result = Unlearner(tiny_model, tiny_tokenizer, obj, forget=FORGET, retain=RETAIN, optimizer=optimizer,
                       config=UnlearnConfig(lr=1e-2, steps=3, batch_size=4, mask=mask, show_progress=False,
                                            weight_decay=0.1)).run()
    assert result.stopped == "completed"
    after = _state(result.model)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved == ["model.layers.1.mlp.down_proj.weight"]


# ------------------------------------------------------------------------------------------ CLI
def _bench(cache: Path) -> list[str]:
    return ["--scale", "tiny", "--cache-dir", str(cache), "--no-progress"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--rmu-coeff", "0"], "RMU.c must be a finite number > 0, got 0.0"),
        (["--rmu-coeff", "-2"], "RMU.c must be a finite number > 0"),
        (["--rmu-alpha", "-1"], "RMU.alpha must be a finite number >= 0, got -1.0"),
        (["--rmu-layer", "-1"], "RMU.layer must be an int >= 0"),
        (["--rmu-layer", "2"], "RMU.layer must be in [0, 1] for this model (2 decoder blocks), got 2"),
        (["--rmu-layer", "1", "--rmu-update-layers", "0,7"], "RMU.update_layers must be in [0, 1]"),
        (["--rmu-update-layers", "0,x"], "--rmu-update-layers must be comma-separated block indices"),
        (["--rmu-params", "mlp.nope.weight"], "RMU.params: unknown parameter name(s) ['mlp.nope.weight']"),
        (["--gamma", "1"], "gamma"),
    ],
)
def test_cli_bad_options(extra, needle, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["unlearn", "--method", "rmu", *extra, *_bench(cache), "--out", str(out)]) == 1
    assert needle in _one_line_error(capsys)
    assert not out.exists() and not cache.exists()  # nothing written, nothing trained


def test_cli_rmu_flags_belong_to_rmu(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["unlearn", "--method", "npo", "--rmu-alpha", "5", *_bench(tmp_path / "c"), "--out", str(out)]) == 1
    assert "--rmu-alpha is an option of --method rmu, not --method npo" in _one_line_error(capsys)
    assert not out.exists()


def test_cli_rmu_run(tmp_path, capsys):
    from soulkit.unlearn.models import load_model
    from soulkit.unlearn.suite import UnlearningSuite

    cache = tmp_path / "cache"
    ft = UnlearningSuite.from_scale("tiny", cache_dir=cache, progress=False).finetuned_dir()
    bad = tmp_path / "bad"  # a model directory's architecture is read from its config
    assert main(["unlearn", "--method", "rmu", "--model", str(ft), "--rmu-layer", "9", *_bench(cache),
                 "--out", str(bad)]) == 1
    assert "RMU.layer must be in [0, 1] for this model (2 decoder blocks), got 9" in _one_line_error(capsys)
    assert not bad.exists()
    out = tmp_path / "out"
    argv = ["unlearn", "--method", "rmu", "--optimizer", "adamw", "--split", "forget10", *_bench(cache),
            "--out", str(out), "--steps", "3", "--lr", "1e-2", "--rmu-layer", "1", "--rmu-coeff", "4",
            "--rmu-alpha", "2", "--rmu-update-layers", "1"]
    assert main(argv) == 0
    assert "rmu x adamw: 3 steps" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "rmu" and res["objective"] == "rmu" and res["steps"] == 3
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all("rmu_forget" in e and "rmu_retain" in e for e in log)
    before, _ = load_model(ft)
    after, _ = load_model(out / "model")
    b, a = before.state_dict(), after.state_dict()
    moved = [k for k in b if not torch.equal(b[k], a[k])]
    assert moved == ["model.layers.1.mlp.down_proj.weight"]
