"""Tests of soulkit.unlearn.data: the seeded fictitious-author benchmark, its splits and its files."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from soulkit.unlearn import _facts
from soulkit.unlearn.data import (
    MAX_QA_PER_AUTHOR,
    Author,
    AuthorBenchmark,
    author_qa,
    build_tables,
    generate_authors,
    generate_benchmark,
    real_author_qa,
    world_fact_qa,
)
from soulkit.unlearn.qa import QA, read_jsonl

CORE = {"birthplace", "birth_date", "nationality", "genre", "father_occupation", "mother_occupation",
        "first_book", "award", "publisher", "debut_year", "theme"}


def contains(text: str, value: str) -> bool:
    """``value`` occurs in ``text`` as whole words ("1 May" is not in "11 May", "H" not in "Hg")."""
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text) is not None


@pytest.fixture(scope="module")
def full() -> AuthorBenchmark:
    return generate_benchmark()  # TOFU scale: 200 authors x 20 QA


@pytest.fixture(scope="module")
def small() -> AuthorBenchmark:
    return generate_benchmark(12, qa_per_author=8, seed=3)


# ------------------------------------------------------------------------------------ tables
@pytest.mark.parametrize("pool_name", ["cities", "countries", "nationalities", "GENRES", "OCCUPATIONS",
                                       "AWARDS", "PUBLISHERS", "THEMES", "real_names", "real_works",
                                       "capitals"])
def test_pools_have_no_value_inside_another(pool_name):
    pools = {
        "cities": [c for _, _, cities in _facts.COUNTRIES.values() for c in cities],
        "countries": [c for c, _, _ in _facts.COUNTRIES.values()],
        "nationalities": [n for _, n, _ in _facts.COUNTRIES.values()],
        "real_names": [r[0] for r in _facts.REAL_AUTHORS],
        "real_works": [r[2] for r in _facts.REAL_AUTHORS],
        "capitals": [c for _, c in _facts.CAPITALS],
    }
    pool = pools.get(pool_name) or getattr(_facts, pool_name)
    assert len(set(pool)) == len(pool), "duplicate values"
    for a in pool:
        for b in pool:
            assert a == b or not contains(b.lower(), a.lower()), f"{a!r} occurs inside {b!r}"


def test_static_sets_sizes_and_perturbations():
    real, world = real_author_qa(), world_fact_qa()
    assert len(real) == 100 and len(world) == 117
    assert {r.author for r in real} == {row[0] for row in _facts.REAL_AUTHORS}
    assert all(r.author is None and r.attribute for r in world)
    assert len({r.question for r in real + world}) == 217
    for r in real + world:
        assert len(r.perturbed_answer) >= 3
    capital = {r.question: r for r in world}["What is the capital of France?"]
    assert capital.answer == "The capital of France is Paris."
    assert contains(capital.paraphrased_answer, "Paris")


# ----------------------------------------------------------------------------------- authors
def test_generate_authors_deterministic_prefix_stable_and_unique():
    a = generate_authors(30, seed=1)
    assert a == generate_authors(30, seed=1)
    assert generate_authors(45, seed=1)[:30] == a
    assert [x.name for x in generate_authors(30, seed=2)] != [x.name for x in a]
    names = [x.name for x in a]
    assert len(set(names)) == 30
    for n in names:  # no name is a whole-word part of another one
        assert not any(m != n and contains(m, n) for m in names)
    titles = [t for x in a for t in x.books]
    assert len(set(titles)) == len(titles)
    assert all(2 <= len(x.books) <= 3 and x.gender in ("female", "male") for x in a)
    assert all(x.debut_year >= x.birth_year + 20 for x in a)
    assert len({x.birthplace[1] for x in a}) > 5  # several locales / countries


def test_generation_does_not_depend_on_time_zone():
    # Faker's date helpers go through local time; the authors must not (fresh process: tz is read at import)
    code = ("from soulkit.unlearn.data import generate_authors; "
            "print(' '.join(a.birth_date for a in generate_authors(40, seed=11)))")
    env = {**os.environ, "TZ": "Pacific/Kiritimati", "PYTHONHASHSEED": "123"}  # UTC+14
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [a.birth_date for a in generate_authors(40, seed=11)]


def test_author_validation_names_field():
    good = generate_authors(1)[0].to_dict()
    Author(**good)  # lists from JSON become tuples
    assert Author(**good) == generate_authors(1)[0]
    for key, bad, pattern in [("gender", "robot", "Author.gender"), ("books", ["One"], "Author.books"),
                              ("books", ["A", "A"], "Author.books"),
                              ("birth_date", "12/03/1961", "birth_date"),
                              ("birthplace", ["Lyon"], "birthplace"), ("genre", "", "Author.genre"),
                              ("debut_year", 1000, "debut_year")]:
        with pytest.raises(ValueError, match=pattern):
            Author(**{**good, key: bad})


# --------------------------------------------------------------------------------- benchmark
def test_default_scale_counts(full):
    assert len(full.authors) == 200 and len(full.qa) == 4000
    assert Counter(r.author for r in full.qa) == {a.name: 20 for a in full.authors}
    assert [r.author for r in full.qa] == [a.name for a in full.authors for _ in range(20)]  # author order
    assert len(full.holdout_authors) == 20 and len(full.holdout) == 400
    assert len(full.real_authors) == 100 and len(full.world_facts) == 117
    assert full.pretrain_records() == full.real_authors + full.world_facts
    names = {a.name for a in full.authors}
    assert not names & {a.name for a in full.holdout_authors}
    assert {r.author for r in full.holdout} == {a.name for a in full.holdout_authors}
    for name, n_authors in [("forget01", 2), ("forget05", 10), ("forget10", 20)]:
        forget, retain = full.split(name)
        assert len(full.forget_authors(name)) == n_authors
        assert len(forget) == 20 * n_authors and len(retain) == 4000 - 20 * n_authors


def test_determinism_and_seed_dependence(small):
    again = generate_benchmark(12, qa_per_author=8, seed=3)
    assert again == small and again.fingerprint() == small.fingerprint()
    other = generate_benchmark(12, qa_per_author=8, seed=4)
    assert other.fingerprint() != small.fingerprint()
    assert [a.name for a in other.authors] != [a.name for a in small.authors]
    # the holdout count does not change the benchmark's own authors
    assert generate_benchmark(12, qa_per_author=8, seed=3, n_holdout=3).authors == small.authors


def test_splits_nested_disjoint_and_complete(full):
    last = [a.name for a in full.authors]
    previous: set[str] = set()
    for name in AuthorBenchmark.SPLITS:
        forget_names = full.forget_authors(name)
        assert forget_names == last[-len(forget_names):]  # TOFU: the last p% of the authors
        assert previous <= set(forget_names)
        previous = set(forget_names)
        forget, retain = full.split(name)
        assert {r.author for r in forget} == set(forget_names)
        assert not {r.author for r in forget} & {r.author for r in retain}
        assert sorted(map(id, forget + retain)) == sorted(map(id, full.qa))
        assert full.records(name) == forget
        assert full.records(f"retain{100 - int(name[6:]):02d}") == retain
    assert full.forget_authors("forget1") == full.forget_authors("forget01")
    assert len(full.forget_authors("forget37")) == 74  # any integer percentage
    assert full.records("all") == full.qa and full.records("holdout") == full.holdout
    assert full.records("real_authors") == full.real_authors
    assert full.records("world_facts") == full.world_facts


@pytest.mark.parametrize("name", ["forget0", "forget00", "forget100", "forgetx", "forget", "retain",
                                  "train10", "Forget10", "forget10 ", "forget-5"])
def test_bad_split_names_raise(small, name):
    with pytest.raises(ValueError, match="split"):
        small.split(name)
    with pytest.raises(ValueError):
        small.records(name)


def test_impossible_splits_and_unknown_records(small):
    with pytest.raises(ValueError, match="leaving none to retain"):
        small.forget_authors("forget99")  # 12 authors: 12 forgotten
    with pytest.raises(ValueError, match="forgetNN"):
        small.forget_authors("retain90")
    with pytest.raises(ValueError, match="unknown record set"):
        small.records("validation")
    assert len(small.forget_authors("forget01")) == 1  # at least one author
    assert len(small.records("retain99")) == len(small.qa) - 8


def _check_qa(r: QA, n_perturbed: int) -> None:
    values = r.extra["values"]
    assert values and r.paraphrased_answer and r.paraphrased_answer != r.answer
    assert len(r.perturbed_answer) == n_perturbed >= 3
    assert len(set(r.perturbed_answer)) == n_perturbed
    assert r.answer not in r.perturbed_answer and r.paraphrased_answer not in r.perturbed_answer
    for v in values:
        assert contains(r.answer, v) and contains(r.paraphrased_answer, v), (v, r)
    for p in r.perturbed_answer:
        assert not all(contains(p, v) for v in values), (p, r)
        if len(values) == 1:
            assert not contains(p, values[0]), (p, r)


def test_qa_records_are_well_formed(full):
    for r in full.qa + full.holdout:
        _check_qa(r, 5)
        assert len(r.question.split()) <= 16 and len(r.answer.split()) <= 24, r
    for r in full.real_authors + full.world_facts:
        _check_qa(r, min(5, len(r.perturbed_answer)))
    questions = [r.question for r in full.qa + full.holdout]
    assert len(set(questions)) == len(questions)
    per_author = defaultdict(list)
    for r in full.qa:
        per_author[r.author].append(r.attribute)
    for attrs in per_author.values():
        assert len(set(attrs)) == len(attrs) and CORE <= set(attrs)
    assert len({r.attribute for r in full.qa}) >= 20  # many different slots across authors


def test_small_scales_and_argument_checks():
    bench = generate_benchmark(10, qa_per_author=5, n_perturbed=3)
    assert len(bench.qa) == 50 and len(bench.holdout_authors) == 1
    assert all(r.attribute in CORE for r in bench.qa)
    for r in bench.qa + bench.holdout + bench.pretrain_records():
        _check_qa(r, 3)
    assert len(bench.forget_authors("forget10")) == 1
    most = generate_benchmark(2, qa_per_author=MAX_QA_PER_AUTHOR, seed=5, n_holdout=0)
    assert len(most.qa) == 2 * MAX_QA_PER_AUTHOR and most.holdout == []
    with pytest.raises(ValueError, match="no holdout"):
        most.records("holdout")
    for kwargs, pattern in [({"n_authors": 1}, "n_authors"), ({"qa_per_author": 0}, "qa_per_author"),
                            ({"qa_per_author": MAX_QA_PER_AUTHOR + 1}, "qa_per_author"),
                            ({"n_perturbed": 2}, "n_perturbed"), ({"n_holdout": -1}, "n_holdout"),
                            ({"seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=pattern):
            generate_benchmark(**{"n_authors": 4, **kwargs})


def test_author_qa_direct():
    authors = generate_authors(15, seed=7)
    tables = build_tables(authors)
    out = author_qa(authors[0], n_qa=20, rng=random.Random(0), tables=tables)
    assert len(out) == 20 and all(r.author == authors[0].name for r in out)
    assert out == author_qa(authors[0], n_qa=20, rng=random.Random(0), tables=tables)
    with pytest.raises(ValueError, match="n_qa"):
        author_qa(authors[0], n_qa=40, rng=random.Random(0), tables=tables)
    with pytest.raises(ValueError, match="'award' table"):
        no_award = {k: v for k, v in tables.items() if k != "award"}
        author_qa(authors[0], n_qa=11, rng=random.Random(0), tables=no_award)
    with pytest.raises(ValueError, match="n_perturbed=5 needs"):  # too few other authors for wrong values
        tiny = build_tables(authors[:3])
        author_qa(authors[0], n_qa=MAX_QA_PER_AUTHOR, rng=random.Random(0), tables=tiny)


def test_benchmark_validation(small):
    with pytest.raises(ValueError, match="not in authors"):
        AuthorBenchmark(small.authors[:2], small.qa, [], [], [], 0, 8, 5)
    with pytest.raises(ValueError, match="not a holdout author"):
        AuthorBenchmark(small.authors, small.qa, small.qa[:1], [], [], 0, 8, 5)
    with pytest.raises(ValueError, match="qa_per_author"):
        AuthorBenchmark(small.authors, small.qa, [], [], [], 0, 0, 5)


# ------------------------------------------------------------------------------------- files
def test_save_load_round_trip(small, tmp_path):
    out = tmp_path / "bench"
    small.save(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["authors.jsonl", "holdout.jsonl", "holdout_authors.jsonl", "meta.json", "qa.jsonl",
                     "real_authors.jsonl", "world_facts.jsonl"]  # no temporary files left behind
    meta = json.loads((out / "meta.json").read_text())
    assert meta["fingerprint"] == small.fingerprint() and meta["seed"] == 3 and meta["n_authors"] == 12
    loaded = AuthorBenchmark.load(out)
    assert loaded == small and loaded.fingerprint() == small.fingerprint()
    assert loaded.qa[0].extra == small.qa[0].extra
    assert read_jsonl(out / "qa.jsonl") == small.qa
    small.save(out)  # overwriting is fine
    assert AuthorBenchmark.load(out) == small
    # an edited file no longer matches the fingerprint
    lines = (out / "qa.jsonl").read_text().splitlines(keepends=True)
    rec = json.loads(lines[0])
    rec["answer"] = "Something else entirely."
    lines[0] = json.dumps(rec) + "\n"
    (out / "qa.jsonl").write_text("".join(lines))
    with pytest.raises(ValueError, match="fingerprint"):
        AuthorBenchmark.load(out)
    with pytest.raises(FileNotFoundError):
        AuthorBenchmark.load(tmp_path / "nowhere")


def test_fingerprint_tracks_content(small):
    changed = AuthorBenchmark(small.authors, [small.qa[0].with_answer("No."), *small.qa[1:]], small.holdout,
                              small.real_authors, small.world_facts, small.seed, small.qa_per_author,
                              small.n_perturbed, small.holdout_authors)
    assert re.fullmatch(r"[0-9a-f]{64}", small.fingerprint())
    assert changed.fingerprint() != small.fingerprint()
