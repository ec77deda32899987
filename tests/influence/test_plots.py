"""Predicted-vs-actual scatter plots (soulkit.influence.plots): readable PNGs written atomically, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soulkit.influence import scatter_panels, scatter_predicted_vs_actual

PNG = b"\x89PNG\r\n\x1a\n"


def _image(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_scatter_png(tmp_path):
    x = np.linspace(0, 1, 30)
    path = scatter_predicted_vs_actual(x, 1.1 * x, tmp_path / "a" / "scatter.png", title="test")
    assert path.read_bytes()[:8] == PNG
    p2 = scatter_panels(
        {"one": {"first": (x, x), "newton": (x, 0.9 * x)}, "two": {"s": (torch.tensor(x), x)}},
        tmp_path / "p.png",
    )
    assert p2.stat().st_size > 1000
    with pytest.raises(ValueError, match="predicted has 30 points, actual has 3"):
        scatter_predicted_vs_actual(x, x[:3], tmp_path / "bad.png")


def test_png_is_readable_and_laid_out_in_panels(tmp_path):
    x = np.linspace(-1, 1, 20)
    one = _image(scatter_predicted_vs_actual(x, x, tmp_path / "one.png"))
    assert one.ndim == 3 and one.shape[2] in (3, 4) and one.shape[0] > 100 and one.shape[1] > 100
    assert float(one[..., :3].std()) > 0  # something was drawn
    three = _image(scatter_panels({f"p{i}": {"s": (x, x * i)} for i in range(3)}, tmp_path / "three.png", ncols=2))
    wide = _image(scatter_panels({f"p{i}": {"s": (x, x * i)} for i in range(3)}, tmp_path / "wide.png", ncols=3))
    assert three.shape[0] > 1.5 * one.shape[0]  # 2 x 2 grid (the fourth axis hidden): two rows
    assert wide.shape[1] > 2.5 * one.shape[1] and wide.shape[0] < 1.5 * one.shape[0]  # one row of three


@pytest.mark.filterwarnings("ignore:No artists with labels found")
def test_inputs_tensors_and_degenerate_series(tmp_path):
    t = torch.linspace(0, 1, 10, dtype=torch.float64, requires_grad=True)  # detached for plotting
    path = scatter_predicted_vs_actual(t * 2, t.detach().reshape(2, 5), tmp_path / "t.png")  # flattened
    assert path.read_bytes()[:8] == PNG
    # a constant series (no correlation or slope defined) and an empty one still plot
    flat = scatter_panels({"const": {"c": (np.ones(5), np.arange(5.0))}, "empty": {"e": ([], [])}}, tmp_path / "c.png")
    assert flat.read_bytes()[:8] == PNG


def test_written_atomically_and_returns_the_path(tmp_path):
    x = np.arange(5.0)
    target = tmp_path / "deep" / "er" / "s.png"
    assert scatter_predicted_vs_actual(x, x, str(target)) == target  # str paths accepted, a Path returned
    first = target.read_bytes()
    scatter_predicted_vs_actual(x, -x, target)  # replaced in place
    assert target.read_bytes() != first
    assert [p.name for p in target.parent.iterdir()] == ["s.png"]  # no temporary file left


def test_bad_input(tmp_path):
    x = np.arange(4.0)
    with pytest.raises(ValueError, match="panels is empty"):
        scatter_panels({}, tmp_path / "e.png")
    with pytest.raises(ValueError, match=r"series 'b': predicted has 4 points, actual has 2"):
        scatter_panels({"p": {"a": (x, x), "b": (x, x[:2])}}, tmp_path / "b.png")
    with pytest.raises(ValueError):
        scatter_predicted_vs_actual(["a", "b"], [1.0, 2.0], tmp_path / "s.png")  # not numbers
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "e.png").exists()
