"""The public surface: each package's ``__init__`` exports what a user calls, loads lazily where it says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import soulkit
import soulkit.demos
import soulkit.influence


@pytest.mark.parametrize("package", [soulkit, soulkit.influence, soulkit.demos], ids=lambda m: m.__name__)
def test_every_exported_name_resolves(package):
    assert len(set(package.__all__)) == len(package.__all__)
    for name in package.__all__:
        assert getattr(package, name) is not None, name
        assert name in dir(package)


def test_top_level_entry_points():
    from soulkit.influence import InfluenceAnalyzer
    from soulkit.optim import AdaHessian, Sophia
    from soulkit.unlearn import Unlearner

    assert (soulkit.Sophia, soulkit.AdaHessian, soulkit.InfluenceAnalyzer, soulkit.Unlearner) == (
        Sophia, AdaHessian, InfluenceAnalyzer, Unlearner
    )
    assert soulkit.optim is sys.modules["soulkit.optim"]
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        soulkit.nope  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'train_lm'"):
        soulkit.demos.train_lm  # noqa: B018


def test_influence_internals_stay_in_their_modules():
    from soulkit.influence.gradients import BoundLoss, ParamSpace, flatten_tensors, unflatten_tensor
    from soulkit.influence.hessian import CurvatureOperator
    from soulkit.influence.solvers import make_solver

    for obj in (BoundLoss, ParamSpace, flatten_tensors, unflatten_tensor, CurvatureOperator, make_solver):
        assert obj.__name__ not in soulkit.influence.__all__
        assert not hasattr(soulkit.influence, obj.__name__)


def test_import_soulkit_is_cheap(tmp_path):
    code = ("import sys, soulkit, soulkit.demos\n"
            "print([m for m in ('torch', 'soulkit.optim', 'soulkit.unlearn') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
