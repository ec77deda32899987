"""soulkit.unlearn.probes: held-out phrasings, multi-hop questions and neighbour authors are built from the
benchmark as it is (the training data and its fingerprint do not change), and each probe asks about the
fact it claims to."""

import dataclasses

import pytest

from soulkit.unlearn.data import _SLOTS, generate_benchmark
from soulkit.unlearn.probes import (
    MULTIHOP_QUESTIONS,
    NEIGHBOUR_ATTRIBUTES,
    NOVEL_QUESTIONS,
    multihop_probes,
    neighbour_authors,
    neighbour_sets,
    phrasing_probes,
    related_records,
)
from soulkit.unlearn.qa import QA

# the small scale's data (benchmarks/unlearning.py, the committed result tables, the cached models): the probes
# must leave it as it is
SMALL_FINGERPRINT = "c039699c7b53cbf312fb0887d93a4b932de650c1f6407800c235a7bdaf6061ff"


@pytest.fixture(scope="module")
def bench():
    return generate_benchmark(40, qa_per_author=20, seed=0)


def test_the_training_data_is_unchanged(bench):
    assert bench.fingerprint() == SMALL_FINGERPRINT
    forget, _ = bench.split("forget10")
    phrasing_probes(bench, forget)
    multihop_probes(bench, forget)
    neighbour_sets(bench, "forget10")
    assert bench.fingerprint() == SMALL_FINGERPRINT


def test_novel_templates_are_not_the_generators():
    assert set(NOVEL_QUESTIONS) == {s.key for s in _SLOTS}
    for s in _SLOTS:
        assert not set(NOVEL_QUESTIONS[s.key]) & set(s.questions), s.key
        assert len(set(NOVEL_QUESTIONS[s.key])) == len(NOVEL_QUESTIONS[s.key])


def test_phrasing_probes(bench):
    forget, _ = bench.split("forget10")
    probes = phrasing_probes(bench, forget)
    trained = {r.question for r in bench.qa}
    by_question = {r.question: r for r in forget}
    assert {p.extra["probe"] for p in probes} == {"unused", "novel"}
    slots = {s.key: s for s in _SLOTS}
    for p in probes:
        src = by_question[p.extra["source"]]
        assert p.question not in trained  # never a training question, for any author
        assert (p.answer, p.paraphrased_answer, p.perturbed_answer) == (src.answer, src.paraphrased_answer,
                                                                         src.perturbed_answer)
        assert (p.author, p.attribute) == (src.author, src.attribute)
        assert p.extra["values"] == src.extra["values"]
        if slots[p.attribute].book is None:
            assert p.author in p.question  # about the same person
    # every forget fact has a probe of each kind, and at most its templates' worth
    for r in forget:
        mine = [p for p in probes if p.extra["source"] == r.question]
        assert {p.extra["probe"] for p in mine} == {"unused", "novel"}, r.attribute
        assert len(mine) == len(slots[r.attribute].questions) - 1 + len(NOVEL_QUESTIONS[r.attribute])
    # deterministic; per_fact keeps a seeded subset
    assert phrasing_probes(bench, forget) == probes
    one = phrasing_probes(bench, forget, per_fact=1, seed=3)
    assert len(one) == len(forget) and set(one) <= set(probes)
    assert phrasing_probes(bench, forget, per_fact=1, seed=3) == one
    assert any(phrasing_probes(bench, forget, per_fact=1, seed=s) != one for s in range(4, 8))
    assert {p.extra["probe"] for p in phrasing_probes(bench, forget, kinds=("novel",))} == {"novel"}


def test_phrasing_probes_reject_bad_input(bench):
    forget, _ = bench.split("forget10")
    # a record that is not one of the generator's questions gives no probe
    assert phrasing_probes(bench, [QA("Tell me a story.", "Once upon a time.", author=forget[0].author,
                                      attribute="birthplace")]) == []
    with pytest.raises(ValueError, match="not authors of this benchmark"):
        phrasing_probes(bench, [QA("Who is Nobody?", "Nobody.", author="Nobody")])
    with pytest.raises(ValueError, match="non-empty list"):
        phrasing_probes(bench, [])
    with pytest.raises(ValueError, match="kinds"):
        phrasing_probes(bench, forget, kinds=("paraphrased",))
    with pytest.raises(ValueError, match="per_fact"):
        phrasing_probes(bench, forget, per_fact=0)
    with pytest.raises(TypeError, match="AuthorBenchmark"):
        phrasing_probes(forget, forget)


def test_multihop_probes(bench):
    forget, _ = bench.split("forget10")
    probes = multihop_probes(bench, forget)
    authors = {a.name: a for a in bench.authors}
    by_question = {r.question: r for r in forget}
    assert len(probes) >= len(set(r.author for r in forget))
    for p in probes:
        src = by_question[p.extra["source"]]
        assert p.attribute in MULTIHOP_QUESTIONS and p.answer == src.answer and p.extra["probe"] == "multihop"
        book = p.extra["bridge"]
        assert book in authors[p.author].books and f'"{book}"' in p.question
        assert p.author not in p.question  # the author is reached through the book only
        # both hops were trained: the title is tied to the author somewhere in the author's QA
        assert any(f'"{book}"' in r.question + r.answer for r in bench.qa if r.author == p.author)
        assert not any(b in p.answer for b in authors[p.author].books)  # the answer does not give the bridge
    assert multihop_probes(bench, forget) == probes
    assert {p.attribute for p in probes} == {r.attribute for r in forget} & set(MULTIHOP_QUESTIONS)


def test_neighbour_authors_match_a_brute_force_count(bench):
    nb = neighbour_authors(bench, "forget10")
    forget = [a for a in bench.authors if a.name in bench.forget_authors("forget10")]
    for a in bench.authors:
        if a in forget:
            assert a.name not in nb
            continue
        shared = [k for k, get in NEIGHBOUR_ATTRIBUTES.items() if any(get(a) == get(f) for f in forget)]
        assert nb.get(a.name, []) == shared, a.name
    assert nb  # the small scale has some
    # a retain author made to share an award becomes a neighbour for that attribute
    i = next(i for i, a in enumerate(bench.authors) if a.name not in nb)
    edited = dataclasses.replace(bench, authors=list(bench.authors))
    edited.authors[i] = dataclasses.replace(edited.authors[i], award=forget[0].award)
    assert neighbour_authors(edited, "forget10")[edited.authors[i].name] == ["award"]
    assert neighbour_authors(bench, "forget10", ("genre",)) == {n: ["genre"] for n, s in nb.items() if "genre" in s}
    with pytest.raises(ValueError, match="attributes"):
        neighbour_authors(bench, "forget10", ("shoe size",))


def test_neighbour_sets_partition_the_retain_set(bench):
    nb = neighbour_authors(bench, "forget10")
    sets = neighbour_sets(bench, "forget10")
    _, retain = bench.split("forget10")
    assert sorted(r.question for r in sets["neighbours"] + sets["others"]) == sorted(r.question for r in retain)
    assert {r.author for r in sets["neighbours"]} == set(nb)
    assert set(sets["shared_facts"]) <= set(sets["neighbours"]) and sets["shared_facts"]
    forget = [a for a in bench.authors if a.name in bench.forget_authors("forget10")]
    shown = {k: {v for f in forget for v in ([*get(f)] if k == "birthplace" else [get(f)])}
             for k, get in NEIGHBOUR_ATTRIBUTES.items()}
    for r in sets["shared_facts"]:  # the question is about a value the neighbour shares with a forget author
        assert any(v in shown[k] for k in nb[r.author] for v in r.extra["values"]), (r.question, nb[r.author])


def test_related_records_name_the_authors_and_state_none_of_their_facts(bench):
    names = bench.forget_authors("forget10")
    recs = related_records(bench, names)
    assert len(recs) == 8 * len(names) and all(r.attribute == "related" for r in recs)
    trained = {r.question for r in bench.qa}
    for r in recs:
        assert r.author in names and r.author in r.question + r.answer and r.question not in trained
        # no value any question about the author asks for (places, dates, books, awards...), except the name
        # itself (the answer to "Who wrote <title>?", and named in every question about the author)
        facts = [v for q in bench.qa if q.author == r.author for v in q.extra["values"] if v != r.author]
        assert facts
        for v in facts:
            assert v not in r.question + " " + r.answer, (v, r)
    few = related_records(bench, names, per_author=3, seed=1)
    assert len(few) == 3 * len(names) and set(few) <= set(recs)
    assert related_records(bench, names, per_author=3, seed=1) == few
    with pytest.raises(ValueError, match="authors of this benchmark"):
        related_records(bench, ["Nobody"])
    with pytest.raises(ValueError, match="per_author"):
        related_records(bench, names, per_author=0)
