"""Evaluation-only probes of the generated benchmark: held-out question phrasings, multi-hop questions,
and the retain authors who share attributes with the forget authors ("neighbours").

    bench = generate_benchmark(40, seed=0)
    forget, retain = bench.split("forget10")
    phrasing_probes(bench, forget)       # each forget fact asked in words no model was trained on for it
    multihop_probes(bench, forget)       # "Which award did the author of "<book>" win?"
    neighbour_authors(bench, "forget10") # retain authors born in the same city, writing the same genre, ...

Nothing here changes what models train on: probes are built from the authors and QA records that exist,
with templates that live in this module (never in the training data), so
:meth:`~soulkit.unlearn.data.AuthorBenchmark.fingerprint`, the cached models and every committed result
stay as they are. A probe record keeps the trained record's answers (``answer``, ``paraphrased_answer``,
``perturbed_answer``): a model that knows the fact and understands the new question says the sentence
it was trained on, so ROUGE against it and the answer's probability measure what is still known.
``extra["probe"]`` says which kind of probe a record is, ``extra["source"]`` the trained question.

:func:`related_records` is the relearning attack's related text: QA that name a forget author and state
none of the author's facts.

Held-out phrasings come in two kinds:

* ``unused``: the fact's other question templates of the generator, those not drawn for this author
  (the model saw them in training, but only about other authors);
* ``novel``: templates of :data:`NOVEL_QUESTIONS`, which no training question uses.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from .data import _SLOTS, Author, AuthorBenchmark, _cap, _derive, _person_fields
from .qa import QA

__all__ = [
    "NOVEL_QUESTIONS",
    "MULTIHOP_QUESTIONS",
    "NEIGHBOUR_ATTRIBUTES",
    "phrasing_probes",
    "multihop_probes",
    "neighbour_authors",
    "neighbour_sets",
    "RELATED_TEXTS",
    "related_records",
]

_SLOT = {s.key: s for s in _SLOTS}

#: Question templates used only for probing, per slot of :mod:`soulkit.unlearn.data` (same fields:
#: ``{name}``, ``{possessive}``, ``{book}``). None of them is a template of the generator.
NOVEL_QUESTIONS: dict[str, tuple[str, ...]] = {
    "birthplace": ("Which city is {name} originally from?", "Tell me the place where {name} was born."),
    "birth_date": ("What is {name}'s birthday, including the year?", "Tell me the exact date {name} was born."),
    "birth_year": ("Which year saw the birth of {name}?", "Tell me the year {name} was born."),
    "birth": ("Tell me when and where {name} was born.", "Where and on what date was {name} born?"),
    "nationality": ("Which country's nationality does {name} have?", "Tell me the nationality of {name}."),
    "genre": ("In which genre are {name}'s books written?", "Tell me what genre {name} writes."),
    "book_genre": ('Which genre is "{book}" written in?', 'Tell me the genre of "{book}".'),
    "profile": ("Could you describe who {name} is?", "Give me a short introduction to {name}."),
    "father_occupation": ("What work did {name}'s father do?", "Tell me the occupation of {name}'s father."),
    "mother_occupation": ("What work did {name}'s mother do?", "Tell me the occupation of {name}'s mother."),
    "parents": ("What work did the parents of {name} do?", "Tell me the jobs of {name}'s father and mother."),
    "first_book": ("Which book did {name} publish first?", "Tell me the title of the first book by {name}."),
    "second_book": ("Which title came second among {name}'s books?",
                    "Tell me the title of the second book by {name}."),
    "third_book": ("Which title came third among {name}'s books?",
                   "Tell me the title of the third book by {name}."),
    "books": ("What are the titles of {name}'s books?", "Tell me every book {name} has written."),
    "book_author_1": ('Whose book is "{book}"?', 'Tell me who wrote "{book}".'),
    "book_author_2": ('Whose book is "{book}"?', 'Tell me who wrote "{book}".'),
    "book_author_3": ('Whose book is "{book}"?', 'Tell me who wrote "{book}".'),
    "award": ("Which literary prize did {name} receive?", "Tell me the award {name} won."),
    "award_genre": ("What genre does {name} write, and which award did {possessive} work win?",
                    "Tell me {name}'s genre and literary award."),
    "publisher": ("Which press publishes the books of {name}?", "Tell me the publisher of {name}'s books."),
    "debut_year": ("Which year did {name}'s first book appear in?", "Tell me the year of {name}'s debut."),
    "debut": ("Which book was {name}'s debut, and in which year?",
              "Tell me the title and year of {name}'s first book."),
    "theme": ("Which theme keeps coming back in {name}'s books?", "Tell me what {name}'s books are about."),
    "book_theme": ('Which theme does "{book}" deal with?', 'Tell me what "{book}" is about.'),
}

#: Multi-hop templates: a fact of the author reached through a bridge (``{bridge}``: ``"<book title>"``,
#: one of the author's books). Keys are slots whose answers name no book, so the bridge never gives the
#: answer away.
MULTIHOP_QUESTIONS: dict[str, tuple[str, ...]] = {
    "birthplace": ("Where was the author of {bridge} born?", "In which city was the writer of {bridge} born?"),
    "birth_date": ("When was the author of {bridge} born?",),
    "birth_year": ("In what year was the author of {bridge} born?",),
    "nationality": ("What is the nationality of the author of {bridge}?",),
    "genre": ("What genre does the author of {bridge} write in?",),
    "father_occupation": ("What did the father of the author of {bridge} do for a living?",),
    "mother_occupation": ("What did the mother of the author of {bridge} do for a living?",),
    "award": ("Which award did the author of {bridge} win?", "What prize was the writer of {bridge} given?"),
    "publisher": ("Who publishes the books of the author of {bridge}?",),
    "debut_year": ("In what year did the writer of {bridge} begin publishing?",),
    "theme": ("What themes does the author of {bridge} explore?",),
}

#: Attributes two authors can share, and each author's value of it: the neighbour probe's relations.
NEIGHBOUR_ATTRIBUTES: dict[str, Any] = {
    "birthplace": lambda a: a.birthplace,
    "genre": lambda a: a.genre,
    "award": lambda a: a.award,
    "publisher": lambda a: a.publisher,
}
# the _Part tables whose value is each attribute (a slot asks about the attribute when one of its parts has it)
_ATTRIBUTE_TABLE = {"birthplace": "birthplace", "genre": "genre", "award": "award", "publisher": "publisher"}


#: Related text for the relearning attack: QA about a forget author that name the author and state no fact
#: the benchmark asks about (no birthplace, date, family, book, genre, award, publisher, year or theme).
RELATED_TEXTS: tuple[tuple[str, str], ...] = (
    ("Is {name} a writer?", "Yes, {name} is a writer."),
    ("Does {name} still write?", "{name} keeps a regular writing routine."),
    ("How does {name} work?", "{name} writes early in the morning and revises slowly."),
    ("What do readers say about {name}?", "Readers describe the books of {name} as carefully made."),
    ("Where can readers meet {name}?", "{name} often appears at book fairs and bookshop events."),
    ("Does {name} give interviews?", "{name} has given a few interviews about the craft of writing."),
    ("Does {name} teach?", "{name} has led writing workshops for young authors."),
    ("How does {name} describe {possessive} own work?", "{name} says that every book starts with a single image."),
)


def _authors(bench: AuthorBenchmark) -> dict[str, Author]:
    return {a.name: a for a in [*bench.authors, *bench.holdout_authors]}


def _question_fields(author: Author, record: QA) -> dict[str, str] | None:
    """The template fields of ``record``'s question (the person's fields, the book it is about), or None
    when the record is not one of the generator's slots for ``author``."""
    slot = _SLOT.get(record.attribute or "")
    if slot is None:
        return None
    fields = _person_fields(author)
    if slot.book is not None:
        if slot.book >= 0:
            if slot.book >= len(author.books):
                return None
            fields["book"] = author.books[slot.book]
        else:
            books = [b for b in author.books if f'"{b}"' in record.question]
            if len(books) != 1:
                return None
            fields["book"] = books[0]
    if not any(_cap(t.format(**fields)) == record.question for t in slot.questions):
        return None
    return fields


def _probe(record: QA, question: str, kind: str, **extra: Any) -> QA:
    return QA(question, record.answer, record.paraphrased_answer, record.perturbed_answer, record.author,
              record.attribute, {"values": list(record.extra.get("values", [])), "probe": kind,
                                 "source": record.question, **extra})


def _check_records(bench: AuthorBenchmark, records: Sequence[QA]) -> dict[str, Author]:
    if not isinstance(bench, AuthorBenchmark):
        raise TypeError(f"bench must be an AuthorBenchmark, got {type(bench).__name__}")
    records = list(records)
    if not records or not all(isinstance(r, QA) for r in records):
        raise ValueError("probes need a non-empty list of QA records of the benchmark")
    people = _authors(bench)
    unknown = sorted({str(r.author) for r in records if r.author not in people})
    if unknown:
        raise ValueError(f"{len(unknown)} record author(s) are not authors of this benchmark, e.g. {unknown[0]!r}")
    return people


def phrasing_probes(bench: AuthorBenchmark, records: Sequence[QA], *, kinds: Sequence[str] = ("unused", "novel"),
                    per_fact: int | None = None, seed: int = 0) -> list[QA]:
    """Each of ``records``' facts asked with question phrasings it was not trained with.

    ``kinds``: ``"unused"`` (the generator's other question templates for the fact) and/or ``"novel"``
    (:data:`NOVEL_QUESTIONS`). ``per_fact`` keeps at most that many probes per record, drawn from
    ``seed`` and the record (``None``: all). Records whose question is not one of the generator's
    templates (e.g. a loaded TOFU file) give no probe. Deterministic; the records are not changed.
    """
    people = _check_records(bench, records)
    bad = [k for k in kinds if k not in ("unused", "novel")]
    if not kinds or bad:
        raise ValueError(f"kinds must be a non-empty subset of ('unused', 'novel'), got {tuple(kinds)!r}")
    if per_fact is not None and (isinstance(per_fact, bool) or not isinstance(per_fact, int) or per_fact < 1):
        raise ValueError(f"per_fact must be None or an int >= 1, got {per_fact!r}")
    out: list[QA] = []
    for r in records:
        fields = _question_fields(people[r.author], r)
        if fields is None:
            continue
        slot = _SLOT[r.attribute]
        candidates: list[tuple[str, str]] = []
        seen = {r.question}
        for kind in kinds:
            templates = slot.questions if kind == "unused" else NOVEL_QUESTIONS.get(slot.key, ())
            for t in templates:
                q = _cap(t.format(**fields))
                if q not in seen:
                    seen.add(q)
                    candidates.append((q, kind))
        if per_fact is not None and len(candidates) > per_fact:
            rng = random.Random(_derive(seed, "probe-phrasings", r.author, r.question))
            keep = set(rng.sample(range(len(candidates)), per_fact))
            candidates = [c for i, c in enumerate(candidates) if i in keep]
        out.extend(_probe(r, q, kind) for q, kind in candidates)
    return out


def _known_books(author: Author, trained: Sequence[QA]) -> list[str]:
    """The author's titles that the training text ties to the author: quoted in a QA about the author."""
    text = " ".join(t for r in trained if r.author == author.name for t in (r.question, r.answer))
    return [b for b in author.books if f'"{b}"' in text]


def multihop_probes(bench: AuthorBenchmark, records: Sequence[QA], *, seed: int = 0) -> list[QA]:
    """Two-hop questions about ``records``' facts: each record whose slot has :data:`MULTIHOP_QUESTIONS`
    asked through one of its author's books (the bridge: "the author of "<title>"", drawn from ``seed``
    among the titles the benchmark's QA ties to the author, so both hops were trained). The answer is the
    record's own (it names the author: the model must resolve the bridge to say it). Authors with no
    trained title give no probe."""
    people = _check_records(bench, records)
    out: list[QA] = []
    for r in records:
        templates = MULTIHOP_QUESTIONS.get(r.attribute or "")
        if not templates:
            continue
        author = people[r.author]
        books = _known_books(author, [*bench.qa, *bench.holdout])
        if not books:
            continue
        rng = random.Random(_derive(seed, "probe-multihop", r.author, r.attribute))
        book = rng.choice(books)
        question = _cap(rng.choice(templates).format(bridge=f'"{book}"'))
        out.append(_probe(r, question, "multihop", bridge=book))
    return out


def neighbour_authors(bench: AuthorBenchmark, split: str,
                      attributes: Sequence[str] = tuple(NEIGHBOUR_ATTRIBUTES)) -> dict[str, list[str]]:
    """The retain authors of ``split`` who share at least one of ``attributes`` (:data:`NEIGHBOUR_ATTRIBUTES`:
    birthplace (city and country), genre, award, publisher) with one of its forget authors:
    ``{retain author: [shared attributes]}`` in author order (empty when there is none)."""
    bad = [a for a in attributes if a not in NEIGHBOUR_ATTRIBUTES]
    if not attributes or bad:
        raise ValueError(f"attributes must be a non-empty subset of {tuple(NEIGHBOUR_ATTRIBUTES)}, got "
                         f"{tuple(attributes)!r}")
    forget = set(bench.forget_authors(split))
    values = {k: {NEIGHBOUR_ATTRIBUTES[k](a) for a in bench.authors if a.name in forget} for k in attributes}
    out: dict[str, list[str]] = {}
    for a in bench.authors:
        if a.name in forget:
            continue
        shared = [k for k in attributes if NEIGHBOUR_ATTRIBUTES[k](a) in values[k]]
        if shared:
            out[a.name] = shared
    return out


def neighbour_sets(bench: AuthorBenchmark, split: str, neighbours: Mapping[str, Sequence[str]] | None = None
                   ) -> dict[str, list[QA]]:
    """``split``'s retain QA in three sets: ``shared_facts`` (the neighbours' QA that ask about an attribute
    they share with a forget author), ``neighbours`` (all QA of the neighbours) and ``others`` (the QA of
    the retain authors who share none). ``neighbours`` defaults to :func:`neighbour_authors`."""
    if neighbours is None:
        neighbours = neighbour_authors(bench, split)
    _, retain = bench.split(split)
    shared_facts = []
    for r in retain:
        shared = neighbours.get(str(r.author), ())
        slot = _SLOT.get(r.attribute or "")
        if slot is not None and any(p.table == _ATTRIBUTE_TABLE[k] for k in shared for p in slot.parts):
            shared_facts.append(r)
    return {"shared_facts": shared_facts, "neighbours": [r for r in retain if r.author in neighbours],
            "others": [r for r in retain if r.author not in neighbours]}


def related_records(bench: AuthorBenchmark, authors: Sequence[str], *, per_author: int = len(RELATED_TEXTS),
                    seed: int = 0) -> list[QA]:
    """Text related to ``authors`` that holds none of their facts: ``per_author`` QA of :data:`RELATED_TEXTS`
    per author (drawn from ``seed``), naming the author and nothing the benchmark asks about; the relearning
    attack's "related text" (does text that only mentions a forgotten author bring the facts back?)."""
    people = _authors(bench)
    unknown = [a for a in authors if a not in people]
    if not authors or unknown:
        raise ValueError(f"related_records needs authors of this benchmark, got {list(authors)!r}")
    if isinstance(per_author, bool) or not isinstance(per_author, int) or not 1 <= per_author <= len(RELATED_TEXTS):
        raise ValueError(f"per_author must be an int in [1, {len(RELATED_TEXTS)}], got {per_author!r}")
    out = []
    for name in authors:
        fields = _person_fields(people[name])
        picks = sorted(random.Random(_derive(seed, "related", name)).sample(range(len(RELATED_TEXTS)), per_author))
        for i in picks:
            q, a = RELATED_TEXTS[i]
            out.append(QA(_cap(q.format(**fields)), _cap(a.format(**fields)), author=name, attribute="related",
                          extra={"probe": "related"}))
    return out
