"""The unlearning loop: it forgets, keeps the rest, never touches its input, resumes exactly, and stops
cleanly on a non-finite loss. A tiny Llama first memorises a handful of QA pairs (about a second)."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import soulkit.unlearn.unlearner as unlearner_mod
from soulkit.optim import OPTIMIZERS as ALL_OPTIMIZERS
from soulkit.optim import Sophia
from soulkit.unlearn.evaluate import score_answers
from soulkit.unlearn.models import load_model, model_meta
from soulkit.unlearn.objectives import Objective, ObjectiveOutput, make_objective
from soulkit.unlearn.qa import QA
from soulkit.unlearn.unlearner import ESTIMATORS, OPTIMIZERS, UnlearnConfig, Unlearner

from ._corpus import FORGET, RETAIN, _assert_same_state, _state


def _prob(model, tok, records) -> float:
    """Mean over records of exp(-mean answer-token NLL)."""
    return float(np.exp(-score_answers(model, tok, records)).mean())


def _cfg(**kw) -> UnlearnConfig:
    base = dict(lr=1e-3, steps=6, batch_size=4, show_progress=False)
    base.update(kw)
    return UnlearnConfig(**base)


def _spy_optimizers(monkeypatch) -> list:
    """Record every optimizer the Unlearner builds from a name."""
    made = []
    real = unlearner_mod.make_optimizer

    def spy(*args, **kwargs):
        opt = real(*args, **kwargs)
        made.append(opt)
        return opt

    monkeypatch.setattr(unlearner_mod, "make_optimizer", spy)
    return made


class _Wrapped(Objective):
    """Delegates to ``inner``; subclasses hook ``compute``."""

    name = "wrapped"

    def __init__(self, inner: Objective):
        self.inner = inner
        self.calls = 0

    @property
    def needs_retain(self) -> bool:
        return self.inner.needs_retain

    @property
    def needs_reference(self) -> bool:
        return self.inner.needs_reference

    def prepare_forget(self, records):
        return self.inner.prepare_forget(records)

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        self.calls += 1
        return self.inner.compute(model, forget_batch, retain_batch, reference)


class _NaNAt(_Wrapped):
    """The inner objective, except that call number ``at`` (1-based) returns a NaN loss."""

    def __init__(self, inner: Objective, at: int):
        super().__init__(inner)
        self.at = at

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        out = super().compute(model, forget_batch, retain_batch, reference)
        if self.calls == self.at:
            return ObjectiveOutput(out.loss * float("nan"), dict(out.metrics))
        return out


class _Recorder(_Wrapped):
    """Records the rows (token ids) of every forget and retain batch it sees."""

    def __init__(self, inner: Objective):
        super().__init__(inner)
        self.forget_rows: list[list[tuple]] = []
        self.retain_rows: list[list[tuple]] = []

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        def rows(b):
            return [tuple(t for t, m in zip(ids, mask) if m) for ids, mask in
                    zip(b["input_ids"].tolist(), b["attention_mask"].tolist())]

        self.forget_rows.append(rows(forget_batch))
        self.retain_rows.append(rows(retain_batch) if retain_batch is not None else [])
        return super().compute(model, forget_batch, retain_batch, reference)


# ------------------------------------------------------------------------------------------ unlearning
RUNS = {  # objective -> (make_objective kwargs, lr): 10 steps that halve the forget probability
    "graddiff": (dict(), 1e-3),
    "npo": (dict(retain_loss="nll"), 7e-4),
}


@pytest.mark.parametrize("optimizer", ["adamw", "sophia"])
@pytest.mark.parametrize("objective", sorted(RUNS))
def test_unlearning_forgets_and_keeps_retain(memorised, tiny_tokenizer, optimizer, objective):
    tok = tiny_tokenizer
    kwargs, lr = RUNS[objective]
    before = _state(memorised)
    p_forget0, p_retain0 = _prob(memorised, tok, FORGET), _prob(memorised, tok, RETAIN)
    assert p_forget0 > 0.9 and p_retain0 > 0.9  # the fixture really memorised them

    res = Unlearner(memorised, tok, make_objective(objective, **kwargs), forget=FORGET, retain=RETAIN,
                    optimizer=optimizer, config=_cfg(lr=lr, steps=10)).run()

    _assert_same_state(before, _state(memorised))  # the input model is never modified
    assert res.model is not memorised
    src = {p.data_ptr() for p in memorised.parameters()}
    assert not any(p.data_ptr() in src for p in res.model.parameters())
    assert not res.model.training
    assert res.stopped == "completed" and res.steps == 10 and res.model_dir is None
    assert [e["step"] for e in res.log] == list(range(1, 11))
    assert all(math.isfinite(e["loss"]) and e["lr"] == pytest.approx(lr) for e in res.log)
    assert res.log[-1]["forget_nll"] > res.log[0]["forget_nll"]
    if optimizer == "sophia":
        assert 0.0 <= res.log[0]["win_rate"] <= 1.0

    p_forget, p_retain = _prob(res.model, tok, FORGET), _prob(res.model, tok, RETAIN)
    assert p_forget < 0.6 * p_forget0, (p_forget0, p_forget)  # forgotten: clearly lower
    assert p_retain > 0.5 * p_retain0, (p_retain0, p_retain)  # retained: drops by less than half
    assert p_retain / p_retain0 > p_forget / p_forget0 + 0.2  # and selectively


@pytest.mark.parametrize("optimizer", ["soul-released", "signum"])
def test_soul_released_and_signum_drive_the_loop(memorised, tiny_tokenizer, optimizer):
    res = Unlearner(memorised, tiny_tokenizer, make_objective("graddiff"), forget=FORGET, retain=RETAIN,
                    optimizer=optimizer, config=_cfg(lr=1e-3, steps=4, weight_decay=0.1)).run()
    assert res.stopped == "completed" and res.steps == 4
    assert res.log[-1]["forget_nll"] > res.log[0]["forget_nll"]
    if optimizer == "soul-released":  # its win rate is logged, as Sophia's is
        assert all(0.0 <= e["win_rate"] <= 1.0 for e in res.log)
    else:
        assert all("win_rate" not in e for e in res.log)


def test_epochs_cover_the_forget_set_in_a_seeded_order(memorised, tiny_tokenizer):
    def run(seed):
        rec = _Recorder(make_objective("graddiff"))
        cfg = UnlearnConfig(lr=1e-4, epochs=2, batch_size=2, seed=seed, show_progress=False)
        res = Unlearner(memorised, tiny_tokenizer, rec, forget=FORGET, retain=RETAIN, config=cfg).run()
        return res, rec

    res, rec = run(0)
    assert res.steps == 4  # ceil(2 epochs * 4 records / batch 2)
    assert [len(b) for b in rec.forget_rows] == [2, 2, 2, 2]
    for rows in (rec.forget_rows, rec.retain_rows):
        for epoch in (rows[0] + rows[1], rows[2] + rows[3]):  # each epoch sees every record once
            assert len(set(epoch)) == 4
    _, again = run(0)
    assert again.forget_rows == rec.forget_rows and again.retain_rows == rec.retain_rows
    _, other = run(5)
    assert other.forget_rows != rec.forget_rows or other.retain_rows != rec.retain_rows


def test_grad_accum_micro_batches(memorised, tiny_tokenizer):
    rec = _Recorder(make_objective("graddiff"))
    res = Unlearner(memorised, tiny_tokenizer, rec, forget=FORGET, retain=RETAIN,
                    config=_cfg(steps=3, batch_size=2, grad_accum=2)).run()
    assert res.steps == 3 and len(res.log) == 3 and rec.calls == 6
    for s in range(3):  # one step = two micro-batches = the whole forget set
        assert len(set(rec.forget_rows[2 * s] + rec.forget_rows[2 * s + 1])) == 4


def test_config_total_steps():
    assert UnlearnConfig(epochs=2.5, batch_size=2).total_steps(4) == 5
    assert UnlearnConfig(epochs=1, batch_size=2, grad_accum=2).total_steps(5) == 2
    assert UnlearnConfig(epochs=0.01, batch_size=8).total_steps(4) == 1
    assert UnlearnConfig(steps=7, epochs=100).total_steps(4) == 7


# ------------------------------------------------------------------------------------------ resume
def _resume_setup(optimizer):
    kw = dict(lr=1e-3, steps=6, batch_size=2, checkpoint_every=2, seed=3)
    if optimizer == "sophia":
        kw["optimizer_kwargs"] = {"hessian_update_interval": 2, "rho": 0.05}
    return _cfg(**kw), make_objective("npo", retain_loss="nll")


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw", "sophia"])
def test_resume_gives_the_uninterrupted_result(memorised, tiny_tokenizer, tmp_path, monkeypatch, optimizer):
    tok = tiny_tokenizer
    made = _spy_optimizers(monkeypatch)
    cfg, obj = _resume_setup(optimizer)

    def unlearner(config, out_dir=None, evaluate_fn=None):
        return Unlearner(memorised, tok, obj, forget=FORGET, retain=RETAIN, optimizer=optimizer, config=config,
                         out_dir=out_dir, evaluate_fn=evaluate_fn)

    full = unlearner(cfg, tmp_path / "full").run()
    in_memory = unlearner(cfg).run()

    def crash_at_3(model, step):
        if step == 3:
            raise _Interrupt
        return {"seen": step}

    cut = tmp_path / "cut"
    with pytest.raises(_Interrupt):  # eval_every does not enter the resume check
        unlearner(dataclasses.replace(cfg, eval_every=1), cut, crash_at_3).run()
    assert json.loads((cut / "checkpoint" / "trainer.json").read_text())["step"] == 2
    assert len((cut / "log.jsonl").read_text().splitlines()) == 3
    assert not (cut / "model").exists()

    with pytest.raises(ValueError, match="another configuration"):
        unlearner(dataclasses.replace(cfg, lr=2e-3), cut).run()

    resumed = unlearner(cfg, cut).run()
    assert resumed.stopped == "completed" and resumed.steps == 6
    lines = [json.loads(x) for x in (cut / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == list(range(1, 7))
    assert [e["step"] for e in resumed.log] == list(range(1, 7))
    for a, b, c in zip(full.log, resumed.log, lines):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7) == c["loss"]
    assert resumed.evaluations == [{"step": 1, "seen": 1}, {"step": 2, "seen": 2}]  # from the checkpoint

    _assert_same_state(_state(full.model), _state(resumed.model))
    _assert_same_state(_state(full.model), _state(in_memory.model))
    for d in (tmp_path / "full", cut):
        assert sorted(p.name for p in d.iterdir()) == ["log.jsonl", "model"]  # no checkpoint or temp dirs left
    loaded, _ = load_model(cut / "model")
    _assert_same_state(_state(resumed.model), _state(loaded))
    meta = model_meta(cut / "model")
    assert meta["stage"] == "unlearned" and meta["steps"] == 6 and meta["optimizer"] == optimizer

    if optimizer == "sophia":  # the GNB label sampling after the resume drew what the full run drew
        opt_full, opt_resumed = made[0], made[-1]
        assert isinstance(opt_full, Sophia) and isinstance(opt_resumed, Sophia)
        assert opt_full.num_steps == opt_resumed.num_steps == 6
        assert opt_full.num_hessian_updates == opt_resumed.num_hessian_updates == 3  # steps 0, 2, 4
        s_full, s_res = opt_full.state_dict()["state"], opt_resumed.state_dict()["state"]
        assert s_full.keys() == s_res.keys()
        for i in s_full:
            assert torch.equal(s_full[i]["hessian"], s_res[i]["hessian"]), i
            assert torch.equal(s_full[i]["exp_avg"], s_res[i]["exp_avg"]), i


def test_resume_false_starts_over(memorised, tiny_tokenizer, tmp_path):
    cfg, obj = _resume_setup("adamw")
    out = tmp_path / "run"

    def crash_at_3(model, step):
        if step == 3:
            raise _Interrupt
        return {}

    with pytest.raises(_Interrupt):
        Unlearner(memorised, tiny_tokenizer, obj, forget=FORGET, retain=RETAIN, config=dataclasses.replace(
            cfg, eval_every=1), out_dir=out, evaluate_fn=crash_at_3).run()
    res = Unlearner(memorised, tiny_tokenizer, obj, forget=FORGET, retain=RETAIN,
                    config=dataclasses.replace(cfg, lr=2e-3), out_dir=out, resume=False).run()
    assert res.steps == 6
    assert len((out / "log.jsonl").read_text().splitlines()) == 6


# ------------------------------------------------------------------------------------------ non-finite
@pytest.mark.parametrize("optimizer", ["adamw", "sophia"])
def test_nonfinite_loss_without_checkpoints_restores_the_start(memorised, tiny_tokenizer, optimizer):
    obj = _NaNAt(make_objective("graddiff"), at=3)
    res = Unlearner(memorised, tiny_tokenizer, obj, forget=FORGET, retain=RETAIN, optimizer=optimizer,
                    config=_cfg()).run()
    assert res.stopped == "nonfinite_loss" and res.steps == 0 and res.log == []
    assert obj.calls == 3
    _assert_same_state(_state(memorised), _state(res.model))


@pytest.mark.parametrize("optimizer", ["adamw", "sophia"])
@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_nonfinite_loss_restores_the_last_checkpoint(memorised, tiny_tokenizer, tmp_path, optimizer, on_disk):
    tok = tiny_tokenizer
    kw = dict(steps=6, batch_size=2, checkpoint_every=2, eval_every=1)
    if optimizer == "sophia":
        kw["optimizer_kwargs"] = {"hessian_update_interval": 3}
    evaluated = []

    def evaluate(model, step):
        assert not model.training
        evaluated.append(step)
        return {"p": step}

    # the reference: the same run, stopped after the 2 steps before the last checkpoint (constant lr)
    ref = Unlearner(memorised, tok, make_objective("graddiff"), forget=FORGET, retain=RETAIN,
                    optimizer=optimizer, config=_cfg(**{**kw, "steps": 2, "checkpoint_every": None})).run()
    out = tmp_path / "run" if on_disk else None
    obj = _NaNAt(make_objective("graddiff"), at=4)  # step 4 fails; the last checkpoint is step 2
    res = Unlearner(memorised, tok, obj, forget=FORGET, retain=RETAIN, optimizer=optimizer, config=_cfg(**kw),
                    out_dir=out, evaluate_fn=evaluate).run()

    assert res.stopped == "nonfinite_loss" and res.steps == 2
    assert [e["step"] for e in res.log] == [1, 2]
    assert [e["loss"] for e in res.log] == pytest.approx([e["loss"] for e in ref.log], rel=1e-6)
    _assert_same_state(_state(ref.model), _state(res.model))
    assert evaluated == [1, 2, 3, 2]  # evaluated at steps 1-3, then once more on the restored model
    # evaluations of discarded steps are dropped too (the one at step 3 described a model that is gone)
    assert [e["step"] for e in res.evaluations] == [1, 2, 2]
    if on_disk:
        assert len((out / "log.jsonl").read_text().splitlines()) == 2
        assert not (out / "checkpoint").exists()
        meta = model_meta(out / "model")
        assert meta["stopped"] == "nonfinite_loss" and meta["steps"] == 2
        loaded, _ = load_model(out / "model")
        _assert_same_state(_state(res.model), _state(loaded))


# ------------------------------------------------------------------------------------------ Sophia's Hessian
@pytest.mark.parametrize("objective,per_refresh", [("graddiff", 2), ("npo", 1)])
def test_sophia_gnb_refresh_happens(memorised, tiny_tokenizer, monkeypatch, objective, per_refresh):
    made = _spy_optimizers(monkeypatch)
    calls = []
    real = unlearner_mod.sampled_label_loss

    def counting(*a, **k):  # one sampled-label loss per batch of a refresh
        calls.append(made[0].num_steps)
        return real(*a, **k)

    monkeypatch.setattr(unlearner_mod, "sampled_label_loss", counting)
    retain = RETAIN if objective == "graddiff" else None  # NPO without a retain term: forget batches only
    res = Unlearner(memorised, tiny_tokenizer, make_objective(objective), forget=FORGET, retain=retain,
                    optimizer="sophia", config=_cfg(steps=7, optimizer_kwargs={"hessian_update_interval": 3})).run()
    assert res.steps == 7
    opt = made[0]
    assert opt.num_hessian_updates == 3  # before steps 1, 4 and 7
    assert calls == [n for n in (0, 3, 6) for _ in range(per_refresh)]
    hessians = [opt.state[p]["hessian"] for p in opt.param_groups[0]["params"]]
    assert all(torch.isfinite(h).all() and (h >= 0).all() for h in hessians)
    assert all(float(h.sum()) > 0 for h in hessians)  # every parameter got curvature


def test_sophia_hutchinson_refresh_runs(memorised, tiny_tokenizer, monkeypatch):
    made = _spy_optimizers(monkeypatch)
    calls = []
    real = Sophia.accumulate_hutchinson

    def counting(self, *a, **k):
        calls.append(self.num_steps)
        return real(self, *a, **k)

    monkeypatch.setattr(Sophia, "accumulate_hutchinson", counting)
    p0 = _prob(memorised, tiny_tokenizer, FORGET)
    res = Unlearner(memorised, tiny_tokenizer, make_objective("graddiff"), forget=FORGET, retain=RETAIN,
                    optimizer="sophia", config=_cfg(steps=4, lr=2e-3, estimator="hutchinson",
                                                    optimizer_kwargs={"hessian_update_interval": 3})).run()
    assert res.stopped == "completed" and res.steps == 4
    assert calls == [0, 3]
    opt = made[0]
    assert opt.num_hessian_updates == 2
    hessians = [opt.state[p]["hessian"] for p in opt.param_groups[0]["params"]]
    assert all(torch.isfinite(h).all() for h in hessians)
    assert sum(float(h.abs().sum()) for h in hessians) > 0
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert _prob(res.model, tiny_tokenizer, FORGET) < p0


class _Separable(Objective):
    """``mean_r n_r * sum(w**4) / 12`` for the embedding ``w``, ``n_r`` the forget row's token count: its
    Hessian is ``diag(mean_r n_r * w**2)``, so Hutchinson's ``u * (H u)`` is that diagonal exactly."""

    name = "separable"

    def __init__(self):
        self.rows: list[list[int]] = []  # n_r of every forget batch seen

    def compute(self, model, forget_batch, retain_batch, reference) -> ObjectiveOutput:
        w = model.get_input_embeddings().weight
        n = forget_batch["attention_mask"].sum(1)
        self.rows.append(n.tolist())
        return ObjectiveOutput(n.to(w.dtype).mean() * w.pow(4).sum() / 12)


def test_sophia_hutchinson_refresh_does_not_depend_on_grad_accum(tiny_model, tiny_tokenizer, monkeypatch):
    # the refresh estimates the Hessian of the step's objective: one batch of 4 rows and two micro-batches
    # of 2 (the same rows) give the same h_hat (each micro-batch's loss was once divided by grad_accum
    # before Sophia averaged the calls, so h came out grad_accum times too small)
    made = _spy_optimizers(monkeypatch)
    model = tiny_model.double()
    w0 = model.get_input_embeddings().weight.detach().clone()
    beta2 = 0.99
    objectives = []
    for batch_size, grad_accum in [(4, 1), (2, 2)]:
        objectives.append(_Separable())
        Unlearner(model, tiny_tokenizer, objectives[-1], forget=FORGET, optimizer="sophia",
                  config=_cfg(steps=1, batch_size=batch_size, grad_accum=grad_accum, estimator="hutchinson",
                              optimizer_kwargs={"betas": (0.9, beta2)})).run()
    assert [opt.num_hessian_updates for opt in made] == [1, 1]
    hessians = [opt.state[model_param]["hessian"] for opt in made
                for model_param in [p for p in opt.param_groups[0]["params"] if p.shape == w0.shape][:1]]
    rows = objectives[0].rows[0]  # the refresh of the one-batch run sees all 4 rows
    assert len(rows) == 4 and sorted(objectives[1].rows[0] + objectives[1].rows[1]) == sorted(rows)
    expected = (1 - beta2) * (sum(rows) / len(rows)) * w0.square()
    for h in hessians:
        assert h.dtype == torch.float64
        torch.testing.assert_close(h, expected, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------ lr schedule
def _factors(tok, model, **kw):
    u = Unlearner(model, tok, make_objective("ga"), forget=FORGET, config=_cfg(steps=10, **kw))
    return [u._lr_factor(s) for s in range(10)]


@pytest.mark.parametrize("kw,expected", [
    (dict(), [1.0] * 10),
    (dict(warmup_steps=4), [0.25, 0.5, 0.75] + [1.0] * 7),
    (dict(schedule="linear"), [1 - s / 10 for s in range(10)]),
    (dict(schedule="linear", warmup_steps=2), [0.5, 1.0] + [1 - k / 8 for k in range(8)]),
    (dict(schedule="cosine"), [0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]),
    (dict(schedule="cosine", warmup_steps=5),
     [0.2, 0.4, 0.6, 0.8, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)]),
], ids=["constant", "warmup", "linear", "linear-warmup", "cosine", "cosine-warmup"])
def test_lr_factor(tiny_model, tiny_tokenizer, kw, expected):
    assert _factors(tiny_tokenizer, tiny_model, **kw) == pytest.approx(expected, abs=1e-12)


def test_schedule_reaches_the_optimizer(tiny_model, tiny_tokenizer):
    res = Unlearner(tiny_model, tiny_tokenizer, make_objective("ga"), forget=FORGET,
                    config=_cfg(steps=4, lr=1e-3, schedule="linear", warmup_steps=1)).run()
    assert [e["lr"] for e in res.log] == pytest.approx([1e-3, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])


# ------------------------------------------------------------------------------------------ evaluation, misc
def test_evaluate_fn_schedule_and_mode(tiny_model, tiny_tokenizer):
    modes = []

    def evaluate(model, step):
        modes.append(model.training)
        return {"nll": float(score_answers(model, tiny_tokenizer, FORGET).mean())}

    u = Unlearner(tiny_model, tiny_tokenizer, make_objective("ga"), forget=FORGET,
                  config=_cfg(steps=5, eval_every=2), evaluate_fn=evaluate)
    res = u.run()
    assert [e["step"] for e in res.evaluations] == [2, 4, 5]
    assert all(math.isfinite(e["nll"]) for e in res.evaluations)
    assert modes == [False, False, False]


def test_custom_optimizer_callable(tiny_model, tiny_tokenizer, tmp_path):
    made = []

    def sgd(params):
        made.append(torch.optim.SGD(params, lr=0.05))
        return made[-1]

    before = _state(tiny_model)
    res = Unlearner(tiny_model, tiny_tokenizer, make_objective("ga"), forget=FORGET, optimizer=sgd,
                    config=_cfg(steps=2), out_dir=tmp_path / "sgd").run()
    assert len(made) == 1 and res.steps == 2
    assert any(not torch.equal(before[k], v) for k, v in _state(res.model).items())
    assert model_meta(tmp_path / "sgd" / "model")["optimizer"] == "custom"


def test_optimizers_come_from_the_factory_with_the_config(tiny_model, tiny_tokenizer, monkeypatch):
    assert OPTIMIZERS == ("adamw", "sophia", "soul-released", "signum") and set(OPTIMIZERS) <= set(ALL_OPTIMIZERS)
    assert ESTIMATORS == ("gnb", "hutchinson")
    made = _spy_optimizers(monkeypatch)
    for name, cls, kwargs in [("adamw", torch.optim.AdamW, {"betas": (0.8, 0.9)}),
                              ("sophia", Sophia, {"rho": 0.3, "hessian_update_interval": 4})]:
        cfg = _cfg(steps=1, lr=2e-3, weight_decay=0.01, seed=7, optimizer_kwargs=kwargs)
        Unlearner(tiny_model, tiny_tokenizer, make_objective("ga"), forget=FORGET, optimizer=name, config=cfg).run()
        opt = made[-1]
        assert type(opt) is cls and len(opt.param_groups) == 1  # no decay split: every parameter decayed
        g = opt.param_groups[0]
        assert (g["initial_lr"], g["weight_decay"]) == (2e-3, 0.01)
        assert all((g[k] if k in g else getattr(opt, k)) == v for k, v in kwargs.items())
        assert sum(p.numel() for p in g["params"]) == sum(p.numel() for p in tiny_model.parameters())
    assert made[-1].seed == 7 and made[-1].hessian_update_interval == 4
    cfg = _cfg(steps=1, optimizer_kwargs={"rho": 0.3})  # a Sophia option given to AdamW
    with pytest.raises(TypeError, match="optimizer 'adamw' takes no option 'rho'; its options are: betas"):
        Unlearner(tiny_model, tiny_tokenizer, make_objective("ga"), forget=FORGET, optimizer="adamw",
                  config=cfg).run()


# ------------------------------------------------------------------------------------------ errors
def test_overlapping_forget_and_retain(tiny_model, tiny_tokenizer):
    retain = RETAIN + [QA(FORGET[1].question, "Something else entirely.")]
    with pytest.raises(ValueError, match=r"share 1 question.*What genre does Tomas Berg write\?"):
        Unlearner(tiny_model, tiny_tokenizer, make_objective("graddiff"), forget=FORGET, retain=retain)


def test_empty_forget(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="forget set is empty"):
        Unlearner(tiny_model, tiny_tokenizer, make_objective("ga"), forget=[], retain=RETAIN)


@pytest.mark.parametrize("name,kw", [("graddiff", {}), ("npo", {"retain_loss": "kl"}), ("idk", {})])
def test_objective_needing_retain_without_retain(tiny_model, tiny_tokenizer, name, kw):
    for retain in (None, []):
        with pytest.raises(ValueError, match=f"objective '{name}' needs a retain set"):
            Unlearner(tiny_model, tiny_tokenizer, make_objective(name, **kw), forget=FORGET, retain=retain)


def test_unknown_optimizer_and_bad_objective(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; choose one of adamw, sophia, soul-released, signum$"):
        Unlearner(tiny_model, tiny_tokenizer, make_objective("ga"), forget=FORGET, optimizer="lion")
    # in the factory, but not an optimizer this loop drives (its refreshes need a double backward)
    with pytest.raises(ValueError, match="unknown optimizer 'adahessian'; choose one of adamw, sophia, soul-released, signum$"):
        Unlearner(tiny_model, tiny_tokenizer, make_objective("ga"), forget=FORGET, optimizer="adahessian")
    with pytest.raises(TypeError, match="make_objective"):
        Unlearner(tiny_model, tiny_tokenizer, "npo", forget=FORGET)


def test_parallel_settings_it_cannot_run_are_refused_before_any_work(tiny_model, tiny_tokenizer):
    """What the data-parallel loop does not support fails at construction with one line naming the option
    (the runs themselves: tests/unlearn/test_unlearner_distributed.py)."""

    def make(objective="graddiff", parallel="ddp", **cfg):
        return Unlearner(tiny_model, tiny_tokenizer, make_objective(objective), forget=FORGET, retain=RETAIN,
                         config=_cfg(**cfg), parallel=parallel)

    with pytest.raises(ValueError, match=r"^parallel must be one of \('ddp', 'fsdp2'\) or None, got 'dp'$"):
        make(parallel="dp")
    with pytest.raises(ValueError, match="objective 'rmu' is not supported with parallel='ddp'"):
        make("rmu")
    with pytest.raises(ValueError, match=r"^UnlearnConfig.estimator='hutchinson' is not supported with "
                                         r"parallel='fsdp2'; use 'gnb' \(or parallel='ddp'\)$"):
        make(parallel="fsdp2", estimator="hutchinson")
    with pytest.raises(ValueError, match=r"^UnlearnConfig.mask='salun' is not supported with parallel='fsdp2'"):
        make(parallel="fsdp2", mask="salun")
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group: start the "
                                               "script with torchrun"):
            make()
    # an epoch's last batch must split too (the check the Unlearner and the CLI make, for 2 ranks)
    with pytest.raises(ValueError, match=r"^the forget set \(5 records\) has batches of 1 records with "
                                         r"UnlearnConfig.batch_size=4, which do not split over the world size 2: "
                                         r"use a forget set whose size is a multiple of 2$"):
        unlearner_mod.check_split(5, 4, 2, "forget")
    with pytest.raises(ValueError, match=r"^UnlearnConfig.batch_size=3 must be a multiple of the world size 2"):
        unlearner_mod.check_split(6, 3, 2, "forget")
    unlearner_mod.check_split(6, 8, 2, "retain")  # one batch of 6: 3 rows per rank
    unlearner_mod.check_split(5, 4, 1, "forget")  # one process: anything goes


def test_tokenizer_larger_than_embedding(tiny_model, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_tokens(["<extra-a>", "<extra-b>"])
    with pytest.raises(ValueError, match=f"tokenizer has {len(tok)} tokens.*embedding only "
                                         f"{len(tiny_tokenizer)}.*do not match"):
        Unlearner(tiny_model, tok, make_objective("ga"), forget=FORGET)


def test_existing_model_dir_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    (tmp_path / "model").mkdir()
    u = Unlearner(tiny_model, tiny_tokenizer, make_objective("ga"), forget=FORGET, config=_cfg(steps=1),
                  out_dir=tmp_path)
    with pytest.raises(FileExistsError, match="model"):
        u.run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written


@pytest.mark.parametrize("field,value", [
    ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")), ("lr", float("inf")),
    ("epochs", 0.0), ("epochs", float("nan")), ("steps", 0),
    ("batch_size", 0), ("grad_accum", 0), ("max_length", 0), ("warmup_steps", -1),
    ("schedule", "step"), ("estimator", "exact"), ("grad_clip", 0.0), ("grad_clip", float("nan")),
    ("weight_decay", -0.1), ("weight_decay", float("nan")), ("eval_every", 0), ("checkpoint_every", 0),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"UnlearnConfig\.{field} "):
        UnlearnConfig(**{field: value})


def test_config_accepts_valid_edges():
    c = UnlearnConfig(epochs=0.5, grad_clip=None, warmup_steps=0, eval_every=None, checkpoint_every=None,
                      schedule="cosine", estimator="hutchinson")
    assert c.to_dict()["schedule"] == "cosine"
    UnlearnConfig(epochs=0, steps=3)  # epochs is ignored when steps is given
