"""TOFU-style evaluation of an unlearned causal LM: forget quality, model utility, privacy, extraction.

:func:`evaluate_model` scores a model on the QA sets of :class:`EvalSets` with the pure metric
functions of :mod:`soulkit.unlearn.metrics`. ``l(a)`` is the mean per-token NLL of answer ``a`` given
its question, in the one prompt format of :mod:`soulkit.unlearn.qa` (answer tokens plus eos carry the
loss).

    sets = EvalSets(forget=forget_qa, retain=retain_qa, real_authors=ra_qa, world_facts=wf_qa,
                    holdout=holdout_qa)
    retrained = evaluate_model(retrain_model, tok, sets)             # the gold standard
    results = evaluate_model(unlearned_model, tok, sets, reference=retrained)
    print(format_results(results)); save_results(results, "results.json")

``results["forget_quality"]`` is the KS p-value between this model's and the reference's per-question
truth statistics ``T`` on the forget set; ``results["privleak"]`` compares MIA AUCs with the reference's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._io import atomic_write_json
from .metrics import (
    MIA_ATTACKS,
    _array,
    extraction_strength,
    forget_quality,
    forget_quality_statistic,
    mia_auc,
    mia_loss_score,
    mia_min_k_plus_plus_score,
    mia_min_k_score,
    mia_zlib_score,
    model_utility,
    normalized_probability,
    privleak,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_score,
)
from .qa import (
    QA,
    QADataset,
    answer_logprobs,
    answer_token_stats,
    batched,
    greedy_answers,
    pad_token_id,
    qa_batches,
)

__all__ = [
    "EvalConfig",
    "EvalSets",
    "evaluate_model",
    "format_results",
    "load_results",
    "save_results",
    "score_answers",
]


# ----------------------------------------------------------------------------------------------------
# configuration and data
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalConfig:
    """How :func:`evaluate_model` runs.

    ``max_eval_examples``: cap on the questions used from each set (a deterministic subsample drawn
    with ``seed``, original order kept); ``None``: all. ``min_k``: the k of Min-K% / Min-K%++.
    ``max_length``: passed to :class:`~soulkit.unlearn.qa.QADataset` (left-truncates long prompts).
    """

    batch_size: int = 32
    max_new_tokens: int = 48
    max_eval_examples: int | None = 400
    seed: int = 0
    min_k: float = 0.4
    show_progress: bool = True
    max_length: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"EvalConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("max_eval_examples", "max_length"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"EvalConfig.{name} must be None or an int >= 1, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"EvalConfig.seed must be an int >= 0, got {self.seed!r}")
        k = self.min_k
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
            raise ValueError(f"EvalConfig.min_k must be in (0, 1], got {self.min_k!r}")
        if not isinstance(self.show_progress, bool):
            raise ValueError(f"EvalConfig.show_progress must be a bool, got {self.show_progress!r}")


_SET_NAMES = ("forget", "retain", "real_authors", "world_facts", "holdout")


@dataclass
class EvalSets:
    """The QA sets of one evaluation (plain lists of :class:`~soulkit.unlearn.qa.QA`).

    ``forget`` and ``retain`` need a ``paraphrased_answer`` and perturbed answers on every question;
    ``real_authors`` and ``world_facts`` need perturbed answers (their truth ratio compares against the
    answer itself, as in TOFU). Within a set every question must have the same number of perturbed
    answers. ``holdout``: questions the model never saw, the non-members of the MIA (``None``: no MIA).
    """

    forget: Sequence[QA]
    retain: Sequence[QA]
    real_authors: Sequence[QA]
    world_facts: Sequence[QA]
    holdout: Sequence[QA] | None = None

    def __post_init__(self) -> None:
        for name in _SET_NAMES:
            recs = getattr(self, name)
            if recs is None and name == "holdout":
                continue
            if recs is None or isinstance(recs, (str, bytes)) or not isinstance(recs, Sequence):
                raise ValueError(f"EvalSets.{name} must be a list of QA records, got {type(recs).__name__}")
            recs = list(recs)
            if not recs:
                raise ValueError(f"EvalSets.{name} is empty")
            for i, r in enumerate(recs):
                if not isinstance(r, QA):
                    raise ValueError(f"EvalSets.{name}[{i}] is a {type(r).__name__}, not a QA record")
            setattr(self, name, recs)


def _subsample(records: list[QA], cap: int | None, seed: int, salt: int) -> list[QA]:
    if cap is None or len(records) <= cap:
        return list(records)
    idx = np.sort(np.random.default_rng([seed, salt]).choice(len(records), size=cap, replace=False))
    return [records[i] for i in idx]


def _check_set(name: str, records: list[QA], *, need_paraphrase: bool) -> int:
    """Validate the answers a set needs; returns the number of perturbed answers scored per question:
    the set's minimum (a question with more uses its first ones, so every question is scored alike)."""
    for r in records:
        if need_paraphrase and not (r.paraphrased_answer and r.paraphrased_answer.strip()):
            raise ValueError(f"{name} set: question {r.question!r} has no paraphrased_answer")
        if not r.perturbed_answer:
            raise ValueError(f"{name} set: question {r.question!r} has no perturbed answers")
        for p in r.perturbed_answer:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"{name} set: question {r.question!r} has an empty perturbed answer")
    return min(len(r.perturbed_answer) for r in records)


def _fingerprint(records: Sequence[QA]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.question.encode("utf-8") + b"\x1e" + r.answer.encode("utf-8") + b"\x1f")
    return h.hexdigest()[:16]


def _reference_stat(ref: Any, name: str, fingerprint: str | None) -> np.ndarray:
    if not isinstance(ref, Mapping):
        raise ValueError(f"{name} must be the dict evaluate_model returned, got {type(ref).__name__}")
    raw = ref.get("raw")
    if not isinstance(raw, Mapping) or raw.get("forget_truth_stat") is None:
        raise ValueError(f"{name} has no raw['forget_truth_stat'] (the per-question truth statistics T); "
                         "pass the dict evaluate_model returned for the retrained model")
    try:
        t = _array(raw["forget_truth_stat"], f"{name}['raw']['forget_truth_stat']", 1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from e
    ref_fp = raw.get("forget_fingerprint")
    if fingerprint is not None and ref_fp is not None and ref_fp != fingerprint:
        raise ValueError(f"{name} was evaluated on a different forget set (or subsample) than this "
                         f"evaluation: fingerprint {ref_fp} != {fingerprint}")
    return t


# ----------------------------------------------------------------------------------------------------
# model-driven scoring
# ----------------------------------------------------------------------------------------------------

class _EvalMode:
    """Puts every submodule in eval mode; restores each module's own flag on exit."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, flag in self.modes:
            m.training = flag
        return False


def score_answers(model, tokenizer, records: Sequence[QA], answer_field: str | int = "answer", *,
                  batch_size: int = 32, max_length: int | None = None) -> np.ndarray:
    """Mean per-token NLL ``l(a)`` of one answer of each record given its question, ``[N]`` float64.

    ``answer_field``: ``"answer"``, ``"paraphrased_answer"``, or an int ``i`` for ``perturbed_answer[i]``.
    Batched under ``no_grad`` in eval mode (the model's modes are restored afterwards).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = QADataset(list(records), tokenizer, answer_field=answer_field, max_length=max_length)
    out = []
    with _EvalMode(model), torch.no_grad():
        for batch in qa_batches(ds, batch_size, pad_id=pad_token_id(tokenizer)):
            total, n = answer_logprobs(model, batch)
            out.append((-total.double() / n.double()).cpu().numpy())
    nll = np.concatenate(out)
    if np.isnan(nll).any():
        raise FloatingPointError("the model's answer log-likelihoods are NaN (diverged weights?); "
                                 "there is nothing meaningful to evaluate")
    return nll


def _token_pass(model, tokenizer, records: list[QA], config: EvalConfig) -> dict[str, np.ndarray]:
    """One teacher-forced pass over the answers: mean NLL, the four MIA scores, extraction strength."""
    ds = QADataset(records, tokenizer, answer_field="answer", max_length=config.max_length)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("nll", *MIA_ATTACKS, "es")}
    with _EvalMode(model), torch.no_grad():
        batches = qa_batches(ds, config.batch_size, pad_id=pad_token_id(tokenizer))
        for batch, recs in zip(batches, batched(records, config.batch_size), strict=True):
            st = answer_token_stats(model, batch)
            lp, mu, sd, mask = st["logprob"], st["mean"], st["std"], st["mask"]
            loss = mia_loss_score(lp, mask)
            parts["nll"].append(-loss)
            parts["loss"].append(loss)
            parts["zlib"].append(mia_zlib_score(lp, mask, [r.answer.strip() for r in recs]))
            parts["min_k"].append(mia_min_k_score(lp, mask, config.min_k))
            parts["min_k_plus_plus"].append(mia_min_k_plus_plus_score(lp, mu, sd, mask, config.min_k))
            parts["es"].append(extraction_strength(st["correct"], mask))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _floats(a: np.ndarray) -> list[float]:
    return [float(x) for x in a]


def evaluate_model(model, tokenizer, sets: EvalSets, *, config: EvalConfig | None = None,
                   reference: Mapping[str, Any] | None = None,
                   ceiling_reference: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` TOFU-style on ``sets``; returns a JSON-serialisable dict of plain floats/lists.

    Per set (``l`` = mean per-token answer NLL, ``R`` = :func:`truth_ratio`):

    * forget, retain: probability ``mean exp(-l(answer))``; ROUGE-L recall of the greedy answer;
      truth ratio from the paraphrased vs perturbed answers, reported ``mean(min(R, 1/R))`` on forget
      and ``mean(max(0, 1 - R))`` on retain.
    * real_authors, world_facts: :func:`normalized_probability` of the answer against the perturbed
      answers; ROUGE-L recall; truth ratio of the answer vs the perturbed answers, ``mean(max(0, 1-R))``.
    * ``model_utility``: harmonic mean of the 9 {probability, rouge, truth_ratio} x {retain,
      real_authors, world_facts}.
    * ``mia_auc``: ``{"loss", "zlib", "min_k", "min_k_plus_plus"}`` AUCs of forget (members) vs holdout
      (non-members) answers; ``None`` without a holdout set. ``extraction_strength``: mean ES on forget.

    ``reference``: the dict this function returned for the retrained (gold standard) model on the same
    sets and config. Then ``forget_quality``/``ks_statistic`` are the KS p-value/statistic between this
    model's per-question ``T`` (:func:`forget_quality_statistic`) and ``reference["raw"]
    ["forget_truth_stat"]``, and ``privleak`` holds :func:`privleak` per attack against
    ``reference["mia_auc"]`` (an entry is ``None``, with a warning, where the reference AUC is 1 or
    missing). Without a reference all three are ``None``.

    ``ceiling_reference``: a second retrain (another seed), requires ``reference``. Then
    ``forget_quality_ceiling``/``ks_statistic_ceiling`` compare the two retrains' ``T`` -- the best
    forget quality seed noise allows, the same for every model evaluated against these references.

    ``raw`` keeps per-question ``forget_truth_stat`` (T), ``forget_truth_ratio`` (R),
    ``forget_extraction_strength``, the MIA AUCs and a fingerprint of the (subsampled) forget set,
    so this dict can later serve as ``reference=``. ``config``: :class:`EvalConfig` (``None``: defaults).
    The model is not modified; each module's train/eval mode is restored.
    """
    if not isinstance(sets, EvalSets):
        raise TypeError(f"sets must be an EvalSets, got {type(sets).__name__}")
    config = EvalConfig() if config is None else config
    if not isinstance(config, EvalConfig):
        raise TypeError(f"config must be an EvalConfig, got {type(config).__name__}")
    if ceiling_reference is not None and reference is None:
        raise ValueError("ceiling_reference needs reference (the ceiling compares two retrained models)")
    t0 = time.perf_counter()

    chosen: dict[str, list[QA] | None] = {}
    for salt, name in enumerate(_SET_NAMES):
        recs = getattr(sets, name)
        if recs is None:
            chosen[name] = None
            continue
        if len(recs) == 0:
            raise ValueError(f"the {name} set is empty")
        chosen[name] = _subsample(list(recs), config.max_eval_examples, config.seed, salt)
    n_pert = {
        "forget": _check_set("forget", chosen["forget"], need_paraphrase=True),
        "retain": _check_set("retain", chosen["retain"], need_paraphrase=True),
        "real_authors": _check_set("real_authors", chosen["real_authors"], need_paraphrase=False),
        "world_facts": _check_set("world_facts", chosen["world_facts"], need_paraphrase=False),
    }
    fp = _fingerprint(chosen["forget"])
    ref_t = _reference_stat(reference, "reference", fp) if reference is not None else None
    ceil_t = None
    if ceiling_reference is not None:
        ceil_t = _reference_stat(ceiling_reference, "ceiling_reference", fp)

    # stages: per set one pass per answer kind plus greedy generation; holdout: one pass
    n_stages = sum(1 + (name in ("forget", "retain")) + n_pert[name] + 1 for name in n_pert)
    n_stages += chosen["holdout"] is not None
    bs, ml = config.batch_size, config.max_length
    res: dict[str, Any] = {}
    raw: dict[str, Any] = {}

    with _EvalMode(model), tqdm(total=n_stages, desc="evaluate", disable=not config.show_progress) as bar:
        def stage(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)

        def scored(name: str, field: str | int) -> np.ndarray:
            stage(f"{name}:{field}")
            out = score_answers(model, tokenizer, chosen[name], field, batch_size=bs, max_length=ml)
            bar.update(1)
            return out

        def rouge(name: str) -> np.ndarray:
            stage(f"{name}:generate")
            recs = chosen[name]
            gen = greedy_answers(model, tokenizer, [r.question for r in recs],
                                 max_new_tokens=config.max_new_tokens, batch_size=bs)
            bar.update(1)
            return rouge_l_recall(gen, [r.answer for r in recs])

        def perturbed(name: str) -> np.ndarray:
            return np.stack([scored(name, i) for i in range(n_pert[name])], axis=1)

        # forget: one token-level pass gives the answer NLL, MIA scores and extraction strength
        stage("forget:answer")
        forget_tok = _token_pass(model, tokenizer, chosen["forget"], config)
        bar.update(1)
        para = scored("forget", "paraphrased_answer")
        pert = perturbed("forget")
        r_forget = truth_ratio(para, pert)
        t_forget = forget_quality_statistic(para, pert)
        res["forget_probability"] = float(np.mean(np.exp(-forget_tok["nll"])))
        res["forget_rouge"] = float(np.mean(rouge("forget")))
        res["forget_truth_ratio"] = truth_ratio_score(r_forget, forget=True)

        nll = scored("retain", "answer")
        para = scored("retain", "paraphrased_answer")
        pert = perturbed("retain")
        res["retain_probability"] = float(np.mean(np.exp(-nll)))
        res["retain_rouge"] = float(np.mean(rouge("retain")))
        res["retain_truth_ratio"] = truth_ratio_score(truth_ratio(para, pert), forget=False)

        for name in ("real_authors", "world_facts"):
            nll = scored(name, "answer")
            pert = perturbed(name)
            res[f"{name}_probability"] = float(np.mean(normalized_probability(nll, pert)))
            res[f"{name}_rouge"] = float(np.mean(rouge(name)))
            res[f"{name}_truth_ratio"] = truth_ratio_score(truth_ratio(nll, pert), forget=False)

        aucs = None
        if chosen["holdout"] is not None:
            stage("holdout:answer")
            hold_tok = _token_pass(model, tokenizer, chosen["holdout"], config)
            bar.update(1)
            aucs = {a: mia_auc(forget_tok[a], hold_tok[a]) for a in MIA_ATTACKS}

    utility_keys = [f"{s}_{m}" for s in ("retain", "real_authors", "world_facts")
                    for m in ("probability", "rouge", "truth_ratio")]
    fq = ks = fq_ceil = ks_ceil = None
    if ref_t is not None:
        fq, ks = forget_quality(t_forget, ref_t)
    if ceil_t is not None:
        fq_ceil, ks_ceil = forget_quality(ref_t, ceil_t)
    leak = None
    if reference is not None and aucs is not None:
        ref_aucs = reference.get("mia_auc")
        if not isinstance(ref_aucs, Mapping):
            warnings.warn("reference has no mia_auc (evaluated without a holdout set?): privleak is None",
                          stacklevel=2)
        else:
            leak = {}
            for a in MIA_ATTACKS:
                ref_auc = ref_aucs.get(a)
                try:
                    leak[a] = privleak(aucs[a], ref_auc) if ref_auc is not None else None
                except ValueError as e:
                    warnings.warn(f"privleak[{a!r}] is None: {e}", stacklevel=2)
                    leak[a] = None
                if ref_auc is None:
                    warnings.warn(f"reference mia_auc has no {a!r}: privleak[{a!r}] is None", stacklevel=2)

    raw.update({
        "forget_truth_stat": _floats(t_forget),
        "forget_truth_ratio": _floats(r_forget),
        "forget_extraction_strength": _floats(forget_tok["es"]),
        "forget_fingerprint": fp,
        "mia_auc": dict(aucs) if aucs is not None else None,
    })
    out: dict[str, Any] = {
        "forget_quality": fq,
        "ks_statistic": ks,
        "forget_quality_ceiling": fq_ceil,
        "ks_statistic_ceiling": ks_ceil,
        "model_utility": model_utility([res[k] for k in utility_keys]),
        **res,
        "mia_auc": dict(aucs) if aucs is not None else None,
        "privleak": leak,
        "extraction_strength": float(np.mean(forget_tok["es"])),
        "n_examples": {name: (len(recs) if recs is not None else 0) for name, recs in chosen.items()},
        "eval_seconds": time.perf_counter() - t0,
        "config": asdict(config),
        "raw": raw,
    }
    return out


# ----------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------

_HEADLINE = [
    ("forget_quality", "Forget quality (KS p-value)"),
    ("ks_statistic", "KS statistic"),
    ("forget_quality_ceiling", "Forget quality ceiling (retrain vs retrain)"),
    ("model_utility", "Model utility"),
    ("forget_probability", "Forget probability"),
    ("forget_rouge", "Forget ROUGE-L recall"),
    ("forget_truth_ratio", "Forget truth ratio"),
    ("retain_probability", "Retain probability"),
    ("retain_rouge", "Retain ROUGE-L recall"),
    ("retain_truth_ratio", "Retain truth ratio"),
    ("real_authors_probability", "Real authors probability"),
    ("real_authors_rouge", "Real authors ROUGE-L recall"),
    ("real_authors_truth_ratio", "Real authors truth ratio"),
    ("world_facts_probability", "World facts probability"),
    ("world_facts_rouge", "World facts ROUGE-L recall"),
    ("world_facts_truth_ratio", "World facts truth ratio"),
    ("extraction_strength", "Extraction strength (forget)"),
]


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_results(results: Mapping[str, Any]) -> str:
    """A markdown table (metric | value) of the headline fields of :func:`evaluate_model`'s dict."""
    rows = [(label, results.get(key)) for key, label in _HEADLINE]
    for key, label in (("mia_auc", "MIA AUC"), ("privleak", "PrivLeak")):
        d = results.get(key)
        for a in MIA_ATTACKS:
            rows.append((f"{label} ({a})", d.get(a) if isinstance(d, Mapping) else None))
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {label} | {_fmt(v)} |" for label, v in rows]
    return "\n".join(lines) + "\n"


def save_results(results: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``results`` as strict JSON atomically (temporary file beside ``path``, then ``os.replace``)."""
    atomic_write_json(path, dict(results))


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results dict written by :func:`save_results`."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a results dict (found {type(data).__name__})")
    return data
