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
    TRUTH_RATIO_MODES,
    _array,
    answer_probability,
    exact_memorization,
    extraction_strength,
    forget_quality,
    forget_quality_statistic,
    mia_auc,
    mia_gradnorm_score,
    mia_loss_score,
    mia_min_k_plus_plus_score,
    mia_min_k_score,
    mia_reference_score,
    mia_zlib_score,
    model_utility,
    normalized_probability,
    privleak,
    rouge_scores,
    truth_ratio,
    truth_ratio_score,
)
from .qa import (
    QA,
    QADataset,
    answer_gradient_norms,
    answer_logprobs,
    answer_token_stats,
    batched,
    context_limit,
    generation_budget,
    greedy_answers,
    pad_token_id,
    qa_batches,
)

__all__ = [
    "EVAL_SUBSETS",
    "EvalConfig",
    "EvalSets",
    "evaluate_model",
    "format_results",
    "load_results",
    "save_results",
    "conventions",
    "score_answers",
]


# ----------------------------------------------------------------------------------------------------
# configuration and data
# ----------------------------------------------------------------------------------------------------

EVAL_SUBSETS = ("seeded", "first")


@dataclass(frozen=True)
class EvalConfig:
    """How :func:`evaluate_model` runs. The defaults are the reference implementations' settings
    wherever published numbers depend on them (each choice is recorded in ``results["config"]``,
    see :func:`conventions`).

    * ``max_eval_examples``: questions used from each set; ``None`` (default): all of them, as
      open-unlearning. An int ``n`` takes ``n`` per set: with ``subset="seeded"`` a deterministic
      subsample drawn with ``seed`` (original order kept), with ``subset="first"`` the first ``n``
      (TOFU's released code evaluates the first 300).
    * ``max_new_tokens``: greedy generation length for ROUGE, 200 as the references (open-unlearning's
      ``max_new_tokens``; TOFU caps prompt + answer at 200 tokens); cut to fit the model's context.
      A model that answers and stops costs the same at 200 as at 40; one that does not stop (e.g.
      after gradient ascent) generates up to 5x the tokens of 40, and its ROUGE recall can only rise.
    * ``truth_ratio``: ``"geometric"`` (default; TOFU's code, open-unlearning) or ``"arithmetic"``
      (the TOFU paper's formula), see :func:`~soulkit.unlearn.metrics.truth_ratio`. It changes the
      reported truth ratios and model utility, not forget quality.
    * ``min_k``: the k of Min-K% / Min-K%++. ``gradnorm_p``: the norm of the GradNorm attack (2, as
      open-unlearning; 1 or ``inf``), ``None`` to skip it (it costs one backward pass per forget and
      holdout question).
    * ``max_length``: passed to :class:`~soulkit.unlearn.qa.QADataset` (left-truncates long prompts).
    """

    batch_size: int = 32
    max_new_tokens: int = 200
    max_eval_examples: int | None = None
    subset: str = "seeded"
    seed: int = 0
    min_k: float = 0.4
    truth_ratio: str = "geometric"
    gradnorm_p: float | None = 2.0
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
                raise ValueError(f"EvalConfig.{name} must be None (all) or an int >= 1, got {v!r}")
        if self.subset not in EVAL_SUBSETS:
            raise ValueError(f"EvalConfig.subset must be one of {', '.join(EVAL_SUBSETS)}, got {self.subset!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"EvalConfig.seed must be an int >= 0, got {self.seed!r}")
        k = self.min_k
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
            raise ValueError(f"EvalConfig.min_k must be in (0, 1], got {self.min_k!r}")
        if self.truth_ratio not in TRUTH_RATIO_MODES:
            raise ValueError(f"EvalConfig.truth_ratio must be one of {', '.join(TRUTH_RATIO_MODES)}, "
                             f"got {self.truth_ratio!r}")
        if self.gradnorm_p is not None and (isinstance(self.gradnorm_p, bool)
                                            or self.gradnorm_p not in (1, 2, float("inf"))):
            raise ValueError(f"EvalConfig.gradnorm_p must be 1, 2, inf or None, got {self.gradnorm_p!r}")
        if not isinstance(self.show_progress, bool):
            raise ValueError(f"EvalConfig.show_progress must be a bool, got {self.show_progress!r}")


def conventions(config: EvalConfig) -> dict[str, str]:
    """The choices behind :func:`evaluate_model`'s numbers, in words (stored in ``results["config"]``)."""
    if config.truth_ratio == "geometric":
        tr = ("geometric: R = exp(l(para) - mean_p l(pert_p)), as TOFU's released code and open-unlearning "
              "(published truth ratios and model utilities)")
    else:
        tr = "arithmetic: R = mean_p exp(l(para) - l(pert_p)), the TOFU paper's formula (not its code's)"
    n = config.max_eval_examples
    if n is None:
        questions = "all questions of each set (open-unlearning)"
    elif config.subset == "first":
        questions = f"the first {n} questions of each set (TOFU's code takes the first 300)"
    else:
        questions = f"a seeded subsample of {n} questions per set (seed {config.seed}; references: all / first 300)"
    return {
        "truth_ratio": tr,
        "forget_quality": "KS test of T = exp(mean_p l(pert_p) - l(para)) per forget question against the "
                          "reference's (TOFU's code, open-unlearning)",
        "answer_tokens": "probability, truth ratio, LOSS, zlib and reference MIAs: mean NLL over the answer "
                         "tokens and the final EOS prediction (TOFU, open-unlearning)",
        "text_tokens": "Min-K%, Min-K%++, GradNorm, extraction strength, exact memorization: the answer's "
                       "text tokens, final EOS prediction dropped (open-unlearning)",
        "extraction_strength": "1 - k/|y|, k = |y| when even the last text token is wrong (the definition; "
                               "open-unlearning's loop gives 1/|y| there)",
        "min_k_plus_plus": "sigma floored at 1e-3 (variance 1e-6, open-unlearning)",
        "gradnorm": ("off" if config.gradnorm_p is None else
                     f"mean over parameter tensors of the {config.gradnorm_p:g}-norm of the gradient of the "
                     "mean text-token NLL, one question at a time (open-unlearning)"),
        "zlib_text": "answer.strip() as UTF-8 (open-unlearning: its decoded label tokens)",
        "reference_mia": "l_reference - l per answer, the reference being the model of `reference` (the "
                         "retrain; open-unlearning: a retain model)",
        "generation": f"greedy, at most {config.max_new_tokens} new tokens, cut at the first eos and to fit the "
                      "model's context (references: 200); rouge = ROUGE-L recall against the answer (TOFU)",
        "questions": questions,
    }


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


def _subsample(records: list[QA], cap: int | None, seed: int, salt: int, subset: str = "seeded") -> list[QA]:
    if cap is None or len(records) <= cap:
        return list(records)
    if subset == "first":
        return list(records[:cap])
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


def _token_pass(model, tokenizer, records: list[QA], config: EvalConfig, *, mia: bool) -> dict[str, np.ndarray]:
    """One teacher-forced pass over the answers: mean NLL (answer + EOS), extraction strength and exact
    memorization (text tokens); with ``mia`` the MIA scores too (GradNorm: one backward per question)."""
    ds = QADataset(records, tokenizer, answer_field="answer", max_length=config.max_length)
    eos = tokenizer.eos_token_id
    keys = ["nll", "es", "em"] + (list(_model_attacks(config)) if mia else [])
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    with _EvalMode(model):
        batches = qa_batches(ds, config.batch_size, pad_id=pad_token_id(tokenizer))
        for batch, recs in zip(batches, batched(records, config.batch_size), strict=True):
            with torch.no_grad():
                st = answer_token_stats(model, batch, eos_token_id=eos)
            lp, mu, sd, mask, text = st["logprob"], st["mean"], st["std"], st["mask"], st["text_mask"]
            loss = mia_loss_score(lp, mask)  # every answer token and the final EOS (as the loss of TOFU)
            parts["nll"].append(-loss)
            parts["es"].append(extraction_strength(st["correct"], text))
            parts["em"].append(exact_memorization(st["correct"], text))
            if not mia:
                continue
            parts["loss"].append(loss)
            parts["zlib"].append(mia_zlib_score(lp, mask, [r.answer.strip() for r in recs]))
            parts["min_k"].append(mia_min_k_score(lp, text, config.min_k))
            parts["min_k_plus_plus"].append(mia_min_k_plus_plus_score(lp, mu, sd, text, config.min_k))
            if config.gradnorm_p is not None:
                norms = answer_gradient_norms(model, batch, p=config.gradnorm_p, eos_token_id=eos)
                parts["gradnorm"].append(mia_gradnorm_score(norms))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _model_attacks(config: EvalConfig) -> tuple[str, ...]:
    return tuple(a for a in MIA_ATTACKS if a != "gradnorm" or config.gradnorm_p is not None)


def _json_number(v: float | None) -> float | str | None:
    return "inf" if v == float("inf") else v


def _floats(a: np.ndarray) -> list[float]:
    return [float(x) for x in a]


def _reference_nll(ref: Mapping[str, Any], fp_forget: str, fp_holdout: str | None) -> tuple | None:
    """The reference's per-question forget and holdout NLLs, when it has them for the same questions."""
    raw = ref.get("raw") if isinstance(ref, Mapping) else None
    if not isinstance(raw, Mapping) or raw.get("forget_nll") is None or raw.get("holdout_nll") is None:
        return None
    if raw.get("forget_fingerprint") != fp_forget or raw.get("holdout_fingerprint") != fp_holdout:
        return None
    return (_array(raw["forget_nll"], "reference['raw']['forget_nll']", 1),
            _array(raw["holdout_nll"], "reference['raw']['holdout_nll']", 1))


def _mia_mismatch(ref: Mapping[str, Any], config: EvalConfig) -> str | None:
    """Why the reference's MIA AUCs are not comparable with this evaluation's (None: they are)."""
    ref_conf = ref.get("config")
    ours = conventions(config)
    if not isinstance(ref_conf, Mapping) or not isinstance(ref_conf.get("conventions"), Mapping):
        return "it was evaluated by an older soulkit (no config.conventions): re-evaluate it"
    theirs = ref_conf["conventions"]
    for key in ("answer_tokens", "text_tokens", "min_k_plus_plus", "zlib_text"):
        if theirs.get(key) != ours[key]:
            return f"its {key} convention differs ({theirs.get(key)!r})"
    if ref_conf.get("min_k") != config.min_k:
        return f"its min_k is {ref_conf.get('min_k')!r}, this evaluation's {config.min_k!r}"
    return None


def evaluate_model(model, tokenizer, sets: EvalSets, *, config: EvalConfig | None = None,
                   reference: Mapping[str, Any] | None = None,
                   ceiling_reference: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` TOFU-style on ``sets``; returns a JSON-serialisable dict of plain floats/lists.

    Per set (``l`` = mean per-token answer NLL, ``R`` = :func:`~soulkit.unlearn.metrics.truth_ratio` in
    ``config.truth_ratio``'s mode, geometric by default; ``gen`` = the greedy answer to the question):

    * forget, retain: ``probability`` ``mean exp(-l(answer))``; ``rouge`` ROUGE-L recall of ``gen``
      against the answer; ``truth_ratio`` from the paraphrased vs perturbed answers, reported
      ``mean(min(R, 1/R))`` on forget and ``mean(max(0, 1 - R))`` on retain; ``para_probability``
      ``mean exp(-l(para))``, ``pert_probability`` ``mean_q mean_p exp(-l(pert_p))``, ``para_rouge`` /
      ``pert_rouge`` ROUGE-L recall of ``gen`` against the paraphrased / each perturbed answer (mean
      over them); ``rouge1_recall`` and ``rougeL_f1`` of ``gen`` against the answer.
      ``extraction_strength`` (forget) / ``retain_extraction_strength`` and ``exact_memorization``
      (forget) / ``retain_exact_memorization``: mean over questions.
    * real_authors, world_facts: :func:`~soulkit.unlearn.metrics.normalized_probability` of the answer
      against the perturbed answers; ROUGE-L recall (and ``rouge1_recall``, ``rougeL_f1``); truth ratio
      of the answer vs the perturbed answers, ``mean(max(0, 1-R))``.
    * ``model_utility``: harmonic mean of the 9 {probability, rouge, truth_ratio} x {retain,
      real_authors, world_facts}.
    * ``mia_auc``: AUCs of forget (members) vs holdout (non-members) answers for ``loss``, ``zlib``,
      ``min_k``, ``min_k_plus_plus``, ``gradnorm`` (unless ``config.gradnorm_p`` is None) and, with a
      ``reference`` evaluated on the same forget and holdout questions, ``reference``
      (:func:`~soulkit.unlearn.metrics.mia_reference_score` against the reference model's NLLs);
      ``None`` without a holdout set.

    Which tokens each metric scores, the zlib text, the generation length and the questions used are
    the reference implementations' by default; :func:`conventions` spells them out and
    ``results["config"]["conventions"]`` records them; ``results["generation"]`` the new-token budget
    each set got.

    ``reference``: the dict this function returned for the retrained (gold standard) model on the same
    sets and config. Then ``forget_quality``/``ks_statistic`` are the KS p-value/statistic between this
    model's per-question ``T`` (:func:`~soulkit.unlearn.metrics.forget_quality_statistic`) and
    ``reference["raw"]["forget_truth_stat"]``, and ``privleak`` holds
    :func:`~soulkit.unlearn.metrics.privleak` per single-model attack against ``reference["mia_auc"]``
    (an entry is ``None``, with a warning, where the reference AUC is 1 or missing, or all are when the
    reference scored its MIAs by other conventions). Without a reference all three are ``None``.

    ``ceiling_reference``: a second retrain (another seed), requires ``reference``. Then
    ``forget_quality_ceiling``/``ks_statistic_ceiling`` compare the two retrains' ``T`` -- the best
    forget quality seed noise allows, the same for every model evaluated against these references.

    ``raw`` keeps per-question ``forget_truth_stat`` (T), ``forget_truth_ratio`` (R),
    ``forget_extraction_strength``, ``forget_nll`` and ``holdout_nll``, the MIA AUCs and fingerprints
    of the (subsampled) forget and holdout sets, so this dict can later serve as ``reference=``.
    ``config``: :class:`EvalConfig` (``None``: defaults). The model is not modified; each module's
    train/eval mode is restored.
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
        chosen[name] = _subsample(list(recs), config.max_eval_examples, config.seed, salt, config.subset)
    n_pert = {
        "forget": _check_set("forget", chosen["forget"], need_paraphrase=True),
        "retain": _check_set("retain", chosen["retain"], need_paraphrase=True),
        "real_authors": _check_set("real_authors", chosen["real_authors"], need_paraphrase=False),
        "world_facts": _check_set("world_facts", chosen["world_facts"], need_paraphrase=False),
    }
    fp = _fingerprint(chosen["forget"])
    fp_hold = _fingerprint(chosen["holdout"]) if chosen["holdout"] is not None else None
    ref_t = _reference_stat(reference, "reference", fp) if reference is not None else None
    ceil_t = None
    if ceiling_reference is not None:
        ceil_t = _reference_stat(ceiling_reference, "ceiling_reference", fp)
    budget = {name: generation_budget(model, tokenizer, [r.question for r in chosen[name]], config.max_new_tokens)
              for name in n_pert}

    # stages: per set one pass per answer kind plus greedy generation; holdout: one pass
    n_stages = sum(1 + (name in ("forget", "retain")) + n_pert[name] + 1 for name in n_pert)
    n_stages += chosen["holdout"] is not None
    bs, ml = config.batch_size, config.max_length
    mode = config.truth_ratio
    res: dict[str, Any] = {}

    with _EvalMode(model), tqdm(total=n_stages, desc="evaluate", disable=not config.show_progress) as bar:
        def stage(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)

        def scored(name: str, field: str | int) -> np.ndarray:
            stage(f"{name}:{field}")
            out = score_answers(model, tokenizer, chosen[name], field, batch_size=bs, max_length=ml)
            bar.update(1)
            return out

        def tokens(name: str, mia: bool) -> dict[str, np.ndarray]:
            stage(f"{name}:answer")
            out = _token_pass(model, tokenizer, chosen[name], config, mia=mia)
            bar.update(1)
            return out

        def generate(name: str) -> list[str]:
            stage(f"{name}:generate")
            gen = greedy_answers(model, tokenizer, [r.question for r in chosen[name]],
                                 max_new_tokens=budget[name], batch_size=bs)
            bar.update(1)
            return gen

        def rouge(name: str, gen: list[str]) -> None:
            recs = chosen[name]
            sc = rouge_scores(gen, [r.answer for r in recs])
            res[f"{name}_rouge"] = float(np.mean(sc["rougeL_recall"]))
            res[f"{name}_rouge1_recall"] = float(np.mean(sc["rouge1_recall"]))
            res[f"{name}_rougeL_f1"] = float(np.mean(sc["rougeL_f1"]))

        def perturbed(name: str) -> np.ndarray:
            return np.stack([scored(name, i) for i in range(n_pert[name])], axis=1)

        # forget and retain: one token-level pass gives the answer NLL, extraction and (forget) MIA scores
        tok: dict[str, dict[str, np.ndarray]] = {}
        r_forget = t_forget = None
        for name in ("forget", "retain"):
            tok[name] = tokens(name, mia=name == "forget")
            para = scored(name, "paraphrased_answer")
            pert = perturbed(name)
            r = truth_ratio(para, pert, mode)
            if name == "forget":
                r_forget, t_forget = r, forget_quality_statistic(para, pert)
            gen = generate(name)
            recs = chosen[name]
            res[f"{name}_probability"] = float(np.mean(np.exp(-tok[name]["nll"])))
            rouge(name, gen)
            res[f"{name}_truth_ratio"] = truth_ratio_score(r, forget=name == "forget")
            res[f"{name}_para_probability"] = float(np.mean(answer_probability(para)))
            res[f"{name}_pert_probability"] = float(np.mean(answer_probability(pert)))
            res[f"{name}_para_rouge"] = float(np.mean(
                rouge_scores(gen, [rec.paraphrased_answer for rec in recs])["rougeL_recall"]))
            res[f"{name}_pert_rouge"] = float(np.mean(np.stack(
                [rouge_scores(gen, [rec.perturbed_answer[i] for rec in recs])["rougeL_recall"]
                 for i in range(n_pert[name])], axis=1).mean(axis=1)))

        for name in ("real_authors", "world_facts"):
            nll = scored(name, "answer")
            pert = perturbed(name)
            res[f"{name}_probability"] = float(np.mean(normalized_probability(nll, pert)))
            rouge(name, generate(name))
            res[f"{name}_truth_ratio"] = truth_ratio_score(truth_ratio(nll, pert, mode), forget=False)

        aucs = hold_tok = None
        if chosen["holdout"] is not None:
            hold_tok = tokens("holdout", mia=True)
            aucs = {a: mia_auc(tok["forget"][a], hold_tok[a]) for a in _model_attacks(config)}
            ref_nll = _reference_nll(reference, fp, fp_hold) if reference is not None else None
            if ref_nll is not None:
                aucs["reference"] = mia_auc(mia_reference_score(tok["forget"]["nll"], ref_nll[0]),
                                            mia_reference_score(hold_tok["nll"], ref_nll[1]))

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
        mismatch = _mia_mismatch(reference, config)
        if not isinstance(ref_aucs, Mapping):
            warnings.warn("reference has no mia_auc (evaluated without a holdout set?): privleak is None",
                          stacklevel=2)
        elif mismatch is not None:
            warnings.warn(f"privleak is None: the reference's MIA AUCs are not comparable, {mismatch}",
                          stacklevel=2)
        else:
            leak = {}
            for a in _model_attacks(config):
                ref_auc = ref_aucs.get(a)
                try:
                    leak[a] = privleak(aucs[a], ref_auc) if ref_auc is not None else None
                except ValueError as e:
                    warnings.warn(f"privleak[{a!r}] is None: {e}", stacklevel=2)
                    leak[a] = None
                if ref_auc is None:
                    warnings.warn(f"reference mia_auc has no {a!r}: privleak[{a!r}] is None", stacklevel=2)

    raw = {
        "forget_truth_stat": _floats(t_forget),
        "forget_truth_ratio": _floats(r_forget),
        "forget_extraction_strength": _floats(tok["forget"]["es"]),
        "forget_nll": _floats(tok["forget"]["nll"]),
        "holdout_nll": _floats(hold_tok["nll"]) if hold_tok is not None else None,
        "forget_fingerprint": fp,
        "holdout_fingerprint": fp_hold,
        "mia_auc": dict(aucs) if aucs is not None else None,
    }
    out: dict[str, Any] = {
        "forget_quality": fq,
        "ks_statistic": ks,
        "forget_quality_ceiling": fq_ceil,
        "ks_statistic_ceiling": ks_ceil,
        "model_utility": model_utility([res[k] for k in utility_keys]),
        **res,
        "mia_auc": dict(aucs) if aucs is not None else None,
        "privleak": leak,
        "extraction_strength": float(np.mean(tok["forget"]["es"])),
        "exact_memorization": float(np.mean(tok["forget"]["em"])),
        "retain_extraction_strength": float(np.mean(tok["retain"]["es"])),
        "retain_exact_memorization": float(np.mean(tok["retain"]["em"])),
        "n_examples": {name: (len(recs) if recs is not None else 0) for name, recs in chosen.items()},
        "generation": {"max_new_tokens": config.max_new_tokens, "context_limit": context_limit(model),
                       "new_token_budget": budget},
        "eval_seconds": time.perf_counter() - t0,
        "config": {**asdict(config), "gradnorm_p": _json_number(config.gradnorm_p),
                   "conventions": conventions(config)},
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
    ("forget_para_probability", "Forget paraphrase probability"),
    ("forget_pert_probability", "Forget perturbed probability"),
    ("forget_para_rouge", "Forget paraphrase ROUGE-L recall"),
    ("forget_pert_rouge", "Forget perturbed ROUGE-L recall"),
    ("forget_rouge1_recall", "Forget ROUGE-1 recall"),
    ("forget_rougeL_f1", "Forget ROUGE-L F1"),
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
    ("exact_memorization", "Exact memorization (forget)"),
    ("retain_extraction_strength", "Extraction strength (retain)"),
    ("retain_exact_memorization", "Exact memorization (retain)"),
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
    for key, label, attacks in (("mia_auc", "MIA AUC", (*MIA_ATTACKS, "reference")),
                                ("privleak", "PrivLeak", MIA_ATTACKS)):
        d = results.get(key)
        for a in attacks:
            rows.append((f"{label} ({a})", d.get(a) if isinstance(d, Mapping) else None))
    tr = (results.get("config") or {}).get("truth_ratio")
    if tr:
        rows.append(("Truth ratio form", tr))
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
