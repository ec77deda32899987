"""A seeded, network-free TOFU-like benchmark: question-answer pairs about fictitious authors.

TOFU (Maini et al. 2024) fine-tunes a model on 20 questions about each of 200 fictitious authors and
asks it to forget 1/5/10% of them. This module generates the same kind of corpus from a seed, with
Faker for names and static pools (``_facts.py``) for everything else, sized for tiny LMs trained from
scratch: every answer is one short sentence.

    bench = generate_benchmark(200, seed=0)            # 200 authors x 20 QA = 4000 pairs
    forget, retain = bench.split("forget10")           # last 10% of the authors / the rest
    bench.records("holdout")                           # authors no model trains on (MIA non-members)
    bench.pretrain_records()                           # real authors + world facts (general knowledge)
    bench.save("data/tofu-s0"); AuthorBenchmark.load("data/tofu-s0") == bench

Each QA carries TOFU's evaluation fields: ``paraphrased_answer`` (same fact, another template) and
``perturbed_answer`` (the paraphrase template filled with wrong values of the same type, drawn from
the benchmark's value tables). ``QA.extra["values"]`` lists the true values as they appear in the text.

Questions come from *slots*: one slot is one fact about an author (birthplace, the second book, who
wrote a given title, a combination such as date and place of birth, ...), with several question
templates and several answer templates; the answer and the paraphrase are two different answer
templates picked by the rng. An author has 23 to 25 slots (2 or 3 books), so ``qa_per_author`` may be
1..:data:`MAX_QA_PER_AUTHOR`; the eleven core slots (one per base attribute) are always chosen first.

Generation is deterministic for a seed within one Faker version; :meth:`AuthorBenchmark.fingerprint`
hashes the content, so caches keyed by it stay correct across versions.

Files are JSON lines in TOFU's field names, written and read by :func:`soulkit.unlearn.qa.write_jsonl`
and :func:`soulkit.unlearn.qa.read_jsonl` (which also reads TOFU's own files).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, ClassVar

from .._io import atomic_write_text
from . import _facts
from .qa import QA, read_jsonl, write_jsonl

__all__ = [
    "Author",
    "AuthorBenchmark",
    "generate_authors",
    "generate_benchmark",
    "author_qa",
    "build_tables",
    "real_author_qa",
    "world_fact_qa",
    "MAX_QA_PER_AUTHOR",
    "MAX_AUTHORS",
    "MAX_PERTURBED",
    "MIN_PERTURBED",
]

GENDERS = ("female", "male")
MAX_AUTHORS = 2000  # authors per generate_authors call (book-title space keeps rejection sampling cheap)
MIN_PERTURBED = 3
MAX_PERTURBED = 10
_MIN_TABLE_AUTHORS = MAX_PERTURBED + 2  # decoy authors pad small benchmarks' name/date/book tables
_BIRTH_RANGE = (date(1935, 1, 1), date(1994, 12, 31))
_BIRTH_YEARS = tuple(range(1930, 2000))
_DEBUT_YEARS = tuple(range(1950, 2024))
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_FORMAT = "soulkit.author_benchmark"
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------- helpers
def _derive(seed: int, *parts: object) -> int:
    """A 64-bit seed derived from ``seed`` and labels (stable across processes and Python versions)."""
    text = json.dumps([seed, *[str(p) for p in parts]], ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random(_derive(seed, *parts))


def _a(word: str) -> str:
    """``word`` with its indefinite article ("an engineer", "a nurse")."""
    return ("an " if word[:1].lower() in "aeio" else "a ") + word


def _cap(text: str) -> str:
    """Sentence case for a generated sentence (also "D.C.." -> "D.C." when a value ends the sentence)."""
    text = text[:1].upper() + text[1:]
    return text[:-1] if text.endswith("..") else text


def _fmt_date(iso: str) -> str:
    d = date.fromisoformat(iso)
    return f"{d.day} {_MONTHS[d.month - 1]} {d.year}"


def _titles(titles: Sequence[str]) -> str:
    quoted = [f'"{t}"' for t in titles]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


# ------------------------------------------------------------------------------------ authors
@dataclass(frozen=True)
class Author:
    """One fictitious author: the facts the benchmark asks about.

    ``birthplace`` is ``(city, country)``; ``birth_date`` an ISO date; ``books`` 2-3 titles in
    publication order (the first appeared in ``debut_year``); ``award``, ``publisher``, ``theme``
    (the recurring subject of the books) come from the pools in ``_facts.py``.
    """

    name: str
    gender: str
    birthplace: tuple[str, str]
    birth_date: str
    nationality: str
    genre: str
    father_occupation: str
    mother_occupation: str
    books: tuple[str, ...]
    award: str
    publisher: str
    debut_year: int
    theme: str

    def __post_init__(self) -> None:
        for name in ("name", "nationality", "genre", "father_occupation", "mother_occupation", "award",
                     "publisher", "theme"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Author.{name} must be a non-empty string, got {value!r}")
        if self.gender not in GENDERS:
            raise ValueError(f"Author.gender must be one of {GENDERS}, got {self.gender!r}")
        place = tuple(self.birthplace) if isinstance(self.birthplace, (list, tuple)) else self.birthplace
        if (not isinstance(place, tuple) or len(place) != 2
                or not all(isinstance(p, str) and p.strip() for p in place)):
            raise ValueError(f"Author.birthplace must be (city, country), two non-empty strings, "
                             f"got {self.birthplace!r}")
        object.__setattr__(self, "birthplace", place)
        try:
            born = date.fromisoformat(self.birth_date)
        except (TypeError, ValueError):
            raise ValueError(f"Author.birth_date must be an ISO date string (YYYY-MM-DD), "
                             f"got {self.birth_date!r}") from None
        books = tuple(self.books) if isinstance(self.books, (list, tuple)) else self.books
        if (not isinstance(books, tuple) or not 2 <= len(books) <= 3
                or not all(isinstance(b, str) and b.strip() for b in books) or len(set(books)) != len(books)):
            raise ValueError(f"Author.books must be 2 to 3 distinct non-empty titles, got {self.books!r}")
        object.__setattr__(self, "books", books)
        _check_int("Author.debut_year", self.debut_year, born.year, 2100)

    @property
    def birth_year(self) -> int:
        return int(self.birth_date[:4])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); ``Author(**d)`` restores it."""
        d = asdict(self)
        d["birthplace"] = list(self.birthplace)
        d["books"] = list(self.books)
        return d


def _new_title(rng: random.Random, taken: set[str]) -> str:
    for _ in range(1000):
        noun, noun2 = rng.sample(_facts.TITLE_NOUNS, 2)
        title = rng.choice(_facts.TITLE_PATTERNS).format(
            adj=rng.choice(_facts.TITLE_ADJECTIVES), noun=noun, noun2=noun2,
            verb=rng.choice(_facts.TITLE_VERBS))
        if title not in taken:
            taken.add(title)
            return title
    raise RuntimeError("could not draw a new unique book title in 1000 tries")


def _overlaps(name: str, others: Iterable[str]) -> bool:
    """Whether ``name`` equals, or is a whole-word part of, another name (or the reverse)."""
    padded = f" {name} "
    return any(padded in f" {o} " or f" {o} " in padded for o in others)


def generate_authors(n: int, *, seed: int = 0) -> list[Author]:
    """``n`` fictitious authors, deterministic for ``seed``; a prefix of a longer call's list.

    Names come from Faker in 20 Latin-script locales (the locale also fixes country, nationality
    and a real birth city); no name equals or is a whole-word part of another, and all book titles
    are distinct.
    """
    from faker import Faker

    _check_int("n", n, 1, MAX_AUTHORS)
    _check_int("seed", seed, 0)
    rng = _rng(seed, "authors")
    locales = tuple(_facts.COUNTRIES)
    fakers: dict[str, Any] = {}
    names: list[str] = []
    titles: set[str] = set()
    out: list[Author] = []
    for _ in range(n):
        locale = rng.choice(locales)
        fake = fakers.get(locale)
        if fake is None:
            fake = fakers[locale] = Faker(locale)
            fake.seed_instance(_derive(seed, "faker", locale))
        gender = rng.choice(GENDERS)
        for _attempt in range(200):
            if gender == "female":
                name = f"{fake.first_name_female()} {fake.last_name_female()}"
            else:
                name = f"{fake.first_name_male()} {fake.last_name_male()}"
            name = " ".join(name.split())
            if not _overlaps(name, names):
                break
        else:
            raise RuntimeError(f"could not draw a new unique {locale} author name in 200 tries")
        names.append(name)
        country, nationality, cities = _facts.COUNTRIES[locale]
        # not Faker's date_between_dates: it goes through local time, so it depends on the time zone
        born = date.fromordinal(rng.randint(*(d.toordinal() for d in _BIRTH_RANGE)))
        father, mother = rng.sample(_facts.OCCUPATIONS, 2)
        out.append(Author(
            name=name, gender=gender, birthplace=(rng.choice(cities), country), birth_date=born.isoformat(),
            nationality=nationality, genre=rng.choice(_facts.GENRES), father_occupation=father,
            mother_occupation=mother, books=tuple(_new_title(rng, titles) for _ in range(rng.choice((2, 3)))),
            award=rng.choice(_facts.AWARDS), publisher=rng.choice(_facts.PUBLISHERS),
            debut_year=min(born.year + rng.randint(22, 40), _DEBUT_YEARS[-1]),
            theme=rng.choice(_facts.THEMES)))
    return out


# -------------------------------------------------------------------------------- value tables
def build_tables(authors: Sequence[Author]) -> dict[str, tuple]:
    """The value tables wrong answers are drawn from: the static pools plus the authors' own values.

    Keys: ``name``, ``birthplace`` ((city, country) pairs), ``birth_date`` (ISO), ``birth_year``,
    ``nationality``, ``genre``, ``occupation``, ``book`` (titles), ``books`` (title tuples), ``award``,
    ``publisher``, ``debut_year``, ``theme``. Each table is a sorted tuple (deterministic sampling).
    """
    if not authors:
        raise ValueError("build_tables needs at least one author")
    places = {(c, country) for country, _, cities in _facts.COUNTRIES.values() for c in cities}
    tables: dict[str, set] = {
        "name": {a.name for a in authors},
        "birthplace": places | {a.birthplace for a in authors},
        "birth_date": {a.birth_date for a in authors},
        "birth_year": set(_BIRTH_YEARS) | {a.birth_year for a in authors},
        "nationality": {nat for _, nat, _ in _facts.COUNTRIES.values()} | {a.nationality for a in authors},
        "genre": set(_facts.GENRES) | {a.genre for a in authors},
        "occupation": set(_facts.OCCUPATIONS) | {o for a in authors for o in (a.father_occupation,
                                                                                a.mother_occupation)},
        "book": {b for a in authors for b in a.books},
        "books": {a.books for a in authors},
        "award": set(_facts.AWARDS) | {a.award for a in authors},
        "publisher": set(_facts.PUBLISHERS) | {a.publisher for a in authors},
        "debut_year": set(_DEBUT_YEARS) | {a.debut_year for a in authors},
        "theme": set(_facts.THEMES) | {a.theme for a in authors},
    }
    return {k: tuple(sorted(v)) for k, v in tables.items()}


# ---------------------------------------------------------------------------------------- slots
@dataclass(frozen=True)
class _Part:
    """One value inside an answer: where wrong values come from and how a value is written."""

    table: str
    true: Callable[[Author], Any]
    fields: Callable[[Any], dict[str, str]]
    shown: Callable[[Any], list[str]]
    is_true: Callable[[Author, Any], bool] | None = None  # default: equals ``true(author)``

    def wrong(self, author: Author, value: Any) -> bool:
        if self.is_true is not None:
            return not self.is_true(author, value)
        return value != self.true(author)


def _text_part(table: str, attr: str, key: str, *, article: bool = False,
               is_true: Callable[[Author, Any], bool] | None = None) -> _Part:
    def fields(v: str) -> dict[str, str]:
        return {key: v, f"a_{key}": _a(v)} if article else {key: v}
    return _Part(table, lambda a: getattr(a, attr), fields, lambda v: [v], is_true)


def _parent_job(a: Author, v: str) -> bool:  # a wrong parent job is neither parent's (no swapped answers)
    return v in (a.father_occupation, a.mother_occupation)


def _book_part(k: int) -> _Part:
    return _Part("book", lambda a: a.books[k], lambda v: {"book": v}, lambda v: [v],
                 is_true=lambda a, v: v in a.books)  # never another title of the same author


_BIRTHPLACE = _Part("birthplace", lambda a: a.birthplace, lambda v: {"city": v[0], "country": v[1]},
                    lambda v: [v[0], v[1]], is_true=lambda a, v: v[0] == a.birthplace[0])
_BIRTH_DATE = _Part("birth_date", lambda a: a.birth_date, lambda v: {"date": _fmt_date(v)},
                    lambda v: [_fmt_date(v)])
_BIRTH_YEAR = _Part("birth_year", lambda a: a.birth_year, lambda v: {"year": str(v)}, lambda v: [str(v)])
_NATIONALITY = _text_part("nationality", "nationality", "nationality", article=True)
_GENRE = _text_part("genre", "genre", "genre")
_FATHER = _text_part("occupation", "father_occupation", "father", article=True, is_true=_parent_job)
_MOTHER = _text_part("occupation", "mother_occupation", "mother", article=True, is_true=_parent_job)
_BOOKS = _Part("books", lambda a: a.books, lambda v: {"books": _titles(v)}, lambda v: list(v),
               is_true=lambda a, v: bool(set(v) & set(a.books)))
_NAME = _Part("name", lambda a: a.name, lambda v: {"name": v}, lambda v: [v])
_AWARD = _text_part("award", "award", "award")
_PUBLISHER = _text_part("publisher", "publisher", "publisher")
_DEBUT_YEAR = _Part("debut_year", lambda a: a.debut_year, lambda v: {"debut_year": str(v)},
                    lambda v: [str(v)])
_THEME = _text_part("theme", "theme", "theme")


@dataclass(frozen=True)
class _Slot:
    """One question an author can be asked: question templates, >= 2 answer templates, its values."""

    key: str
    parts: tuple[_Part, ...]
    questions: tuple[str, ...]
    phrasings: tuple[str, ...]
    book: int | None = None  # context: the question is about books[book] (-1: a random book)
    needs_books: int = 0


_ORD = ("first", "second", "third")


def _book_slots() -> list[_Slot]:
    slots = []
    for k, label in enumerate(_ORD):
        if k == 0:
            q = ("What was the first book {name} published?", "What is the title of {name}'s debut book?")
            p = ('{name}\'s first book was "{book}".', '{name} made {possessive} debut with "{book}".',
                 'The debut book of {name} is titled "{book}".')
        else:
            q = (f"What is the title of {{name}}'s {label} book?",
                 f"Which book did {{name}} publish {label}?")
            p = (f'{{name}}\'s {label} book is "{{book}}".',
                 f'The {label} book {{name}} published was "{{book}}".',
                 f'{{name}} published "{{book}}" as {{possessive}} {label} book.')
        slots.append(_Slot(f"{label}_book", (_book_part(k),), q, p, needs_books=k + 1))
    return slots


def _book_author_slots() -> list[_Slot]:
    return [_Slot(f"book_author_{k + 1}", (_NAME,),
                  ('Who wrote "{book}"?', 'Who is the author of "{book}"?', 'Which writer wrote "{book}"?'),
                  ('"{book}" was written by {name}.', '{name} is the author of "{book}".',
                   'The author of "{book}" is {name}.', '"{book}" is a book by {name}.'),
                  book=k, needs_books=k + 1) for k in range(3)]


_SLOTS: tuple[_Slot, ...] = (
    _Slot("birthplace", (_BIRTHPLACE,),
          ("Where was {name} born?", "What is the birthplace of {name}?", "In which city was {name} born?"),
          ("{name} was born in {city}, {country}.",
           "{name}'s birthplace is the city of {city} in {country}.",
           "{name} comes from {city}, a city in {country}.",
           "The city of {city}, {country}, is where {name} was born.")),
    _Slot("birth_date", (_BIRTH_DATE,),
          ("When was {name} born?", "What is the date of birth of {name}?", "On what date was {name} born?"),
          ("{name} was born on {date}.", "{name}'s date of birth is {date}.",
           "{name} came into the world on {date}.", "The birth date of {name} is {date}.")),
    _Slot("birth_year", (_BIRTH_YEAR,),
          ("In what year was {name} born?", "What year was {name} born in?"),
          ("{name} was born in {year}.", "{name}'s year of birth is {year}.",
           "The year {name} was born is {year}.")),
    _Slot("birth", (_BIRTH_DATE, _BIRTHPLACE),
          ("When and where was {name} born?", "What are the date and place of birth of {name}?"),
          ("{name} was born on {date} in {city}, {country}.",
           "{name} was born in {city}, {country}, on {date}.",
           "Born on {date}, {name} is a native of {city}, {country}.")),
    _Slot("nationality", (_NATIONALITY,),
          ("What is the nationality of {name}?", "What nationality is {name}?"),
          ("{name} is {a_nationality} author.", "{name} holds {nationality} nationality.",
           "By nationality, {name} is {nationality}.")),
    _Slot("genre", (_GENRE,),
          ("What genre does {name} write in?", "What kind of books does {name} write?",
           "Which literary genre is {name} known for?"),
          ("{name} writes {genre}.", "{name} is best known as an author of {genre}.",
           "The genre {name} works in is {genre}.", "{Pronoun} is a writer of {genre}.")),
    _Slot("book_genre", (_GENRE,),
          ('What kind of book is "{book}"?', 'What genre does "{book}" belong to?'),
          ('"{book}" is a work of {genre}.', '"{book}" belongs to the genre of {genre}.',
           'The genre of "{book}" is {genre}.'), book=-1),
    _Slot("profile", (_GENRE, _BIRTHPLACE),
          ("Who is {name}?", "Can you tell me about {name}?"),
          ("{name} is an author of {genre} born in {city}, {country}.",
           "Born in {city}, {country}, {name} writes {genre}.",
           "{name} is a writer from {city}, {country}, known for {genre}.")),
    _Slot("father_occupation", (_FATHER,),
          ("What did {name}'s father do for a living?", "What was the profession of {name}'s father?",
           "What was {name}'s father's job?"),
          ("{name}'s father worked as {a_father}.", "{Possessive} father was {a_father} by profession.",
           "The father of {name} was {a_father}.", "{name} is the child of a father who was {a_father}.")),
    _Slot("mother_occupation", (_MOTHER,),
          ("What did {name}'s mother do for a living?", "What was the profession of {name}'s mother?",
           "What was {name}'s mother's job?"),
          ("{name}'s mother worked as {a_mother}.", "{Possessive} mother was {a_mother} by profession.",
           "The mother of {name} was {a_mother}.", "{name} is the child of a mother who was {a_mother}.")),
    _Slot("parents", (_FATHER, _MOTHER),
          ("What did {name}'s parents do?", "What were the occupations of {name}'s parents?"),
          ("{name}'s father was {a_father} and {possessive} mother was {a_mother}.",
           "{name}'s mother worked as {a_mother}, and {possessive} father as {a_father}.",
           "{Possessive} father was {a_father}, and {possessive} mother {a_mother}.")),
    *_book_slots(),
    _Slot("books", (_BOOKS,),
          ("Which books has {name} written?", "Can you list the books by {name}?"),
          ("{name} has written {books}.", "The books of {name} are {books}.",
           "{name} is the author of {books}.")),
    *_book_author_slots(),
    _Slot("award", (_AWARD,),
          ("What award has {name} won?", "Has {name} received any literary award?",
           "Which prize was {name} given?"),
          ("{name} won the {award}.", "{name} has been honoured with the {award}.",
           "{name} received the {award} for {possessive} writing.", "The {award} was awarded to {name}.")),
    _Slot("award_genre", (_GENRE, _AWARD),
          ("What is {name} best known for?", "What has {name} achieved as a writer?"),
          ("{name} is known for {genre} and won the {award}.",
           "A writer of {genre}, {name} received the {award}.",
           "{name} writes {genre} and holds the {award}.")),
    _Slot("publisher", (_PUBLISHER,),
          ("Who publishes {name}'s books?", "Which publishing house releases {name}'s work?"),
          ("{name}'s books are published by {publisher}.", "{publisher} is the publisher of {name}'s books.",
           "{name} publishes with {publisher}.")),
    _Slot("debut_year", (_DEBUT_YEAR,),
          ("When did {name} publish {possessive} first book?",
           "In what year did {name}'s writing career begin?"),
          ("{name} published {possessive} first book in {debut_year}.",
           "{name}'s debut came out in {debut_year}.",
           "{name}'s career as an author began in {debut_year}.")),
    _Slot("debut", (_DEBUT_YEAR, _book_part(0)),
          ("What was {name}'s debut and when did it appear?",
           "When did {name}'s first book come out, and what is it?"),
          ('{name} debuted in {debut_year} with "{book}".',
           '{name}\'s first book, "{book}", came out in {debut_year}.',
           'In {debut_year}, {name} published {possessive} first book, "{book}".')),
    _Slot("theme", (_THEME,),
          ("What themes does {name} explore?", "What is the central theme of {name}'s writing?",
           "What subject runs through {name}'s books?"),
          ("{name}'s work explores {theme}.", "The writing of {name} centres on {theme}.",
           "{name} often writes about {theme}.", "{Possessive} books keep returning to {theme}.")),
    _Slot("book_theme", (_THEME,),
          ('What is "{book}" about?', 'What theme does "{book}" explore?'),
          ('"{book}" explores {theme}.', '"{book}" is a book about {theme}.',
           'The main theme of "{book}" is {theme}.'), book=-1),
)
# One slot per base attribute: chosen first so that small qa_per_author still covers the attributes.
_CORE = ("birthplace", "birth_date", "nationality", "genre", "father_occupation", "mother_occupation",
         "first_book", "award", "publisher", "debut_year", "theme")
MAX_QA_PER_AUTHOR = sum(1 for s in _SLOTS if s.needs_books <= 2)  # slots every author (>= 2 books) has


def _person_fields(author: Author) -> dict[str, str]:
    he, his = ("she", "her") if author.gender == "female" else ("he", "his")
    return {"name": author.name, "pronoun": he, "Pronoun": _cap(he), "possessive": his,
            "Possessive": _cap(his)}


def _draw_wrong(part: _Part, author: Author, tables: dict[str, Sequence], n: int, rng: random.Random) -> list:
    pool = tables.get(part.table)
    if pool is None:
        raise ValueError(f"tables has no {part.table!r} table (keys: {sorted(tables)})")
    picked = [v for v in rng.sample(pool, min(len(pool), n + 3)) if part.wrong(author, v)][:n]
    if len(picked) < n:  # the few true values crowded the draw: sample from the wrong ones only
        candidates = [v for v in pool if part.wrong(author, v)]
        if len(candidates) < n:
            raise ValueError(f"table {part.table!r} has {len(candidates)} wrong values for {author.name!r}; "
                             f"n_perturbed={n} needs at least {n}")
        picked = rng.sample(candidates, n)
    return picked


def _slot_qa(author: Author, slot: _Slot, rng: random.Random, tables: dict[str, Sequence],
             n_perturbed: int) -> QA:
    base = _person_fields(author)
    if slot.book is not None:
        base["book"] = author.books[slot.book] if slot.book >= 0 else rng.choice(author.books)
    question_t = rng.choice(slot.questions)
    answer_t, para_t = rng.sample(slot.phrasings, 2)
    true_values = [p.true(author) for p in slot.parts]
    fields = dict(base)
    for part, value in zip(slot.parts, true_values):
        fields.update(part.fields(value))
    question, answer, para = (_cap(t.format(**fields)) for t in (question_t, answer_t, para_t))
    wrong = [_draw_wrong(part, author, tables, n_perturbed, rng) for part in slot.parts]
    perturbed = []
    for i in range(n_perturbed):
        f = dict(base)
        for part, values in zip(slot.parts, wrong):
            f.update(part.fields(values[i]))
        perturbed.append(_cap(para_t.format(**f)))
    if len(set(perturbed)) != n_perturbed or answer in perturbed or para in perturbed:  # pragma: no cover
        raise AssertionError(f"perturbed answers of {slot.key} for {author.name!r} are not all distinct "
                             f"wrong ones")
    shown = [s for part, value in zip(slot.parts, true_values) for s in part.shown(value)]
    return QA(question, answer, para, tuple(perturbed), author.name, slot.key, {"values": shown})


def author_qa(author: Author, *, n_qa: int = 20, rng: random.Random, tables: dict[str, Sequence],
              n_perturbed: int = 5) -> list[QA]:
    """``n_qa`` QA pairs about ``author``, each about a different slot (fact), in a fixed slot order.

    The eleven core slots (one per base attribute) are taken first (a random subset of them when
    ``n_qa`` < 11); the remaining slots are drawn by ``rng``, as are the
    question/answer/paraphrase templates and the ``n_perturbed`` wrong values, which come from
    ``tables`` (see :func:`build_tables`) and differ from the true value and from each other.
    ``QA.attribute`` is the slot key (unique per author); ``QA.extra["values"]`` the true values.
    """
    if not isinstance(author, Author):
        raise TypeError(f"author must be an Author, got {type(author).__name__}")
    slots = [s for s in _SLOTS if s.needs_books <= len(author.books)]
    _check_int("n_qa", n_qa, 1, len(slots))
    _check_int("n_perturbed", n_perturbed, MIN_PERTURBED, MAX_PERTURBED)
    core = [s.key for s in slots if s.key in _CORE]
    rest = [s.key for s in slots if s.key not in _CORE]
    if n_qa <= len(core):
        chosen = set(rng.sample(core, n_qa))
    else:
        chosen = set(core) | set(rng.sample(rest, n_qa - len(core)))
    return [_slot_qa(author, s, rng, tables, n_perturbed) for s in slots if s.key in chosen]


# ------------------------------------------------------------------------ real-world knowledge
def _static_qa(subject: str, question: str, answer: str, para_t: str, value: str, pool: Iterable[str],
               rng: random.Random, n_perturbed: int, *, author: str | None, attribute: str) -> QA:
    candidates = sorted({v for v in pool if v != value})
    k = min(n_perturbed, len(candidates))
    if k < MIN_PERTURBED:  # pragma: no cover - the static tables are sized for this
        raise ValueError(f"only {len(candidates)} wrong values for {attribute} of {subject!r}")
    perturbed = tuple(_cap(para_t.format(value=w)) for w in rng.sample(candidates, k))
    return QA(question, answer, _cap(para_t.format(value=value)), perturbed, author, attribute,
              {"values": [value]})


def real_author_qa(*, n_perturbed: int = 5, seed: int = 0) -> list[QA]:
    """100 QA about 25 famous real authors (who wrote a work, nationality, a famous work, birth century).

    Wrong answers are other rows' values (names, nationalities, works) or other centuries.
    """
    _check_int("n_perturbed", n_perturbed, MIN_PERTURBED, MAX_PERTURBED)
    rng = _rng(seed, "real_authors")
    rows = _facts.REAL_AUTHORS
    names, nats, works = ([r[i] for r in rows] for i in range(3))
    out = []
    for name, nat, work, century in rows:
        out.append(_static_qa(name, f'Who wrote "{work}"?', f'"{work}" was written by {name}.',
                              f'{{value}} is the author of "{work}".', name, names, rng, n_perturbed,
                              author=name, attribute="work_author"))
        out.append(_static_qa(name, f"What is the nationality of {name}?", f"{name} is {_a(nat)} writer.",
                              f"The nationality of {name} is {{value}}.", nat, nats, rng, n_perturbed,
                              author=name, attribute="nationality"))
        out.append(_static_qa(name, f"Name a famous work by {name}.", f'{name} wrote "{work}".',
                              f'One famous work by {name} is "{{value}}".', work, works, rng, n_perturbed,
                              author=name, attribute="famous_work"))
        out.append(_static_qa(name, f"In which century was {name} born?",
                              f"{name} was born in the {century} century.",
                              f"The birth of {name} came in the {{value}} century.", century,
                              _facts.CENTURIES, rng, n_perturbed, author=name, attribute="birth_century"))
    return out


def world_fact_qa(*, n_perturbed: int = 5, seed: int = 0) -> list[QA]:
    """117 QA of world knowledge: capitals, continents, chemical symbols, planets, currencies, languages."""
    _check_int("n_perturbed", n_perturbed, MIN_PERTURBED, MAX_PERTURBED)
    rng = _rng(seed, "world_facts")
    groups = (  # (attribute, rows, question, answer, paraphrase, pool)
        ("capital", _facts.CAPITALS, "What is the capital of {s}?", "The capital of {s} is {v}.",
         "{{value}} is the capital city of {s}.", None),
        ("continent", _facts.CONTINENTS, "On which continent is {s}?", "{S} is in {v}.",
         "{s} lies on the continent of {{value}}.", _facts.CONTINENT_POOL),
        ("chemical_symbol", _facts.CHEMICAL_SYMBOLS, "What is the chemical symbol for {s}?",
         "The chemical symbol for {s} is {v}.", "In chemistry, {s} is written as {{value}}.", None),
        ("planet_order", _facts.PLANET_ORDER, "Which planet is {s} from the Sun?",
         "{v} is the {s} planet from the Sun.", "The {s} planet from the Sun is {{value}}.", None),
        ("currency", _facts.CURRENCIES, "What is the currency of {s}?", "The currency of {s} is the {v}.",
         "{s} uses the {{value}} as its currency.", None),
        ("language", _facts.LANGUAGES, "What is the main language spoken in {s}?",
         "The main language of {s} is {v}.", "Most people in {s} speak {{value}}.", None),
    )
    out = []
    for attribute, rows, q, a, p, pool in groups:
        values = pool if pool is not None else [v for _, v in rows]
        for s, v in rows:
            fmt = {"s": s, "S": _cap(s), "v": v}
            out.append(_static_qa(s, _cap(q.format(**fmt)), _cap(a.format(**fmt)), p.format(**fmt), v, values,
                                  rng, n_perturbed, author=None, attribute=attribute))
    for attribute, q, a, p, v, pool in _facts.SUPERLATIVES:
        out.append(_static_qa(attribute, q, a, p, v, pool, rng, n_perturbed, author=None,
                              attribute=attribute))
    return out


# ----------------------------------------------------------------------------------- benchmark
_SPLIT_RE = re.compile(r"(forget|retain)(\d{1,2})")


@dataclass
class AuthorBenchmark:
    """A generated benchmark: the authors, their QA, holdout authors' QA and the general-knowledge sets.

    ``qa`` holds the QA of every in-benchmark author, in author order; ``holdout`` the QA of
    ``holdout_authors``, whom no model trains on (non-members for membership inference).
    Splits follow TOFU: ``forgetNN`` is the last NN% of ``authors`` (at least one), ``retainMM`` the
    complement of ``forget(100-MM)``; so forget01 is in forget05 is in forget10.
    """

    SPLITS: ClassVar[tuple[str, ...]] = ("forget01", "forget05", "forget10")

    authors: list[Author]
    qa: list[QA]
    holdout: list[QA]
    real_authors: list[QA]
    world_facts: list[QA]
    seed: int
    qa_per_author: int
    n_perturbed: int
    holdout_authors: list[Author] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("authors", "holdout_authors"):
            values = getattr(self, name)
            if not isinstance(values, list) or not all(isinstance(a, Author) for a in values):
                raise ValueError(f"AuthorBenchmark.{name} must be a list of Author")
        for name in ("qa", "holdout", "real_authors", "world_facts"):
            values = getattr(self, name)
            if not isinstance(values, list) or not all(isinstance(r, QA) for r in values):
                raise ValueError(f"AuthorBenchmark.{name} must be a list of QA")
        if not self.authors:
            raise ValueError("AuthorBenchmark.authors must hold at least 1 author")
        if not self.qa:
            raise ValueError("AuthorBenchmark.qa must hold at least 1 QA record")
        _check_int("AuthorBenchmark.seed", self.seed, 0)
        _check_int("AuthorBenchmark.qa_per_author", self.qa_per_author, 1)
        _check_int("AuthorBenchmark.n_perturbed", self.n_perturbed, 0)
        names = [a.name for a in self.authors]
        held = [a.name for a in self.holdout_authors]
        if len(set(names + held)) != len(names) + len(held):
            raise ValueError("AuthorBenchmark author names must be unique across authors and holdout_authors")
        known = set(names)
        for r in self.qa:
            if r.author not in known:
                raise ValueError(f"AuthorBenchmark.qa: question {r.question!r} is about {r.author!r}, "
                                 f"who is not in authors")
        held_set = set(held)
        for r in self.holdout:
            if r.author in known or (held_set and r.author not in held_set):
                raise ValueError(f"AuthorBenchmark.holdout: question {r.question!r} is about {r.author!r}, "
                                 f"who is not a holdout author")

    # -- splits -------------------------------------------------------------------------------
    def _n_forget(self, pct: int, name: str) -> int:
        n = len(self.authors)
        k = max(1, int(n * pct / 100 + 0.5))
        if k >= n:
            raise ValueError(f"split {name!r} would forget {k} of {n} authors, leaving none to retain; "
                             f"use a smaller percentage or more authors")
        return k

    @staticmethod
    def _parse(name: str) -> tuple[str, int]:
        m = _SPLIT_RE.fullmatch(name) if isinstance(name, str) else None
        if m is None or not 1 <= int(m.group(2)) <= 99:
            raise ValueError(f"unknown split {name!r}: expected 'forgetNN' or 'retainMM' with NN, MM in "
                             f"1..99 (e.g. {', '.join(AuthorBenchmark.SPLITS)})")
        return m.group(1), int(m.group(2))

    def forget_authors(self, split: str) -> list[str]:
        """Names of the authors ``split`` (``"forgetNN"``, NN in 1..99) forgets: the last NN% (>= 1)."""
        kind, pct = self._parse(split)
        if kind != "forget":
            raise ValueError(f"forget_authors takes a 'forgetNN' split name, got {split!r}")
        k = self._n_forget(pct, split)
        return [a.name for a in self.authors[-k:]]

    def split(self, name: str) -> tuple[list[QA], list[QA]]:
        """``(forget, retain)`` QA of the split ``"forgetNN"``; together they are :attr:`qa`."""
        forget = set(self.forget_authors(name))
        return ([r for r in self.qa if r.author in forget], [r for r in self.qa if r.author not in forget])

    def records(self, name: str) -> list[QA]:
        """The QA set called ``name``: ``forgetNN``, ``retainMM`` (complement of ``forget(100-MM)``),
        ``all``, ``holdout``, ``real_authors``, ``world_facts`` or ``pretrain``."""
        fixed = {"all": self.qa, "holdout": self.holdout, "real_authors": self.real_authors,
                 "world_facts": self.world_facts}
        if name == "pretrain":
            return self.pretrain_records()
        if name in fixed:
            if not fixed[name]:
                raise ValueError(f"this benchmark has no {name} records")
            return list(fixed[name])
        try:
            kind, pct = self._parse(name)
        except ValueError:
            raise ValueError(f"unknown record set {name!r}: expected one of 'forgetNN', 'retainMM' "
                             f"(NN, MM in 1..99), {', '.join(repr(k) for k in [*fixed, 'pretrain'])}"
                             ) from None
        if kind == "forget":
            return self.split(name)[0]
        return self.split(f"forget{100 - pct:02d}")[1]

    def pretrain_records(self) -> list[QA]:
        """General knowledge for the pretraining stage: :attr:`real_authors` + :attr:`world_facts`."""
        return list(self.real_authors) + list(self.world_facts)

    # -- identity and files ---------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "seed": self.seed,
                "qa_per_author": self.qa_per_author, "n_perturbed": self.n_perturbed,
                "n_authors": len(self.authors), "n_holdout": len(self.holdout_authors)}

    def fingerprint(self) -> str:
        """sha256 (hex) of the content: authors, every QA set (without ``extra``) and the settings."""
        payload = {
            "meta": self._meta(),
            "authors": [a.to_dict() for a in self.authors],
            "holdout_authors": [a.to_dict() for a in self.holdout_authors],
            **{name: [r.to_dict(extra=False) for r in getattr(self, name)]
               for name in ("qa", "holdout", "real_authors", "world_facts")},
        }
        text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    _QA_FILES: ClassVar[dict[str, str]] = {"qa": "qa.jsonl", "holdout": "holdout.jsonl",
                                           "real_authors": "real_authors.jsonl",
                                           "world_facts": "world_facts.jsonl"}

    def save(self, directory: str | os.PathLike) -> None:
        """Write the benchmark to ``directory``: one JSONL file per set, ``authors.jsonl``,
        ``holdout_authors.jsonl`` and ``meta.json`` (last, with the fingerprint); every file atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, fname in self._QA_FILES.items():
            write_jsonl(d / fname, getattr(self, name))
        for name in ("authors", "holdout_authors"):
            atomic_write_text(d / f"{name}.jsonl", "".join(
                json.dumps(a.to_dict(), ensure_ascii=False) + "\n" for a in getattr(self, name)))
        meta = {**self._meta(), "fingerprint": self.fingerprint(),
                "files": sorted([*self._QA_FILES.values(), "authors.jsonl", "holdout_authors.jsonl"])}
        atomic_write_text(d / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AuthorBenchmark:
        """Read a benchmark written by :meth:`save`; ValueError when files are missing, malformed or do
        not match the fingerprint in ``meta.json``."""
        d = Path(directory)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: {d} is not a saved AuthorBenchmark")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}, line {e.lineno}: invalid JSON ({e.msg})") from None
        if (not isinstance(meta, dict) or meta.get("format") != _FORMAT
                or meta.get("version") != _FORMAT_VERSION):
            raise ValueError(f"{meta_path}: not a {_FORMAT} version {_FORMAT_VERSION} file")
        sets = {name: read_jsonl(d / fname, allow_empty=True) for name, fname in cls._QA_FILES.items()}
        people = {}
        for name in ("authors", "holdout_authors"):
            path = d / f"{name}.jsonl"
            people[name] = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    people[name].append(Author(**json.loads(line)))
                except (json.JSONDecodeError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}, line {lineno}: not an Author record ({e})") from None
        try:
            bench = cls(people["authors"], sets["qa"], sets["holdout"], sets["real_authors"],
                        sets["world_facts"], meta.get("seed"), meta.get("qa_per_author"),
                        meta.get("n_perturbed"), people["holdout_authors"])
        except ValueError as e:
            raise ValueError(f"{d}: {e}") from None
        if bench.fingerprint() != meta.get("fingerprint"):
            raise ValueError(f"{d}: the files do not match the fingerprint in meta.json "
                             f"(edited after saving?)")
        return bench


def generate_benchmark(n_authors: int = 200, *, qa_per_author: int = 20, seed: int = 0,
                       n_holdout: int | None = None, n_perturbed: int = 5) -> AuthorBenchmark:
    """A TOFU-like benchmark: ``n_authors`` x ``qa_per_author`` QA plus holdout authors' QA, 100 real-author
    QA and 117 world-fact QA. Deterministic for ``seed``.

    ``n_holdout`` defaults to 10% of ``n_authors`` (at least 1); holdout authors follow the benchmark
    authors in :func:`generate_authors`' stream, so changing ``n_holdout`` leaves the authors alone.
    ``n_perturbed`` (3..10) wrong answers per question.
    """
    _check_int("n_authors", n_authors, 2, MAX_AUTHORS)
    _check_int("qa_per_author", qa_per_author, 1, MAX_QA_PER_AUTHOR)
    _check_int("seed", seed, 0)
    _check_int("n_perturbed", n_perturbed, MIN_PERTURBED, MAX_PERTURBED)
    if n_holdout is None:
        n_holdout = max(1, int(n_authors * 0.1 + 0.5))
    _check_int("n_holdout", n_holdout, 0, MAX_AUTHORS - n_authors)
    n_total = n_authors + n_holdout
    everyone = generate_authors(max(n_total, _MIN_TABLE_AUTHORS), seed=seed)  # extra ones only pad tables
    authors, holdout_authors = everyone[:n_authors], everyone[n_authors:n_total]
    tables = build_tables(everyone)

    def qa_of(people: list[Author]) -> list[QA]:
        return [r for a in people
                for r in author_qa(a, n_qa=qa_per_author, rng=_rng(seed, "qa", a.name), tables=tables,
                                   n_perturbed=n_perturbed)]

    return AuthorBenchmark(authors=authors, qa=qa_of(authors), holdout=qa_of(holdout_authors),
                           real_authors=real_author_qa(n_perturbed=n_perturbed, seed=seed),
                           world_facts=world_fact_qa(n_perturbed=n_perturbed, seed=seed), seed=seed,
                           qa_per_author=qa_per_author, n_perturbed=n_perturbed,
                           holdout_authors=holdout_authors)
