"""The pure TOFU / MIA metric functions of soulkit.unlearn.metrics, each against hand-computed values."""

from __future__ import annotations

import math
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from soulkit.unlearn.metrics import (
    MIA_ATTACKS,
    TRUTH_RATIO_MODES,
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
    rouge_l_recall,
    rouge_scores,
    truth_ratio,
    truth_ratio_score,
)


def test_rouge_l_recall_hand_cases():
    got = rouge_l_recall(["the cat sat", "cats running", "", "Lyon"],
                         ["the cat sat on the mat", "cat runs", "abc", "born in Lyon"])
    # LCS 3 of 6 reference tokens; stemming makes cats/cat and running/runs match; empty -> 0; 1 of 3
    np.testing.assert_allclose(got, [0.5, 1.0, 0.0, 1 / 3])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_l_recall(["a", "b"], ["a"])


def test_rouge_scores_by_hand():
    got = rouge_scores(["the cat sat", "mat the on"], ["the cat sat on the mat", "the cat sat on the mat"])
    # 1: unigrams the, cat, sat all in the 6-token reference -> R1 = 3/6; LCS 3 -> RL recall 3/6,
    #    precision 3/3, F1 = 2 * 1/2 * 1 / (3/2) = 2/3
    # 2: unigrams mat, the, on -> R1 = 3/6; LCS "the on" = 2 -> RL recall 2/6, precision 2/3,
    #    F1 = 2 * 1/3 * 2/3 / (1/3 + 2/3) = 4/9
    np.testing.assert_allclose(got["rouge1_recall"], [0.5, 0.5])
    np.testing.assert_allclose(got["rougeL_recall"], [0.5, 1 / 3])
    np.testing.assert_allclose(got["rougeL_f1"], [2 / 3, 4 / 9])
    np.testing.assert_allclose(rouge_l_recall(["mat the on"], ["the cat sat on the mat"]), [1 / 3])
    with pytest.raises(ValueError, match="at least one prediction"):
        rouge_scores([], [])


def test_answer_probability_of_one_or_several_answers():
    np.testing.assert_allclose(answer_probability([0.0, math.log(2)]), [1.0, 0.5])
    # per question the mean over its answers' probabilities: (1/2 + 1/4) / 2, (1 + 1/8) / 2
    np.testing.assert_allclose(answer_probability([[math.log(2), math.log(4)], [0.0, math.log(8)]]),
                               [0.375, 0.5625])
    with pytest.raises(ValueError, match="NaN"):
        answer_probability([float("nan")])


# three perturbed answers of different lengths: the truth ratio compares mean per-token NLLs l(a).
# token log-probs: paraphrase [-1, -2] -> l = 1.5; perturbed [-2, -2, -5] -> 3.0, [-0.5] -> 0.5,
# [-1, -1, -1, -3] -> 1.5.  Second question: paraphrase [-3] -> 3.0; perturbed [-1, -1] -> 1.0,
# [-2, -2, -2] -> 2.0, [-6, -2, -2, -2] -> 3.0
PARA_TOKENS = [[-1.0, -2.0], [-3.0]]
PERT_TOKENS = [[[-2.0, -2.0, -5.0], [-0.5], [-1.0, -1.0, -1.0, -3.0]],
               [[-1.0, -1.0], [-2.0, -2.0, -2.0], [-6.0, -2.0, -2.0, -2.0]]]


def _mean_nll(tokens):
    return -sum(tokens) / len(tokens)


def test_truth_ratio_three_perturbed_answers_of_different_lengths():
    para = [_mean_nll(t) for t in PARA_TOKENS]
    pert = [[_mean_nll(t) for t in q] for q in PERT_TOKENS]
    assert para == [1.5, 3.0] and pert == [[3.0, 0.5, 1.5], [1.0, 2.0, 3.0]]
    # geometric (TOFU's code, open-unlearning): R = exp(l_para - mean_p l_pert)
    #   q1: exp(1.5 - 5/3) = exp(-1/6);  q2: exp(3 - 2) = e
    geo = [math.exp(-1 / 6), math.e]
    np.testing.assert_allclose(truth_ratio(para, pert), geo, rtol=1e-12)
    np.testing.assert_allclose(truth_ratio(para, pert, "geometric"), geo, rtol=1e-12)
    # arithmetic (the paper): R = mean_p exp(l_para - l_pert_p)
    #   q1: (e^-1.5 + e^1 + e^0) / 3;  q2: (e^2 + e^1 + e^0) / 3
    ari = [(math.exp(-1.5) + math.e + 1) / 3, (math.exp(2) + math.e + 1) / 3]
    np.testing.assert_allclose(truth_ratio(para, pert, "arithmetic"), ari, rtol=1e-12)
    assert (truth_ratio(para, pert, "arithmetic") >= truth_ratio(para, pert)).all()  # AM >= GM
    # reported: forget mean(min(R, 1/R)), retain mean(max(0, 1 - R))
    assert truth_ratio_score(truth_ratio(para, pert), forget=True) == pytest.approx(
        (math.exp(-1 / 6) + 1 / math.e) / 2, rel=1e-12)
    assert truth_ratio_score(truth_ratio(para, pert), forget=False) == pytest.approx(
        (1 - math.exp(-1 / 6)) / 2, rel=1e-12)
    assert truth_ratio_score(truth_ratio(para, pert, "arithmetic"), forget=False) == 0.0  # both R > 1
    # forget quality's statistic is 1 / the geometric R, whatever the reported mode
    np.testing.assert_allclose(forget_quality_statistic(para, pert), [math.exp(1 / 6), 1 / math.e], rtol=1e-12)
    # torch input works the same
    np.testing.assert_allclose(truth_ratio(torch.tensor(para), torch.tensor(pert)), geo, rtol=1e-12)


def test_truth_ratio_bad_input():
    pert = [[2.0, 3.0], [1.0, 1.0]]
    assert TRUTH_RATIO_MODES == ("geometric", "arithmetic")
    with pytest.raises(ValueError, match="truth ratio mode must be one of geometric, arithmetic, got 'harmonic'"):
        truth_ratio([1.0, 2.0], pert, "harmonic")
    with pytest.raises(ValueError, match="rows"):
        truth_ratio([1.0], pert)
    with pytest.raises(ValueError, match="NaN"):
        truth_ratio([1.0, float("nan")], pert)
    with pytest.raises(ValueError, match="dimension"):
        truth_ratio([1.0, 2.0], [1.0, 2.0])


def test_truth_ratio_score_forms():
    assert truth_ratio_score([0.5, 2.0], forget=True) == pytest.approx(0.5)  # min(R, 1/R) = 0.5 both
    assert truth_ratio_score([0.5, 2.0], forget=False) == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert truth_ratio_score([1.0], forget=True) == pytest.approx(1.0)
    assert truth_ratio_score([0.0], forget=True) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        truth_ratio_score([-1.0], forget=False)


def test_forget_quality_ks():
    assert forget_quality([0.0, 1.0, 2.0], [0.0, 1.0, 2.0]) == (1.0, 0.0)
    p, stat = forget_quality([0.0, 1.0, 2.0], [10.0, 11.0, 12.0])
    assert stat == 1.0
    assert p == pytest.approx(0.1)  # exact two-sided: 2 / C(6, 3)
    with pytest.raises(ValueError, match="empty"):
        forget_quality([], [1.0])


def test_normalized_probability():
    np.testing.assert_allclose(normalized_probability([1.0], [[1.0, 1.0]]), [1 / 3])
    np.testing.assert_allclose(normalized_probability([0.0], [[math.log(2), math.log(2)]]), [0.5])
    # stable where exp(-l) underflows
    np.testing.assert_allclose(normalized_probability([1000.0], [[1000.0, 1000.0]]), [1 / 3])


def test_model_utility_harmonic_mean():
    assert model_utility([1.0] * 9) == pytest.approx(1.0)
    assert model_utility([0.5] * 8 + [1.0]) == pytest.approx(9 / 17)  # 9 / (8 * 2 + 1)
    assert model_utility({f"k{i}": 0.5 for i in range(9)}) == pytest.approx(0.5)
    assert model_utility([0.9] * 8 + [0.0]) == 0.0
    with pytest.raises(ValueError, match="exactly 9"):
        model_utility([0.5] * 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model_utility([0.5] * 8 + [1.5])


def test_mia_loss_and_zlib_scores():
    lp = [[-1.0, -2.0, -3.0, 99.0], [-4.0, 0.0, 0.0, 0.0]]
    mask = [[True, True, True, False], [True, False, False, False]]
    np.testing.assert_allclose(mia_loss_score(lp, mask), [-2.0, -4.0])  # padding ignored
    np.testing.assert_allclose(mia_loss_score([[-1.0, -3.0]], None), [-2.0])
    # zlib: -(mean NLL) / compressed length; zlib.compress(b"abc") is 11 bytes (2 header, 5 deflate, 4 adler)
    long_text = "a" * 100
    got = mia_zlib_score([[-2.0, -2.0], [-3.0, -3.0]], None, ["abc", long_text])
    np.testing.assert_allclose(got, [-2.0 / 11, -3.0 / len(zlib.compress(long_text.encode()))])
    with pytest.raises(ValueError, match="no answer tokens"):
        mia_loss_score([[-1.0, -2.0]], [[False, False]])
    with pytest.raises(ValueError, match="1 texts for 2"):
        mia_zlib_score([[-1.0], [-1.0]], None, ["x"])


def test_min_k_picks_the_lowest_tokens():
    lp = [[-0.1, -5.0, -0.2, -3.0, -0.3, -100.0]]
    mask = [[True] * 5 + [False]]  # the -100 is padding, never picked
    np.testing.assert_allclose(mia_min_k_score(lp, mask, k=0.4), [-4.0])  # floor(0.4 * 5) = 2: -5, -3
    np.testing.assert_allclose(mia_min_k_score(lp, mask, k=1.0), [-8.6 / 5])
    np.testing.assert_allclose(mia_min_k_score(lp, mask, k=0.1), [-5.0])  # at least one token
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        mia_min_k_score(lp, mask, k=0.0)


# an answer of 5 text tokens and its final EOS prediction (log p -4.0), then one padding position
ANSWER_LP = [[-0.5, -2.0, -1.0, -0.1, -0.3, -4.0, 0.0]]
WITH_EOS = [[True] * 6 + [False]]
TEXT_ONLY = [[True] * 5 + [False, False]]


def test_min_k_with_and_without_the_eos_prediction():
    # with EOS: n = 6, floor(0.4 * 6) = 2 lowest: -4.0 (the EOS), -2.0 -> -3.0
    np.testing.assert_allclose(mia_min_k_score(ANSWER_LP, WITH_EOS, k=0.4), [-3.0])
    # open-unlearning's tokens, the default of evaluate_model: n = 5, floor(2.0) = 2 lowest: -2.0, -1.0 -> -1.5
    np.testing.assert_allclose(mia_min_k_score(ANSWER_LP, TEXT_ONLY, k=0.4), [-1.5])
    # Min-K%++ with mu = -1 and sigma = 0.5 everywhere: z = 2 * (lp + 1)
    mu, sd = [[-1.0] * 7], [[0.5] * 7]
    # with EOS: z = [1, -2, 0, 1.8, 1.4, -6] -> lowest 2: (-6 - 2) / 2 = -4;  text only: (-2 + 0) / 2 = -1
    np.testing.assert_allclose(mia_min_k_plus_plus_score(ANSWER_LP, mu, sd, WITH_EOS, k=0.4), [-4.0])
    np.testing.assert_allclose(mia_min_k_plus_plus_score(ANSWER_LP, mu, sd, TEXT_ONLY, k=0.4), [-1.0])


def test_min_k_plus_plus_standardises_tokens():
    lp = [[-1.0, -3.0, -2.0, -4.0, -1.0]]
    mu = [[-2.0, -1.0, -2.0, -1.0, -1.0]]
    sd = [[1.0, 2.0, 0.5, 1.0, 1.0]]
    # token scores (lp - mu) / sd = [1, -1, 0, -3, 0]; lowest 2 -> (-3 + -1) / 2
    np.testing.assert_allclose(mia_min_k_plus_plus_score(lp, mu, sd, None, k=0.4), [-2.0])
    # sigma 0 with log p == mu gives 0, not NaN
    np.testing.assert_allclose(mia_min_k_plus_plus_score([[0.0]], [[0.0]], [[0.0]], None, k=0.4), [0.0])
    # sigma is floored at 1e-3 (variance 1e-6, open-unlearning's floor): 1e-4 / 1e-3 = 0.1, not 1e-4 / 1e-8
    np.testing.assert_allclose(mia_min_k_plus_plus_score([[-1e-4]], [[-2e-4]], [[1e-5]], None), [0.1])
    with pytest.raises(ValueError, match="std must be >= 0"):
        mia_min_k_plus_plus_score([[0.0]], [[0.0]], [[-1.0]])


def test_gradnorm_and_reference_scores_by_hand():
    assert MIA_ATTACKS == ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm")
    # per sequence minus the mean over parameter tensors of the gradient norms: -(3 + 4) / 2, -(1 + 1 + 4) / 3
    np.testing.assert_allclose(mia_gradnorm_score([[3.0, 4.0, 3.5], [1.0, 1.0, 4.0]]), [-3.5, -2.0])
    with pytest.raises(ValueError, match="grad_norms must be >= 0"):
        mia_gradnorm_score([[1.0, -1.0]])
    # reference attack: l_ref - l; the evaluated model finds the first answer easier than the reference
    np.testing.assert_allclose(mia_reference_score([1.0, 2.0], [1.5, 1.5]), [0.5, -0.5])
    with pytest.raises(ValueError, match="nll has 2 entries but reference_nll has 1"):
        mia_reference_score([1.0, 2.0], [1.5])
    # members easier for the model than for the reference -> AUC 1
    assert mia_auc(mia_reference_score([0.1, 0.2], [3.0, 3.0]), mia_reference_score([3.0, 2.9], [3.0, 3.0])) == 1.0


def test_mia_auc_and_privleak_sign():
    assert mia_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert mia_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert mia_auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert mia_auc([3.0, 1.0], [2.0, 0.0]) == 0.75  # 3 of the 4 member/non-member pairs ordered right
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(0.75, 0.5) == pytest.approx(-50.0)  # forget set more member-like than retrain: leak
    assert privleak(0.25, 0.5) == pytest.approx(50.0)  # less member-like: over-unlearning
    with pytest.raises(ValueError, match="auc_retain == 1"):
        privleak(0.6, 1.0)
    with pytest.raises(ValueError, match="auc must be"):
        privleak(1.2, 0.5)


@pytest.mark.parametrize("seed", range(6))
def test_mia_auc_equals_sklearn_roc_auc_with_ties(seed):
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(seed)
    n_members, n_nonmembers = rng.integers(5, 40, size=2)
    # scores on a coarse grid, so that members and non-members tie often (within and across the groups);
    # odd seeds move some of them off the grid
    a = rng.integers(0, 6, n_members) * 0.25 + 0.5
    b = rng.integers(0, 6, n_nonmembers) * 0.25
    if seed % 2:
        a[rng.random(n_members) < 0.3] += rng.normal(size=1)
    assert np.isin(a, b).any(), "the inputs are meant to have ties across the groups"
    want = roc_auc_score(np.r_[np.ones(a.size), np.zeros(b.size)], np.r_[a, b])
    assert mia_auc(a, b) == pytest.approx(want, abs=1e-12)
    assert mia_auc(torch.tensor(a), b.tolist()) == pytest.approx(want, abs=1e-12)


def test_mia_auc_counts_ties_as_half_and_checks_its_input():
    # pairs: (2 vs 1) right, (2 vs 2) tie, (1 vs 1) tie, (1 vs 2) wrong -> (1 + 0.5 + 0.5 + 0) / 4
    assert mia_auc([2.0, 1.0], [1.0, 2.0]) == 0.5
    assert mia_auc([2.0, 2.0, 1.0], [1.0]) == pytest.approx((1 + 1 + 0.5) / 3)
    assert mia_auc([5.0], [1.0, 2.0, 5.0, 7.0]) == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    with pytest.raises(ValueError, match="nonmember_scores is empty"):
        mia_auc([1.0], [])
    with pytest.raises(ValueError, match="member_scores contains NaN"):
        mia_auc([1.0, float("nan")], [0.0])


def test_metrics_need_no_scikit_learn():
    """The unlearn extra does not install scikit-learn: its metrics and evaluation must not import it."""
    code = (
        "import sys; sys.modules['sklearn'] = None\n"  # what an uninstalled package looks like to imports
        "import soulkit.unlearn, soulkit.unlearn.evaluate\n"
        "from soulkit.unlearn.metrics import mia_auc\n"
        "print(mia_auc([3.0, 1.0], [2.0, 0.0]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0.75"


def test_extraction_strength_cases():
    correct = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 1], [0, 1, 1, 1], [0, 1, 0, 1]]
    # all right -> 1; last wrong -> k = 4 -> 0; index 1 wrong -> k = 2 -> 0.5; first wrong -> k = 1 -> 0.75;
    # indices 0 and 2 wrong -> the last wrong one counts: k = 3 -> 0.25
    got = extraction_strength(np.array(correct, dtype=bool))
    np.testing.assert_allclose(got, [1.0, 0.0, 0.5, 0.75, 0.25])
    # positions outside the mask (prompt, padding) do not count: answer = [1, 0, 1] -> k = 2 -> 1/3
    c = torch.tensor([[0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    m = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    np.testing.assert_allclose(extraction_strength(c, m), [1 / 3])


# teacher-forced correctness of a 4-token answer and its final EOS prediction (last column), prompt first
PROMPT_AND_ANSWER = [
    [0, 0, 1, 1, 1, 0, 1],  # the last text token is wrong (EOS right)
    [0, 0, 1, 1, 1, 1, 0],  # the answer reproduced but not terminated (EOS wrong)
    [0, 0, 0, 0, 0, 0, 0],  # nothing matches
    [0, 0, 1, 1, 1, 1, 1],  # everything right
]
ANSWER_WITH_EOS = [[0, 0, 1, 1, 1, 1, 1]] * 4
ANSWER_TEXT = [[0, 0, 1, 1, 1, 1, 0]] * 4


def test_extraction_strength_last_token_wrong_unterminated_and_nothing():
    c = np.array(PROMPT_AND_ANSWER, dtype=bool)
    # text tokens (evaluate_model's default, as open-unlearning):
    #   last text token wrong -> k = |y| = 4 -> 0 (the definition; open-unlearning's loop gives 1/4);
    #   reproduced, not terminated -> every text token right -> k = 0 -> 1;  nothing -> k = 4 -> 0;  all -> 1
    np.testing.assert_allclose(extraction_strength(c, np.array(ANSWER_TEXT, dtype=bool)), [0.0, 1.0, 0.0, 1.0])
    # with the EOS prediction scored (|y| = 5): last text token wrong -> k = 4 -> 1/5; unterminated -> the EOS
    # is wrong -> k = 5 -> 0; nothing -> 0; all -> 1
    np.testing.assert_allclose(extraction_strength(c, np.array(ANSWER_WITH_EOS, dtype=bool)),
                               [0.2, 0.0, 0.0, 1.0])


def test_exact_memorization_by_hand():
    c = np.array(PROMPT_AND_ANSWER, dtype=bool)
    # text tokens: 3/4, 4/4, 0/4, 4/4; with the EOS prediction: 4/5, 4/5, 0/5, 5/5
    np.testing.assert_allclose(exact_memorization(c, np.array(ANSWER_TEXT, dtype=bool)), [0.75, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(exact_memorization(c, np.array(ANSWER_WITH_EOS, dtype=bool)), [0.8, 0.8, 0.0, 1.0])
    np.testing.assert_allclose(exact_memorization([[1, 0, 1]]), [2 / 3])
    with pytest.raises(ValueError, match="no answer tokens"):
        exact_memorization([[1, 1]], [[0, 0]])
