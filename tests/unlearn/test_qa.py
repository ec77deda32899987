"""soulkit.unlearn.qa: the prompt format, tokenisation and batching of QA records, their scores under a
model, greedy answers, and the JSON-lines files they are read from and written to."""

from __future__ import annotations

import copy
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from soulkit.unlearn.qa import (
    IGNORE_INDEX,
    QA,
    QADataset,
    answer_gradient_norms,
    answer_logits,
    answer_logprobs,
    answer_token_stats,
    batched,
    collate_qa,
    context_limit,
    encode_qa,
    format_prompt,
    generation_budget,
    greedy_answers,
    pad_token_id,
    qa_batches,
    read_jsonl,
    write_jsonl,
)

from ._corpus import FORGET, RETAIN

RECORDS = FORGET + RETAIN


# ------------------------------------------------------------------------------------------ records
def test_qa_validates_and_normalises():
    r = QA("Q?", "A.", perturbed_answer="Wrong.")
    assert r.perturbed_answer == ("Wrong.",)
    assert QA("Q?", "A.", perturbed_answer=["x", "y"]).perturbed_answer == ("x", "y")
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        QA("  ", "A.")
    with pytest.raises(ValueError, match="answer must be a non-empty string"):
        QA("Q?", "")
    swapped = QA("Q?", "A.", "Para.", ("W.",), "Ann", "place", {"k": 1}).with_answer("I don't know.")
    assert (swapped.question, swapped.answer, swapped.paraphrased_answer, swapped.author) == (
        "Q?", "I don't know.", "Para.", "Ann")
    assert swapped.extra == {"k": 1}


def test_to_dict_and_from_dict_round_trip():
    r = QA("Q?", "A.", "Para.", ("W1.", "W2."), "Ann", "place", {"source": "tofu"})
    d = r.to_dict()
    assert d == {"question": "Q?", "answer": "A.", "paraphrased_answer": "Para.", "perturbed_answer": ["W1.", "W2."],
                 "author": "Ann", "attribute": "place", "source": "tofu"}
    assert "source" not in r.to_dict(extra=False)
    back = QA.from_dict(d)
    assert back == r and back.extra == r.extra
    assert QA("Q?", "A.").to_dict() == {"question": "Q?", "answer": "A."}  # unset fields are left out
    with pytest.raises(ValueError, match=r"^here: missing field 'answer'"):
        QA.from_dict({"question": "Q?"}, where="here")


def test_pad_token_id_falls_back_to_eos(tiny_tokenizer):
    assert pad_token_id(tiny_tokenizer) == tiny_tokenizer.pad_token_id
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    assert pad_token_id(tok) == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        pad_token_id(tok)


# ------------------------------------------------------------------------------------------ tokens
def test_encode_qa_labels_only_the_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels = encode_qa(tok, "Where was Mara Quill born?", " Mara Quill was born in Lyon. ")
    prompt = tok(format_prompt("Where was Mara Quill born?"), add_special_tokens=False)["input_ids"]
    answer = tok(" Mara Quill was born in Lyon.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == [tok.bos_token_id] + prompt + answer
    assert labels == [IGNORE_INDEX] * (1 + len(prompt)) + answer
    assert format_prompt("Q?") == "Question: Q?\nAnswer:"


def test_encode_qa_truncates_the_prompt_from_the_left(tiny_tokenizer):
    ids, labels = encode_qa(tiny_tokenizer, "Where was Mara Quill born?", "Lyon.")
    n_answer = sum(x != IGNORE_INDEX for x in labels)
    short_ids, short_labels = encode_qa(tiny_tokenizer, "Where was Mara Quill born?", "Lyon.",
                                        max_length=n_answer + 2)
    assert short_ids == ids[-(n_answer + 2):] and short_labels == labels[-(n_answer + 2):]
    with pytest.raises(ValueError, match="does not fit max_length"):
        encode_qa(tiny_tokenizer, "Where was Mara Quill born?", "Lyon.", max_length=n_answer)


def test_dataset_answer_fields(tiny_tokenizer):
    r = QA("Where was Mara Quill born?", "Lyon.", "In Lyon.", ("Paris.", "Rome."))
    for field, text in [("answer", "Lyon."), ("paraphrased_answer", "In Lyon."), (1, "Rome.")]:
        item = QADataset([r], tiny_tokenizer, answer_field=field)[0]
        assert item == dict(zip(("input_ids", "labels"), encode_qa(tiny_tokenizer, r.question, text)))
    with pytest.raises(ValueError, match="has 2 perturbed answers, index 2 requested"):
        QADataset([r], tiny_tokenizer, answer_field=2)
    with pytest.raises(ValueError, match="has no paraphrased_answer"):
        QADataset([QA("Q?", "A.")], tiny_tokenizer, answer_field="paraphrased_answer")
    with pytest.raises(ValueError, match="at least one QA record"):
        QADataset([], tiny_tokenizer)


def test_collate_pads_on_the_right():
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate_qa(items, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    with pytest.raises(ValueError, match="empty batch"):
        collate_qa([], pad_id=0)


# ------------------------------------------------------------------------------------------ batching
def test_batched_slices_in_order():
    assert list(batched([1, 2, 3, 4, 5], 2)) == [[1, 2], [3, 4], [5]]
    assert list(batched("abcd", 4)) == ["abcd"]
    assert list(batched([], 3)) == []
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            list(batched([1], bad))


def test_qa_batches_follow_the_order(tiny_tokenizer):
    ds = QADataset(RECORDS, tiny_tokenizer)
    pad = pad_token_id(tiny_tokenizer)
    got = list(qa_batches(ds, 3, pad_id=pad))
    assert [len(b["input_ids"]) for b in got] == [3, 3, 2]
    for b, idx in zip(got, [[0, 1, 2], [3, 4, 5], [6, 7]], strict=True):
        want = collate_qa([ds[i] for i in idx], pad_id=pad)
        assert all(torch.equal(b[k], want[k]) for k in want)
    order = [7, 2, 5, 0, 1, 6, 3, 4]
    shuffled = list(qa_batches(ds, 5, pad_id=pad, order=order))
    assert [len(b["input_ids"]) for b in shuffled] == [5, 3]
    want = collate_qa([ds[i] for i in order[5:]], pad_id=pad)
    assert all(torch.equal(shuffled[1][k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------ scores
def test_answer_logits_align_each_position_with_the_next_token(tiny_model, tiny_tokenizer):
    ds = QADataset(RECORDS[:3], tiny_tokenizer)
    batch = collate_qa([ds[i] for i in range(3)], pad_id=pad_token_id(tiny_tokenizer))
    logits, targets, valid = answer_logits(tiny_model, batch)
    full = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    B, T = batch["input_ids"].shape
    assert logits.shape == (B, T - 1, full.shape[-1]) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, full[:, :-1])
    for b in range(B):  # by hand: the target of position t is the label of token t + 1
        for t in range(T - 1):
            assert targets[b, t] == batch["labels"][b, t + 1]
            assert valid[b, t] == (batch["labels"][b, t + 1] != IGNORE_INDEX)
    # every answer token (and eos) is predicted exactly once; prompt and padding never
    assert valid.sum(1).tolist() == (batch["labels"] != IGNORE_INDEX).sum(1).tolist()


def test_answer_logprobs_and_token_stats_by_hand(tiny_model, tiny_tokenizer):
    ds = QADataset(RECORDS[:2], tiny_tokenizer)
    batch = collate_qa([ds[i] for i in range(2)], pad_id=pad_token_id(tiny_tokenizer))
    with torch.no_grad():
        total, n = answer_logprobs(tiny_model, batch)
    stats = answer_token_stats(tiny_model, batch)
    ids, labels = batch["input_ids"], batch["labels"]
    for b in range(2):
        row = ids[b, : int(batch["attention_mask"][b].sum())]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(input_ids=row[None]).logits[0].double(), -1)
        answer_pos = [t for t in range(1, len(row)) if labels[b, t] != IGNORE_INDEX]
        want = sum(float(logp[t - 1, row[t]]) for t in answer_pos)
        assert float(total[b]) == pytest.approx(want, rel=1e-5)
        assert int(n[b]) == len(answer_pos)
        for t in answer_pos:
            assert float(stats["logprob"][b, t - 1]) == pytest.approx(float(logp[t - 1, row[t]]), abs=1e-5)
            p = logp[t - 1].exp()
            mu = float((p * logp[t - 1]).sum())
            assert float(stats["mean"][b, t - 1]) == pytest.approx(mu, abs=1e-5)
            assert bool(stats["correct"][b, t - 1]) == (int(logp[t - 1].argmax()) == int(row[t]))
    assert torch.equal(stats["mask"], answer_logits(tiny_model, batch)[2])


def test_text_mask_drops_only_the_final_eos_prediction(tiny_model, tiny_tokenizer):
    ds = QADataset(RECORDS[:3], tiny_tokenizer)
    batch = collate_qa([ds[i] for i in range(3)], pad_id=pad_token_id(tiny_tokenizer))
    eos = tiny_tokenizer.eos_token_id
    st = answer_token_stats(tiny_model, batch, eos_token_id=eos)
    _, targets, valid = answer_logits(tiny_model, batch)
    for b in range(3):
        pos = valid[b].nonzero().flatten().tolist()
        assert targets[b, pos[-1]] == eos  # the answer ends with its eos
        assert st["text_mask"][b].nonzero().flatten().tolist() == pos[:-1]
    assert torch.equal(answer_token_stats(tiny_model, batch)["text_mask"], st["mask"])  # no eos id: all


class _BiasLM(torch.nn.Module):
    """logits = b + c at every position (b: [V], c: a scalar); ``unused`` gets no gradient."""

    def __init__(self, vocab: int):
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(vocab))
        self.c = torch.nn.Parameter(torch.zeros(()))
        self.unused = torch.nn.Parameter(torch.ones(2))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=(self.b + self.c).expand(*input_ids.shape, -1))


def test_answer_gradient_norms_by_hand():
    # V = 3, eos = 2. Row 0: prompt of 2 tokens, answer targets 0, 0, 1 and the eos; row 1 padded (pad 0):
    # answer target 1 and the eos. The loss is the mean NLL of the text targets (eos left out);
    # with b = c = 0 every softmax is [1/3, 1/3, 1/3], so d loss / d b = 1/3 - mean_t onehot(y_t):
    #   row 0: mean onehot = [2/3, 1/3, 0] -> grad b = [-1/3, 0, 1/3]: 2-norm sqrt(2)/3, 1-norm 2/3, inf-norm 1/3
    #   row 1: mean onehot = [0, 1, 0] -> grad b = [1/3, -2/3, 1/3]: 2-norm sqrt(6)/3, 1-norm 4/3, inf-norm 2/3
    # d loss / d c = sum of grad b = 0 for both; `unused` has no gradient and is not counted
    batch = {"input_ids": torch.tensor([[1, 1, 0, 0, 1, 2], [1, 1, 1, 2, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
             "labels": torch.tensor([[-100, -100, 0, 0, 1, 2], [-100, -100, 1, 2, -100, -100]])}
    model = _BiasLM(3)
    for p, want in [(2, [[math.sqrt(2) / 3, 0.0], [math.sqrt(6) / 3, 0.0]]),
                    (1, [[2 / 3, 0.0], [4 / 3, 0.0]]),
                    (float("inf"), [[1 / 3, 0.0], [2 / 3, 0.0]])]:
        got = answer_gradient_norms(model, batch, p=p, eos_token_id=2)
        assert got.dtype == torch.float64 and got.shape == (2, 2)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-7, rtol=1e-6)
    # with the eos scored (no eos id), row 0's targets are 0, 0, 1, 2: mean onehot [1/2, 1/4, 1/4]
    # -> grad b = [-1/6, 1/12, 1/12], 2-norm sqrt(1/36 + 2/144) = sqrt(6)/12
    got = answer_gradient_norms(model, batch, p=2)
    assert float(got[0, 0]) == pytest.approx(math.sqrt(6) / 12, rel=1e-6)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: nothing written to .grad
    with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
        answer_gradient_norms(model, batch, p=3)
    for q in model.parameters():
        q.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        answer_gradient_norms(model, batch)


def test_generation_fits_the_context(tiny_model, tiny_tokenizer):
    questions = [r.question for r in RECORDS[:3]]
    limit = context_limit(tiny_model)
    assert limit == 96  # the tiny Llama's max_positions
    longest = max(len(tiny_tokenizer(format_prompt(q), add_special_tokens=False)["input_ids"])
                  + (tiny_tokenizer.bos_token_id is not None) for q in questions)
    assert generation_budget(tiny_model, tiny_tokenizer, questions, 200) == limit - longest
    assert generation_budget(tiny_model, tiny_tokenizer, questions, 5) == 5
    long_q = "Why? " * 200
    with pytest.raises(ValueError, match="fills the model's context of 96 positions"):
        generation_budget(tiny_model, tiny_tokenizer, [long_q], 10)
    answers = greedy_answers(tiny_model, tiny_tokenizer, questions, max_new_tokens=200, batch_size=2)
    assert len(answers) == 3  # 200 asked, cut to the context: no position overflow


def test_greedy_answers_do_not_depend_on_the_batch_size(tiny_model, tiny_tokenizer):
    questions = [r.question for r in RECORDS[:5]]
    tiny_model.train()
    one = greedy_answers(tiny_model, tiny_tokenizer, questions, max_new_tokens=6, batch_size=1)
    assert tiny_model.training  # mode restored
    three = greedy_answers(tiny_model, tiny_tokenizer, questions, max_new_tokens=6, batch_size=3)
    assert one == three and len(one) == 5 and all(isinstance(a, str) for a in one)


# ------------------------------------------------------------------------------------------ JSONL
def test_tofu_style_lines_load(tmp_path):
    path = tmp_path / "forget10_perturbed.json"  # JSON lines despite the suffix, as TOFU ships it
    rows = [
        {"question": "Who is this celebrated LGBTQ+ author?", "answer": "The author is Jaime Vasquez.",
         "paraphrased_question": "Who is this author?", "paraphrased_answer": "It is Jaime Vasquez.",
         "perturbed_answer": ["It is Anna Berg.", "It is Tom Kuhn.", "It is Ida Lund."]},
        {"question": "What genre?", "answer": "True crime.", "perturbed_answer": "Poetry."},
        {"question": "Where?", "answer": "Chile.", "paraphrased_answer": None, "author": "X",
         "attribute": "place"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = read_jsonl(path)
    assert len(recs) == 3
    assert recs[0].perturbed_answer == ("It is Anna Berg.", "It is Tom Kuhn.", "It is Ida Lund.")
    assert recs[0].extra == {"paraphrased_question": "Who is this author?"} and recs[0].author is None
    assert recs[1].perturbed_answer == ("Poetry.",) and recs[1].paraphrased_answer is None
    assert recs[2].author == "X" and recs[2].attribute == "place" and recs[2].extra == {}
    out = tmp_path / "copy.jsonl"
    write_jsonl(out, recs)
    back = read_jsonl(out)
    assert back == recs and [r.extra for r in back] == [r.extra for r in recs]
    first = json.loads(out.read_text().splitlines()[0])
    assert list(first)[:4] == ["question", "answer", "paraphrased_answer", "perturbed_answer"]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows, indent=2))
    assert read_jsonl(array) == recs


@pytest.mark.parametrize("content, line, pattern", [
    ('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": \n', 2, "invalid JSON"),
    ('{"question": "q", "answer": "a"}\n\n{"question": "q3"}\n', 3, "missing field 'answer'"),
    ('{"answer": "a"}\n', 1, "missing field 'question'"),
    ('{"question": 5, "answer": "a"}\n', 1, "'question' must be a non-empty string"),
    ('{"question": "q", "answer": "  "}\n', 1, "'answer' must be a non-empty string"),
    ('{"question": "q", "answer": "a", "perturbed_answer": [1, 2]}\n', 1, "perturbed_answer"),
    ('{"question": "q", "answer": "a", "paraphrased_answer": ["x"]}\n', 1, "paraphrased_answer"),
    ('["question", "answer"]\n{"question": "q", "answer": "a"}\n', 1, "expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, line, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"bad\.jsonl, line {line}: .*{re.escape(pattern)}"):
        read_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_jsonl_empty_file_raises(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty file"):
        read_jsonl(path)


def test_write_jsonl_rejects_reserved_extra_and_non_qa(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        write_jsonl(tmp_path / "x.jsonl", [QA("q", "a", extra={"answer": "b"})])
    with pytest.raises(TypeError):
        write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_jsonl_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.jsonl"))):
        read_jsonl(tmp_path / "absent.jsonl")


def test_jsonl_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"question": "Où?", "answer": "Là."}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl: not UTF-8 text"):
        read_jsonl(path)


def test_jsonl_allow_empty_and_round_trip(tmp_path):
    path = tmp_path / "none.jsonl"
    write_jsonl(path, [])
    assert path.read_text() == "" and read_jsonl(path, allow_empty=True) == []
    write_jsonl(path, RECORDS)
    assert read_jsonl(path) == RECORDS
    assert [json.loads(line)["question"] for line in path.read_text().splitlines()] == [r.question for r in RECORDS]
