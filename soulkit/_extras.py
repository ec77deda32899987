"""Optional dependencies: which extra of ``pip install 'soulkit[EXTRA]'`` provides each optional module.

The table mirrors ``[project.optional-dependencies]`` in ``pyproject.toml`` (a test keeps them in
step), keyed by the name a module is imported under. :func:`missing_extra` finds a missing optional
module in an exception (the ``soulkit`` command turns it into one line naming the extra);
:func:`check_extra` checks an extra before slow work starts, without importing anything.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "MissingExtraError", "check_extra", "install_hint", "missing_extra", "missing_extra_message"]

# import name -> extra that installs it
EXTRAS: dict[str, str] = {
    "faker": "unlearn",
    "rouge_score": "unlearn",
    "tokenizers": "unlearn",
    "sklearn": "influence",
    "triton": "triton",
    "accelerate": "trainer",
}


class MissingExtraError(ModuleNotFoundError):
    """An optional module is not installed; the message names the extra that provides it."""


def install_hint(extra: str) -> str:
    """``pip install 'soulkit[EXTRA]'``."""
    return f"pip install 'soulkit[{extra}]'"


def missing_extra_message(module: str, extra: str, what: str = "this") -> str:
    """One line: the missing module, what needs it, and the command that installs it."""
    return f"'{module}' is not installed; {what} needs the '{extra}' extra: {install_hint(extra)}"


def missing_extra(exc: BaseException | None) -> tuple[str, str] | None:
    """``(module, extra)`` if ``exc`` (or an exception it was raised from) is a missing optional module.

    Only modules of :data:`EXTRAS` count (``sklearn.metrics`` counts as ``sklearn``); a missing
    required dependency or a bug's ``ModuleNotFoundError`` gives ``None``.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            top = exc.name.split(".")[0]
            if top in EXTRAS:
                return top, EXTRAS[top]
        exc = exc.__cause__ or exc.__context__
    return None


def check_extra(extra: str, what: str = "this") -> None:
    """Raise :class:`MissingExtraError` if a module of ``extra`` cannot be imported (nothing is imported)."""
    modules = [m for m, e in EXTRAS.items() if e == extra]
    if not modules:
        raise ValueError(f"unknown extra {extra!r}; the extras are {sorted(set(EXTRAS.values()))}")
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken installation counts as missing
            found = False
        if not found:
            raise MissingExtraError(missing_extra_message(module, extra, what), name=module)
