"""soulkit.unlearn.checkpoint: the one checkpoint format of training and unlearning runs, written whole or
not at all, read back into a model with its optimizer and scheduler states."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from soulkit.unlearn.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from soulkit.unlearn.models import build_model

from ._corpus import ARCH, _assert_same_state, _state


def _trained(tok, seed=0):
    """A tiny Llama after two AdamW steps, with its optimizer and a LambdaLR scheduler."""
    model = build_model(ARCH, tok, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_round_trip_restores_model_optimizer_and_scheduler(tiny_tokenizer, tmp_path):
    model, opt, sched = _trained(tiny_tokenizer)
    ckpt = tmp_path / "ckpt"
    assert not has_checkpoint(ckpt)
    info = {"step": 2, "log": [{"loss": 1.5}], "config": {"lr": 1e-3}}
    assert save_checkpoint(ckpt, model, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                           info) == ckpt
    assert has_checkpoint(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.pt", "trainer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directories left

    other, opt2, sched2 = _trained(tiny_tokenizer, seed=7)  # different weights until loaded
    states, got = load_checkpoint(ckpt, other)
    assert got == info
    _assert_same_state(_state(model), _state(other))
    assert other.lm_head.weight is other.model.embed_tokens.weight  # the tie holds; stored once
    opt2.load_state_dict(states["optimizer"])
    sched2.load_state_dict(states["scheduler"])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 2


def test_a_new_checkpoint_replaces_the_old_one(tiny_tokenizer, tmp_path):
    model, opt, _ = _trained(tiny_tokenizer)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, {"optimizer": opt.state_dict()}, {"step": 1})
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(ckpt, model, {"optimizer": opt.state_dict()}, {"step": 2})
    fresh = build_model(ARCH, tiny_tokenizer, seed=3)
    assert load_checkpoint(ckpt, fresh)[1] == {"step": 2}
    _assert_same_state(_state(model), _state(fresh))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_write_keeps_the_previous_checkpoint(tiny_tokenizer, tmp_path):
    model, opt, _ = _trained(tiny_tokenizer)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, {"optimizer": opt.state_dict()}, {"step": 1})
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with pytest.raises(TypeError, match="not JSON serialisable"):
        save_checkpoint(ckpt, model, {"optimizer": opt.state_dict()}, {"step": object()})
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(TypeError, match="states must be a dict"):
        save_checkpoint(ckpt, model, opt.state_dict()["param_groups"], {"step": 1})


def test_reading_refuses_a_missing_or_mismatched_checkpoint(tiny_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "none", build_model(ARCH, tiny_tokenizer))
    model, opt, _ = _trained(tiny_tokenizer)
    save_checkpoint(tmp_path / "ckpt", model, {"optimizer": opt.state_dict()}, {})
    wider = build_model(dataclasses.replace(ARCH, num_layers=3), tiny_tokenizer)
    with pytest.raises(ValueError, match=r"does not match the model: missing \['model\.layers\.2"):
        load_checkpoint(tmp_path / "ckpt", wider)


def test_reads_a_bare_optimizer_state_dict(tiny_tokenizer, tmp_path):
    """Unlearning runs used to store the optimizer's state dict itself in optimizer.pt."""
    model, opt, _ = _trained(tiny_tokenizer)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, {"optimizer": opt.state_dict()}, {"step": 2})
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    states, info = load_checkpoint(ckpt, build_model(ARCH, tiny_tokenizer, seed=5))
    assert list(states) == ["optimizer"] and info == {"step": 2}
    assert states["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    assert json.loads((ckpt / "trainer.json").read_text()) == {"step": 2}


def test_given_weights_are_written_and_a_loader_puts_them_in(tiny_tokenizer, tmp_path):
    """weights= (a sharded model's state gathered to full tensors) is what gets written, the model still
    telling which output embedding is tied; load_weights= receives the checked weights instead of
    load_state_dict (a sharded model shards them first)."""
    model, opt, _ = _trained(tiny_tokenizer)
    full = {k: v * 2 for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "ckpt", model, {"optimizer": opt.state_dict()}, {"step": 2}, weights=full)
    other, _, _ = _trained(tiny_tokenizer, seed=7)
    before = _state(other)
    received = {}
    load_checkpoint(tmp_path / "ckpt", other, load_weights=received.update)
    _assert_same_state(_state(other), before)  # the loader, not load_state_dict, had the weights
    assert "lm_head.weight" not in received  # tied: stored once
    assert received.keys() == full.keys() - {"lm_head.weight"}
    assert all(torch.equal(received[k], full[k]) for k in received)
