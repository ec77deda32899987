"""Predicted-vs-actual scatter plots (PNG), drawn with matplotlib's Agg canvas (no global pyplot state)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["scatter_panels", "scatter_predicted_vs_actual"]

Series = Mapping[str, tuple[Any, Any]]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _draw(ax: Any, series: Series, title: str | None, xlabel: str, ylabel: str) -> None:
    lo, hi = math.inf, -math.inf
    for label, (pred, act) in series.items():
        p, a = _np(pred), _np(act)
        if p.shape != a.shape:
            raise ValueError(f"series {label!r}: predicted has {p.size} points, actual has {a.size}")
        if p.size == 0:
            continue
        slope = np.polyfit(p, a, 1)[0] if p.size > 1 and np.ptp(p) > 0 else float("nan")
        r = np.corrcoef(p, a)[0, 1] if p.size > 1 and np.ptp(p) > 0 and np.ptp(a) > 0 else float("nan")
        ax.scatter(p, a, s=6, alpha=0.5, label=f"{label} (r={r:.3f}, slope={slope:.2f})")
        lo, hi = min(lo, p.min(), a.min()), max(hi, p.max(), a.max())
    if math.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="y = x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, out)  # atomic
    return out


def scatter_predicted_vs_actual(
    predicted: Any,
    actual: Any,
    path: str | os.PathLike[str],
    *,
    label: str = "scores",
    title: str | None = None,
    xlabel: str = "predicted loss change (influence)",
    ylabel: str = "actual loss change (retrained)",
) -> Path:
    """Scatter of predicted against actual leave-one-out effects with the ``y = x`` line; writes a PNG.

    ``predicted``/``actual``: arrays or tensors of equal size (flattened). Returns the path written.
    """
    return scatter_panels({title or "": {label: (predicted, actual)}}, path, xlabel=xlabel, ylabel=ylabel)


def scatter_panels(
    panels: Mapping[str, Series],
    path: str | os.PathLike[str],
    *,
    ncols: int = 2,
    xlabel: str = "predicted loss change (influence)",
    ylabel: str = "actual loss change (retrained)",
    suptitle: str | None = None,
) -> Path:
    """One scatter panel per entry of ``panels`` (``title -> {label: (predicted, actual)}``); writes a PNG."""
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("panels is empty")
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items()):
        _draw(ax, series, title, xlabel, ylabel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if suptitle:
        fig.suptitle(suptitle)
    return _save(fig, path)
