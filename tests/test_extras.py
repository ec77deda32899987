"""soulkit._extras: the optional modules mapped to their pyproject extras; missing ones found and named."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from soulkit._extras import (
    EXTRAS,
    MissingExtraError,
    check_extra,
    install_hint,
    missing_extra,
    missing_extra_message,
)

# distribution name (as pyproject spells it) -> the module it is imported as
IMPORT_NAMES = {
    "faker": "faker",
    "rouge-score": "rouge_score",
    "tokenizers": "tokenizers",
    "scikit-learn": "sklearn",
    "triton": "triton",
    "accelerate": "accelerate",
}


def test_extras_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    optional = pyproject["project"]["optional-dependencies"]
    expected = {}
    for extra, reqs in optional.items():
        if extra in ("test", "dev"):  # bundles of the others for development, not something a user installs
            continue
        for req in reqs:
            dist = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()
            expected[IMPORT_NAMES[dist]] = extra
    assert EXTRAS == expected


def test_missing_extra_finds_optional_modules_only():
    assert missing_extra(ModuleNotFoundError("No module named 'rouge_score'", name="rouge_score")) == (
        "rouge_score", "unlearn"
    )
    assert missing_extra(ModuleNotFoundError("x", name="sklearn.metrics")) == ("sklearn", "influence")
    assert missing_extra(ModuleNotFoundError("No module named 'numpy'", name="numpy")) is None  # required
    assert missing_extra(ModuleNotFoundError("no name")) is None
    assert missing_extra(ValueError("faker")) is None and missing_extra(None) is None
    try:  # found through the exceptions an error was raised from
        try:
            raise ModuleNotFoundError("No module named 'faker'", name="faker")
        except ModuleNotFoundError as inner:
            raise RuntimeError("generating the benchmark failed") from inner
    except RuntimeError as outer:
        assert missing_extra(outer) == ("faker", "unlearn")


def test_message_names_the_extra():
    assert install_hint("trainer") == "pip install 'soulkit[trainer]'"
    assert missing_extra_message("accelerate", "trainer", "the HF Trainer") == (
        "'accelerate' is not installed; the HF Trainer needs the 'trainer' extra: pip install 'soulkit[trainer]'"
    )


def test_check_extra(monkeypatch):
    check_extra("unlearn")  # installed in the test environment
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # what an uninstalled module looks like to imports
    with pytest.raises(MissingExtraError, match=r"'rouge_score' is not installed; soulkit x needs the 'unlearn' "
                                                r"extra: pip install 'soulkit\[unlearn\]'") as err:
        check_extra("unlearn", "soulkit x")
    assert isinstance(err.value, ModuleNotFoundError) and err.value.name == "rouge_score"
    assert missing_extra(err.value) == ("rouge_score", "unlearn")
    check_extra("influence")  # other extras unaffected
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        check_extra("gpu")
