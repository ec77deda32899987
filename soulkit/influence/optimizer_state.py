"""The optimizer's own curvature as an influence preconditioner: ``solver="optimizer_state"``.

A model trained with soulkit's :class:`~soulkit.optim.Sophia`, :class:`~soulkit.optim.AdaHessian` or
``torch.optim.Adam``/``AdamW`` ends training with a diagonal curvature estimate in its optimizer state,
already paid for. :class:`OptimizerStateSolver` turns a saved ``state_dict`` into the diagonal ``c``
of ``A = diag(c) + (l2 + damping) I`` and solves ``A^{-1} v = v / (c + l2 + damping)``, so that scores
are ``(1/n) g_i^T A^{-1} g_j`` as for every other solver. What ``c`` is depends on the optimizer
(``rule``):

=============  =============================  =========================================================
optimizer      state entries                  ``c`` (``rule="auto"``)
=============  =============================  =========================================================
Sophia         ``hessian`` (``h``)            ``"hessian"``: ``h / (1 - beta2**n)``, ``n`` = Hessian
                                              refreshes (``soulkit_sophia["num_hessian_updates"]``)
AdaHessian     ``exp_hessian_diag_sq`` (v)    ``"hessian"``: ``sqrt(v / (1 - beta2**t))``, ``t`` = step
Adam / AdamW   ``exp_avg_sq`` (v)             ``"adam"``: ``sqrt(v / (1 - beta2**t)) + eps``
=============  =============================  =========================================================

**Sophia and AdaHessian** (``rule="hessian"``, the only rule for them): ``h`` is an EMA of GNB or
Hutchinson estimates of the diagonal of the Hessian of the mean training loss, and AdaHessian's
``sqrt(v)`` is the root-mean-square of Hutchinson diagonals -- both in Hessian units, so the scores
stay in soulkit's calibrated units (a loss change), like ``solver="diagonal"``. Bias correction
(``bias_correction=True``) undoes the EMAs' start at zero.

**Adam / AdamW.** ``v`` is an EMA of squared mini-batch gradients, ``E[g_B^2]``; near a minimum
that is the empirical-Fisher diagonal divided by the batch size ``B`` (which the state does not
record). Two rules:

* ``"adam"`` (default): ``c = sqrt(v_hat) + eps``, Adam's own denominator -- the metric training
  moved in, and the preconditioner TrackStar (Chang et al. 2024) uses. The square root tempers the
  noise of ``v``: coordinates with tiny ``v`` are not inflated by ``1/v``. The units are gradient
  units, not Hessian units: rankings are meaningful, the scale is not a calibrated loss change.
* ``"fisher"``: ``c = v_hat``, an empirical-Fisher diagonal up to the factor ``1/B`` (scores come
  out ``B`` times too small when ``v`` is in that regime); use it to compare with Fisher-based
  preconditioning.

In every case ``l2 + damping`` is added as an absolute shift (as for all solvers); the optimizers'
decoupled ``weight_decay`` is not part of the loss and is not added.

**Which state belongs to which parameter.** A ``state_dict`` numbers parameters by their position
in the optimizer's ``param_groups``, not by name. ``optimizer_params`` lists the model's parameter
names in the order the optimizer was built with (default: ``model.named_parameters()`` in order, i.e.
``AdamW(model.parameters())``). Every attributed parameter (the analyzer's ``params``) must have
state there; a frozen parameter without state must be left out with ``params=[...]``.

With ``modules=[...]`` the analyzer takes the factored route (:mod:`.factored`): each tracked
module's query gradient ``[out, in (+1)]`` is divided by the same diagonal laid out like it (Conv1D
weights transposed), and no ``[examples, parameters]`` tensor is formed.

Files are read only with ``torch.load(path, weights_only=True)``: a file that needs pickle for
anything beyond tensors and plain containers is refused.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .hessian import CurvatureOperator
from .solvers import Solver, _round_up

__all__ = [
    "OPTIMIZER_STATE_RULES",
    "OptimizerStateSolver",
    "load_optimizer_state",
    "optimizer_state_diagonal",
]

OPTIMIZER_STATE_RULES = ("auto", "hessian", "adam", "fisher")
_KINDS = {"sophia": ("hessian",), "adahessian": ("hessian",), "adam": ("adam", "fisher")}

StateSource = Mapping[str, Any] | str | os.PathLike | torch.optim.Optimizer


def load_optimizer_state(source: StateSource) -> dict[str, Any]:
    """An optimizer ``state_dict`` from a mapping, an optimizer, or a file saved with ``torch.save``.

    A path is loaded with ``torch.load(path, weights_only=True, map_location="cpu")`` only: a file
    holding anything that needs pickle (a custom object) raises ``ValueError`` naming the file.
    """
    if isinstance(source, torch.optim.Optimizer):
        sd: Any = source.state_dict()
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"optimizer_state: no such file {path!r}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"optimizer_state file {path!r} was refused by torch.load(weights_only=True): it holds objects "
                f"that need pickle ({first}); save only the optimizer's state_dict() (tensors, numbers, "
                "lists, dicts)"
            ) from e
    elif isinstance(source, Mapping):
        sd = source
    else:
        raise TypeError(
            "optimizer_state must be an optimizer state_dict, a path to a file saved with torch.save, or an "
            f"optimizer, got {type(source).__name__}"
        )
    if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
        keys = list(sd)[:6] if isinstance(sd, Mapping) else type(sd).__name__
        raise ValueError(
            f"optimizer_state is not an optimizer state_dict (it needs 'state' and 'param_groups'; got {keys})"
        )
    if not isinstance(sd["state"], Mapping) or not isinstance(sd["param_groups"], Sequence):
        raise ValueError("optimizer_state: 'state' must be a dict and 'param_groups' a list")
    return dict(sd)


def _kind(entry: Mapping[str, Any]) -> str | None:
    if "hessian" in entry:
        return "sophia"
    if "exp_hessian_diag_sq" in entry:
        return "adahessian"
    if "exp_avg_sq" in entry:
        return "adam"
    return None


def _step(entry: Mapping[str, Any], where: str) -> float:
    t = entry.get("step")
    if t is None:
        raise ValueError(f"optimizer_state: {where} has no 'step' (needed for bias correction)")
    t = float(t.item() if isinstance(t, Tensor) else t)
    if not t >= 1:
        raise ValueError(f"optimizer_state: {where} has step {t:g}: the optimizer never stepped")
    return t


def optimizer_state_diagonal(
    state_dict: StateSource,
    model: torch.nn.Module,
    names: Sequence[str],
    *,
    optimizer_params: Sequence[str] | None = None,
    rule: str = "auto",
    bias_correction: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The diagonal curvature ``c`` (name -> tensor of the parameter's shape, float64) of ``names``.

    Args:
        state_dict: the optimizer's ``state_dict`` (or a path / optimizer; see :func:`load_optimizer_state`).
        model: the trained model the optimizer stepped.
        names: the attributed parameters whose ``c`` is wanted.
        optimizer_params: the model's parameter names in the order the optimizer was built with
            (flattened over its param groups); default ``model.named_parameters()`` in order.
        rule: ``"auto"``, ``"hessian"`` (Sophia, AdaHessian), ``"adam"`` or ``"fisher"`` (Adam-family);
            see the module docstring.
        bias_correction: divide the EMAs by ``1 - beta2**t`` (Sophia: ``t`` = Hessian refreshes).

    Returns ``(c, info)``; ``info`` holds ``optimizer`` (the detected kind) and ``rule`` (the resolved one).
    Raises ``ValueError`` naming the first mismatching index/parameter on any disagreement between the
    state and the model, and on non-finite or negative entries.
    """
    if rule not in OPTIMIZER_STATE_RULES:
        raise ValueError(f"optimizer_state_rule must be one of {OPTIMIZER_STATE_RULES}, got {rule!r}")
    sd = load_optimizer_state(state_dict)
    named = dict(model.named_parameters())
    order = list(named) if optimizer_params is None else list(optimizer_params)
    if optimizer_params is not None:
        if isinstance(optimizer_params, str):
            raise TypeError("optimizer_params must be a sequence of parameter names, not a string")
        unknown = [k for k in order if k not in named]
        if unknown:
            raise ValueError(f"optimizer_params names {unknown[:5]} are not parameters of the model")
        if len(set(order)) != len(order):
            raise ValueError("optimizer_params lists a name twice")
    groups = list(sd["param_groups"])
    ids: list[Any] = []
    group_of: list[Mapping[str, Any]] = []
    for g in groups:
        if not isinstance(g, Mapping) or "params" not in g:
            raise ValueError("optimizer_state: every param group needs a 'params' list")
        ids.extend(g["params"])
        group_of.extend([g] * len(g["params"]))
    if len(ids) != len(order):
        raise ValueError(
            f"optimizer_state lists {len(ids)} parameters in its param_groups but "
            f"{'optimizer_params' if optimizer_params is not None else 'the model'} has {len(order)}: pass "
            "optimizer_params=[names in the order the optimizer was built with]"
        )
    state = sd["state"]
    # shapes first, in optimizer order: a misordered list fails at its first mismatch
    for k, (pid, name) in enumerate(zip(ids, order)):
        entry = state.get(pid)
        if not isinstance(entry, Mapping):
            continue
        for key in ("hessian", "exp_hessian_diag_sq", "exp_avg_sq"):
            t = entry.get(key)
            if isinstance(t, Tensor) and tuple(t.shape) != tuple(named[name].shape):
                raise ValueError(
                    f"optimizer_state: parameter index {k} has state {key!r} of shape {tuple(t.shape)} but the "
                    f"model parameter at that position, {name!r}, has shape {tuple(named[name].shape)}; "
                    "optimizer_params must list the parameters in the order the optimizer was built with"
                )
    position = {name: k for k, name in enumerate(order)}
    out: dict[str, Tensor] = {}
    kinds: set[str] = set()
    resolved = rule
    extra = sd.get("soulkit_sophia")
    for name in names:
        if name not in position:
            raise ValueError(
                f"parameter {name!r} is not among the optimizer's parameters (optimizer_params); exclude it with "
                "params=[...]"
            )
        k = position[name]
        entry = state.get(ids[k])
        where = f"parameter {name!r} (optimizer index {k})"
        kind = _kind(entry) if isinstance(entry, Mapping) else None
        if kind is None:
            what = "no state" if not entry else f"no curvature entry (keys {sorted(entry)})"
            raise ValueError(
                f"optimizer_state has {what} for {where}: frozen or never stepped parameters must be left out "
                "with params=[...]; supported states are Sophia ('hessian'), AdaHessian ('exp_hessian_diag_sq') "
                "and Adam/AdamW ('exp_avg_sq')"
            )
        kinds.add(kind)
        if len(kinds) > 1:
            raise ValueError(f"optimizer_state mixes optimizer kinds {sorted(kinds)} (at {where})")
        resolved = ("adam" if kind == "adam" else "hessian") if rule == "auto" else rule
        if resolved not in _KINDS[kind]:
            raise ValueError(
                f"optimizer_state_rule={rule!r} does not apply to a {kind} state; use one of "
                f"{('auto',) + _KINDS[kind]}"
            )
        group = group_of[k]
        betas = group.get("betas", (0.9, 0.999))
        beta2 = float(betas[1])
        if kind == "sophia":
            raw = entry["hessian"]
            t = None
            if bias_correction:
                if not isinstance(extra, Mapping) or "num_hessian_updates" not in extra:
                    raise ValueError(
                        "optimizer_state: bias correction of Sophia's h needs the number of Hessian refreshes, "
                        "stored by soulkit's Sophia under 'soulkit_sophia'; this state_dict has none: pass "
                        "optimizer_state_bias_correction=False to use h as saved"
                    )
                t = int(extra["num_hessian_updates"])
                if t < 1:
                    raise ValueError(
                        "optimizer_state: Sophia never refreshed its Hessian estimate (h is zero)"
                    )
        elif kind == "adahessian":
            raw = entry["exp_hessian_diag_sq"]
            t = _step(entry, where) if bias_correction else None
        else:
            amsgrad = bool(group.get("amsgrad", False))
            raw = entry["max_exp_avg_sq" if amsgrad and "max_exp_avg_sq" in entry else "exp_avg_sq"]
            t = _step(entry, where) if bias_correction else None
        if not isinstance(raw, Tensor):
            raise ValueError(f"optimizer_state: the curvature entry of {where} is not a tensor")
        x = raw.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"optimizer_state: {where} has {bad} NaN/Inf curvature entries")
        if bool((x < 0).any()):
            bad = int((x < 0).sum())
            raise ValueError(
                f"optimizer_state: {where} has {bad} negative curvature entries (smallest {float(x.min()):.4g}); "
                "a diagonal preconditioner needs h >= 0"
            )
        if t is not None:
            x = x / (1.0 - beta2**t)
        if kind == "adahessian":
            x = x.sqrt()
        elif resolved == "adam":
            x = x.sqrt() + float(group.get("eps", 1e-8))
        out[name] = x
    info = {"optimizer": next(iter(kinds)) if kinds else None, "rule": resolved}
    return out, info


@dataclass
class OptimizerStateSolver(Solver):
    """``V / (c + l2 + damping)`` with ``c`` the diagonal curvature kept by the training optimizer.

    Args:
        state: an optimizer ``state_dict``, a path to one saved with ``torch.save`` (read with
            ``weights_only=True`` only; loaded on construction), or the optimizer itself.
        rule: ``"auto"``, ``"hessian"``, ``"adam"`` or ``"fisher"`` (see :mod:`.optimizer_state`).
        optimizer_params: the model's parameter names in the order the optimizer was built with
            (default: ``model.named_parameters()`` in order).
        bias_correction: undo the EMAs' zero start (``1 - beta2**t``).

    Raises (in ``fit``) ``ValueError`` on a state that does not match the model (naming the first
    mismatching index and shapes), missing state for an attributed parameter, NaN/Inf or negative
    entries (naming the parameter), or zero entries of ``c + l2 + damping``.
    ``info``: ``optimizer``, ``rule``, ``diagonal_min``, ``diagonal_max``.
    """

    name: ClassVar[str] = "optimizer_state"
    state: Any = field(default=None, repr=False)
    rule: Literal["auto", "hessian", "adam", "fisher"] = "auto"
    optimizer_params: Sequence[str] | None = None
    bias_correction: bool = True

    def __post_init__(self) -> None:
        if self.state is None:
            raise ValueError(
                "solver='optimizer_state' needs optimizer_state=<an optimizer state_dict or a torch.save file of one>"
            )
        if self.rule not in OPTIMIZER_STATE_RULES:
            raise ValueError(
                f"optimizer_state_rule must be one of {OPTIMIZER_STATE_RULES}, got {self.rule!r}"
            )
        if not isinstance(self.bias_correction, bool):
            raise TypeError(f"bias_correction must be a bool, got {self.bias_correction!r}")
        self.state = load_optimizer_state(self.state)

    def _fit(self, op: CurvatureOperator) -> None:
        space = op.bound.space
        c, info = optimizer_state_diagonal(
            self.state, op.bound.model, space.names, optimizer_params=self.optimizer_params, rule=self.rule,
            bias_correction=self.bias_correction,
        )  # fmt: skip
        for name in space.names:
            low = float(c[name].min()) + op.shift if c[name].numel() else 1.0
            if not low > 0:
                bad = int((c[name] + op.shift <= 0).sum())
                raise ValueError(
                    f"optimizer_state: parameter {name!r} has {bad} zero curvature entries and l2 + damping = "
                    f"{op.shift:g}; set damping > 0 (e.g. {_round_up(max(1e-8, 1e-3 * _mean(c)))}) or raise l2"
                )
        d = space.flatten({k: v.to(device=op.device) for k, v in c.items()}).to(op.dtype) + op.shift
        self._d = d
        self.info = {**info, "diagonal_min": float(d.min()), "diagonal_max": float(d.max())}

    def _solve(self, V: Tensor) -> Tensor:
        return V / self._d

    @property
    def diagonal(self) -> Tensor:
        """The fitted ``c + l2 + damping`` ``[p]``, in the analyzer's flat parameter order."""
        if not self.fitted:
            raise RuntimeError("OptimizerStateSolver.diagonal is available after fit")
        return self._d


def _mean(c: Mapping[str, Tensor]) -> float:
    total = sum(float(v.sum()) for v in c.values())
    count = sum(v.numel() for v in c.values())
    m = total / count if count else 0.0
    return m if math.isfinite(m) and m > 0 else 1.0
