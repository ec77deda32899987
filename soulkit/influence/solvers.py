"""Inverse-Hessian-vector product solvers: ``solve(V) = (H + damping I)^{-1} V`` row-wise.

All solvers share one interface: construct (a validated dataclass of options), ``fit(op)`` with a
:class:`~soulkit.influence.hessian.CurvatureOperator` (which carries ``H``, ``l2`` and ``damping``),
then ``solve(V)`` for a block ``V [m, p]`` (or one vector ``[p]``). After ``fit`` and each ``solve``,
``solver.info`` holds diagnostics (residuals, iterations, eigenvalues, chosen scale).

=============  ==================================================================================
``exact``      explicit ``A = H + damping I`` from ``p`` products, eigendecomposition (small ``p``)
``cg``         conjugate gradients on all right-hand sides at once; tolerance, max iterations,
               residual reported; non-convergence raises :class:`ConvergenceError` (or warns);
               an indefinite ``A`` is refused with a Lanczos estimate of the damping it needs
``lissa``      ``r_t = v + r_{t-1} - A r_{t-1} / scale``, ``A^{-1} v ~ r_T / scale``; scale from a
               power-iteration estimate of ``lambda_max(A)`` (``scale="auto"``)
``arnoldi``    top-``rank`` eigenpairs of ``A`` from a Krylov space of ``n_iter`` products, inverted on
               that subspace (Schioppa et al. 2022); ``rank = p`` is exact
``diagonal``   ``V / diag(A)`` with the exact, Hutchinson or GNB diagonal (:mod:`soulkit.optim`); the
               exact one is refused above ``max_backward`` backward passes (default 20,000)
``identity``   ``V`` unchanged (gradient dot products, TracIn-style; not calibrated)
=============  ==================================================================================

LiSSA's convergence. The fixed point of ``r = v + (I - A/s) r`` is ``s A^{-1} v``; the iteration
contracts iff every eigenvalue of ``A`` lies in ``(0, 2s)``, at rate ``1 - lambda_min/s``. Koh & Liang's
usual ``scale=10`` diverges once ``lambda_max > 20``; ``scale="auto"`` takes ``safety *`` the
power-iteration estimate (``safety=1.2`` tolerates an estimate down to 60% of the true top eigenvalue).
The damping of the ANCHORS recursion ``r_t = v + (1 - d) r_{t-1} - H r_{t-1}/s`` is ``d = damping / s``
here: damping is always an absolute shift of ``H``, the same for every solver.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .hessian import DEFAULT_MAX_BACKWARD, DIAGONAL_METHODS, CurvatureOperator

__all__ = [
    "ArnoldiSolver",
    "CGSolver",
    "ConvergenceError",
    "ConvergenceWarning",
    "DiagonalSolver",
    "ExactSolver",
    "IdentitySolver",
    "LissaSolver",
    "SOLVERS",
    "Solver",
    "make_solver",
]

OnFail = Literal["raise", "warn"]


class ConvergenceError(RuntimeError):
    """An iterative solver did not reach its tolerance (or diverged); carries the residual."""

    def __init__(self, message: str, *, solver: str, residual: float, iterations: int) -> None:
        super().__init__(message)
        self.solver, self.residual, self.iterations = solver, residual, iterations


class ConvergenceWarning(UserWarning):
    """Issued instead of :class:`ConvergenceError` when a solver has ``on_fail="warn"``."""


def _check_int(name: str, value: Any, low: int, *, none_ok: bool = False) -> None:
    if none_ok and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{' or None' if none_ok else ''}, got {value!r}")


def _check_pos(name: str, value: Any, *, strict: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if strict else value < 0):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0, got {value!r}")


def _check_on_fail(value: Any) -> None:
    if value not in ("raise", "warn"):
        raise ValueError(f"on_fail must be 'raise' or 'warn', got {value!r}")


def _round_up(x: float, digits: int = 3) -> str:
    """``x`` rounded up to ``digits`` significant digits: the printed number is never below ``x``."""
    if not math.isfinite(x) or x <= 0:
        return f"{x:.{digits}g}"
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    text = f"{math.ceil(x / step) * step:.{digits}g}"
    while float(text) < x:
        text = f"{float(text) + step:.{digits}g}"
    return text


def _not_pd(what: str, smallest: float, damping: float, *, exact: bool, margin: float | None = None) -> ValueError:
    """The refusal of an indefinite ``A = H + (l2 + damping) I``, with damping advice that is honest about its kind.

    ``what`` says how the curvature was found (shown in parentheses). ``smallest`` is the smallest
    eigenvalue of ``A`` (``exact``) or an estimate of it from above (a Rayleigh quotient or Ritz value:
    the true one may be lower). ``A`` is positive definite for a damping above ``damping - lambda_min``:
    for an exact eigenvalue the advice is that bound (rounded up); for an estimate it is said to be a
    lower bound, with a suggestion ``margin`` above it (default 10% of ``|smallest|``).
    """
    need = damping - smallest
    if exact:
        advice = f"set damping > {_round_up(need)} (now {damping:g}; the smallest eigenvalue is exact)"
    else:
        extra = 0.1 * abs(smallest) if margin is None else margin
        advice = (
            f"damping must be at least {_round_up(need)} (now {damping:g}), but that is only a lower bound: "
            f"{smallest:.4g} estimates the smallest eigenvalue from above and the true one may be lower, so a "
            f"damping near the bound can be refused again (with a new estimate); try damping = "
            f"{_round_up(need + extra)}"
        )
    return ValueError(
        f"H + damping is not positive definite ({what}); {advice}, or raise l2, or use curvature='gauss_newton' "
        "(positive semi-definite for convex losses)"
    )


@dataclass
class Solver(ABC):
    """Base class: ``fit(op)`` then ``solve(V [m, p] or [p]) -> A^{-1} V``."""

    name: ClassVar[str] = ""
    info: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _op: CurvatureOperator | None = field(default=None, init=False, repr=False, compare=False)

    def fit(self, op: CurvatureOperator) -> Solver:
        """Compute what ``solve`` needs from the curvature operator; returns ``self``."""
        if not isinstance(op, CurvatureOperator):
            raise TypeError(f"op must be a CurvatureOperator, got {type(op).__name__}")
        self._op = op
        self.info = {}
        self._fit(op)
        return self

    @property
    def fitted(self) -> bool:
        return self._op is not None

    def solve(self, V: Tensor) -> Tensor:
        """``(H + damping I)^{-1}`` applied to each row of ``V`` (``[m, p]``; a ``[p]`` vector is allowed)."""
        if self._op is None:
            raise RuntimeError(f"{type(self).__name__}.solve called before fit(op)")
        if not isinstance(V, Tensor):
            raise TypeError(f"V must be a torch.Tensor, got {type(V).__name__}")
        p = self._op.dim
        squeeze = V.dim() == 1
        V2 = V.reshape(1, -1) if squeeze else V
        if V2.dim() != 2 or V2.shape[1] != p:
            raise ValueError(f"V must have shape [m, {p}] or [{p}], got {tuple(V.shape)}")
        if not bool(torch.isfinite(V2).all()):
            raise ValueError("V contains NaN or Inf")
        V2 = V2.to(dtype=self._op.dtype, device=self._op.device)
        if V2.shape[0] == 0:
            return V2.clone()
        X = self._solve(V2)
        return X[0] if squeeze else X

    @abstractmethod
    def _fit(self, op: CurvatureOperator) -> None: ...

    @abstractmethod
    def _solve(self, V: Tensor) -> Tensor: ...

    def _fail(self, message: str, *, residual: float, iterations: int, on_fail: str) -> None:
        if on_fail == "warn":
            warnings.warn(message, ConvergenceWarning, stacklevel=4)
        else:
            raise ConvergenceError(message, solver=self.name, residual=residual, iterations=iterations)


# --------------------------------------------------------------------------------------------


@dataclass
class ExactSolver(Solver):
    """Explicit ``A = H + damping I`` (``p`` products) and its eigendecomposition.

    Args:
        max_dim: refuse parameter counts above this (the matrix has ``p^2`` entries).

    Raises (in ``fit``): ``FloatingPointError`` on NaN/Inf curvature; ``ValueError`` if ``A`` is not
    positive definite or is singular to working precision.
    """

    name: ClassVar[str] = "exact"
    max_dim: int = 20_000

    def __post_init__(self) -> None:
        _check_int("max_dim", self.max_dim, 1)

    def _fit(self, op: CurvatureOperator) -> None:
        A = op.dense(max_dim=self.max_dim)
        if not bool(torch.isfinite(A).all()):
            raise FloatingPointError("NaN/Inf in the curvature: the explicit Hessian is not finite")
        evals, evecs = torch.linalg.eigh(A)
        lo, hi = float(evals[0]), float(evals[-1])
        if lo <= 0:
            raise _not_pd(f"exact: smallest eigenvalue {lo:.4g}, largest {hi:.4g}", lo, op.damping, exact=True)
        if lo <= hi * 10 * torch.finfo(A.dtype).eps:
            raise ValueError(
                f"H + damping is singular to working precision (eigenvalues {lo:.3g} .. {hi:.3g}); add damping or l2"
            )
        self._evals, self._evecs = evals, evecs
        self.info = {"eigenvalue_min": lo, "eigenvalue_max": hi, "condition_number": hi / lo}

    def _solve(self, V: Tensor) -> Tensor:
        return ((V @ self._evecs) / self._evals) @ self._evecs.T

    @property
    def matrix(self) -> Tensor:
        """The explicit ``A = H + damping I`` (reassembled from the eigendecomposition)."""
        return (self._evecs * self._evals) @ self._evecs.T


@dataclass
class CGSolver(Solver):
    """Conjugate gradients on ``A X = V``, all rows at once.

    Args:
        tol: stop when ``||v - A x|| <= tol * ||v||`` for every row.
        max_iter: iteration cap (default ``min(10 * p, 10_000)``).
        on_fail: ``"raise"`` a :class:`ConvergenceError` (default) or ``"warn"`` and return the iterate.
        progress: tqdm bar over iterations (``None``: only on a terminal).
        advice_iters: when CG meets a direction of non-positive curvature (``A`` is not positive
            definite), this many Lanczos products from that direction estimate the smallest eigenvalue of
            ``A`` for the error's damping advice (0: advise from the one direction's curvature alone).

    ``info``: ``iterations``, ``relative_residual`` (largest over rows, recomputed as ``||v - A x||``
    at the end), ``converged``. Negative curvature met along a search direction raises ``ValueError``.
    Its advice names the damping at which ``A`` would be positive definite if the estimated smallest
    eigenvalue were the true one. A Lanczos estimate approaches the smallest eigenvalue from above, so
    that damping is a lower bound, and the message says so (and suggests a damping with a margin), unless
    the Krylov space covers all ``p`` dimensions (then the eigenvalue is exact).
    """

    name: ClassVar[str] = "cg"
    tol: float = 1e-8
    max_iter: int | None = None
    on_fail: OnFail = "raise"
    progress: bool | None = None
    advice_iters: int = 30

    def __post_init__(self) -> None:
        _check_pos("tol", self.tol)
        _check_int("max_iter", self.max_iter, 1, none_ok=True)
        _check_on_fail(self.on_fail)
        _check_int("advice_iters", self.advice_iters, 0)

    def _fit(self, op: CurvatureOperator) -> None:
        self.info = {"max_iter": self.max_iter or min(10 * op.dim, 10_000)}

    def _indefinite(self, direction: Tensor, curvature: float, it: int) -> ValueError:
        """The refusal when CG meets ``p^T A p <= 0``: Lanczos from that direction estimates ``lambda_min(A)``."""
        op = self._op
        assert op is not None
        what = f"CG met a direction with curvature {curvature:.4g} at iteration {it}"
        if self.advice_iters == 0:
            return _not_pd(what, curvature, op.damping, exact=False)
        theta, resid, used = op.smallest_eigenvalue(iters=self.advice_iters, start=direction)
        theta = min(theta, curvature)
        self.info.update({"eigenvalue_min_estimate": theta, "eigenvalue_min_residual": resid})
        exact = used >= op.dim  # the Krylov space spans everything: theta is lambda_min itself
        what += (
            f"; {used} Lanczos products from that direction put the smallest eigenvalue of H + damping at "
            f"{'' if exact else 'or below '}{theta:.4g}, Ritz residual {resid:.2g}"
        )
        return _not_pd(what, theta, op.damping, exact=exact, margin=resid + 0.1 * abs(theta))

    def _solve(self, V: Tensor) -> Tensor:
        op = self._op
        assert op is not None
        max_iter = self.max_iter or min(10 * op.dim, 10_000)
        X = torch.zeros_like(V)
        R = V.clone()
        P = R.clone()
        rs = (R * R).sum(1)
        vnorm = V.norm(dim=1).clamp_min(torch.finfo(V.dtype).tiny)
        it = 0
        with tqdm(
            total=max_iter,
            desc="CG",
            disable=None if self.progress is None else not self.progress,
            leave=False,
        ) as bar:
            while it < max_iter:
                rel = rs.sqrt() / vnorm
                active = rel > self.tol
                if not bool(active.any()):
                    break
                idx = torch.nonzero(active).flatten()
                Pa = P[idx]
                APa = op.matmat(Pa)
                pAp = (Pa * APa).sum(1)
                if bool((pAp <= 0).any()):
                    j = int(torch.argmin(pAp))
                    raise self._indefinite(Pa[j], float(pAp[j] / (Pa[j] @ Pa[j])), it)
                alpha = rs[idx] / pAp
                X[idx] += alpha[:, None] * Pa
                R[idx] -= alpha[:, None] * APa
                rs_new = (R[idx] * R[idx]).sum(1)
                P[idx] = R[idx] + (rs_new / rs[idx])[:, None] * Pa
                rs[idx] = rs_new
                it += 1
                bar.update(1)
                bar.set_postfix(residual=f"{float(rel.max()):.2e}")
        true_rel = ((V - op.matmat(X)).norm(dim=1) / vnorm).max()
        res = float(true_rel)
        converged = bool((rs.sqrt() / vnorm <= self.tol).all())
        self.info = {"iterations": it, "relative_residual": res, "converged": converged, "max_iter": max_iter}
        if not converged:
            self._fail(
                f"CG did not converge in {max_iter} iterations: relative residual ||v - A x|| / ||v|| = {res:.3g} "
                f"> tol = {self.tol:g}; raise max_iter, loosen tol, or add damping (condition number)",
                residual=res,
                iterations=it,
                on_fail=self.on_fail,
            )
        return X


@dataclass
class LissaSolver(Solver):
    """LiSSA: ``r_t = v + r_{t-1} - A r_{t-1} / scale``, ``A^{-1} v ~ r_T / scale``.

    Args:
        scale: ``"auto"`` (``safety *`` power-iteration estimate of ``lambda_max(A)``) or a number.
        depth: maximum number of iterations (one curvature product each).
        tol: stop when ``||v - A x_t|| <= tol * ||v||`` (``"full"`` batches only).
        batches: ``"full"`` (each product over the whole training set: deterministic, converges to
            ``A^{-1} v``) or ``"stochastic"`` (each product on the next training batch, as in Koh &
            Liang; runs ``depth`` steps, averages ``repeat`` runs; not checked against ``tol``).
        repeat: independent runs averaged (``"stochastic"``).
        safety: factor on the eigenvalue estimate for ``scale="auto"``.
        power_iters: power-iteration steps for the estimate.
        on_fail: ``"raise"`` or ``"warn"`` on non-convergence; divergence always raises.
        seed: power-iteration start vector.
        progress: tqdm bar over iterations.

    ``info``: ``scale``, ``lambda_max_estimate``, ``iterations``, ``relative_residual``, ``converged``.
    """

    name: ClassVar[str] = "lissa"
    scale: float | Literal["auto"] = "auto"
    depth: int = 10_000
    tol: float = 1e-7
    batches: Literal["full", "stochastic"] = "full"
    repeat: int = 1
    safety: float = 1.2
    power_iters: int = 100
    on_fail: OnFail = "raise"
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.scale != "auto":
            _check_pos("scale", self.scale)
        _check_int("depth", self.depth, 1)
        _check_pos("tol", self.tol)
        if self.batches not in ("full", "stochastic"):
            raise ValueError(f"batches must be 'full' or 'stochastic', got {self.batches!r}")
        _check_int("repeat", self.repeat, 1)
        _check_pos("safety", self.safety)
        if self.safety < 1:
            raise ValueError(
                f"safety must be >= 1 (scale must exceed the top eigenvalue), got {self.safety!r}"
            )
        _check_int("power_iters", self.power_iters, 1)
        _check_on_fail(self.on_fail)

    def _fit(self, op: CurvatureOperator) -> None:
        info: dict[str, Any] = {}
        if self.scale == "auto":
            lam = op.top_eigenvalue(iters=self.power_iters, seed=self.seed)
            if not math.isfinite(lam) or lam <= 0:
                raise _not_pd(f"power iteration: top eigenvalue {lam:.4g}", lam, op.damping, exact=False)
            info["lambda_max_estimate"] = lam
            self._scale = self.safety * lam
        else:
            self._scale = float(self.scale)
        info["scale"] = self._scale
        self.info = info

    def _solve(self, V: Tensor) -> Tensor:
        op = self._op
        assert op is not None
        s = self._scale
        vnorm = V.norm(dim=1).clamp_min(torch.finfo(V.dtype).tiny)
        if self.batches == "stochastic":
            return self._solve_stochastic(V, vnorm)
        r = V.clone()
        res0: float | None = None
        res = float("inf")
        it = 0
        with tqdm(
            total=self.depth,
            desc="LiSSA",
            disable=None if self.progress is None else not self.progress,
            leave=False,
        ) as bar:
            for it in range(1, self.depth + 1):
                r_new = V + r - op.matmat(r) / s
                step = ((r_new - r).norm(dim=1) / vnorm).max()  # = ||v - A (r/s)|| / ||v||
                res = float(step)
                r = r_new
                if res0 is None:
                    res0 = res
                if not math.isfinite(res) or res > 1e6 * max(res0, 1.0):
                    raise ConvergenceError(
                        f"LiSSA diverged at iteration {it} (relative residual {res:.3g}): scale={s:.4g} is below half "
                        "the top eigenvalue of H + damping, or H + damping has negative eigenvalues (the iteration "
                        "contracts only if every eigenvalue lies in (0, 2*scale)); use scale='auto' or a larger scale, "
                        "and for a non-convex loss add damping or use curvature='gauss_newton'",
                        solver=self.name,
                        residual=res,
                        iterations=it,
                    )
                if it % 50 == 0:
                    bar.update(50)
                    bar.set_postfix(residual=f"{res:.2e}")
                if res <= self.tol:
                    break
        converged = res <= self.tol
        self.info.update({"iterations": it, "relative_residual": res, "converged": converged})
        if not converged:
            self._fail(
                f"LiSSA did not converge in depth={self.depth} iterations: relative residual {res:.3g} > tol = {self.tol:g} "
                f"(scale {s:.4g}; convergence rate 1 - lambda_min/scale); raise depth or add damping",
                residual=res,
                iterations=it,
                on_fail=self.on_fail,
            )
        return r / s

    def _solve_stochastic(self, V: Tensor, vnorm: Tensor) -> Tensor:
        op = self._op
        assert op is not None
        s = self._scale

        def cycle():
            while True:
                for batch, _ in op.source:
                    yield batch

        total = torch.zeros_like(V)
        batches = cycle()
        for _ in range(self.repeat):
            r = V.clone()
            for it in range(1, self.depth + 1):
                r = V + r - op.batch_matmat(next(batches), r) / s
                if not bool(torch.isfinite(r).all()) or float(r.norm()) > 1e12 * float(V.norm()) * s:
                    raise ConvergenceError(
                        f"stochastic LiSSA diverged at iteration {it}: scale={s:.4g} is too small for the mini-batch "
                        "curvature; use a larger scale or safety",
                        solver=self.name,
                        residual=float("inf"),
                        iterations=it,
                    )
            total += r / s
        X = total / self.repeat
        res = float(((V - op.matmat(X)).norm(dim=1) / vnorm).max())
        self.info.update(
            {"iterations": self.depth * self.repeat, "relative_residual": res, "converged": None}
        )
        return X


@dataclass
class ArnoldiSolver(Solver):
    """Top-``rank`` eigenpairs of ``A`` from a Krylov space, inverted on that subspace (Schioppa et al.).

    Arnoldi with full re-orthogonalisation (Lanczos, as ``A`` is symmetric) builds an orthonormal
    basis ``Q`` of ``n_iter`` vectors from ``n_iter`` products (restarting with a fresh random vector
    if the Krylov space becomes invariant), then Rayleigh-Ritz: eigenpairs of ``Q A Q^T``; the
    ``rank`` of largest magnitude are kept and ``solve(v) = sum_k e_k (e_k . v) / lambda_k``.
    Directions outside the kept subspace are dropped, as in the paper; ``rank = n_iter = p`` is exact.

    Args:
        rank: eigenpairs kept (capped at ``p``).
        n_iter: Krylov dimension (default ``min(p, max(2 * rank, rank + 20))``; at least ``rank``).
        seed: start vector.

    ``info``: ``rank``, ``n_iter``, ``eigenvalues`` (kept), ``ritz_residual`` (largest
    ``||A e - lambda e|| / |lambda|`` over kept pairs).
    """

    name: ClassVar[str] = "arnoldi"
    rank: int = 50
    n_iter: int | None = None
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self) -> None:
        _check_int("rank", self.rank, 1)
        _check_int("n_iter", self.n_iter, 1, none_ok=True)
        if self.n_iter is not None and self.n_iter < self.rank:
            raise ValueError(f"n_iter must be >= rank ({self.rank}), got {self.n_iter}")

    def _fit(self, op: CurvatureOperator) -> None:
        p = op.dim
        rank = min(self.rank, p)
        n_iter = min(p, self.n_iter if self.n_iter is not None else max(2 * rank, rank + 20))
        gen = torch.Generator(device=op.device).manual_seed(self.seed)
        Q = torch.zeros(n_iter, p, dtype=op.dtype, device=op.device)
        AQ = torch.zeros_like(Q)

        def fresh(k: int) -> Tensor:
            for _ in range(10):
                w = torch.randn(p, generator=gen, dtype=op.dtype, device=op.device)
                for _ in range(2):
                    w -= Q[:k].T @ (Q[:k] @ w)
                if float(w.norm()) > 1e-8:
                    return w / w.norm()
            raise RuntimeError("Arnoldi could not draw a vector outside the current Krylov basis")

        q = fresh(0)
        with tqdm(
            total=n_iter,
            desc="Arnoldi",
            disable=None if self.progress is None else not self.progress,
            leave=False,
        ) as bar:
            for k in range(n_iter):
                Q[k] = q
                AQ[k] = op.matvec(q)
                if k == n_iter - 1:
                    bar.update(1)
                    break
                w = AQ[k].clone()
                for _ in range(2):
                    w -= Q[: k + 1].T @ (Q[: k + 1] @ w)
                nrm = float(w.norm())
                q = w / nrm if nrm > 1e-10 * max(float(AQ[k].norm()), 1e-300) else fresh(k + 1)
                bar.update(1)
        T = Q @ AQ.T
        T = 0.5 * (T + T.T)
        evals, U = torch.linalg.eigh(T)
        order = torch.argsort(evals.abs(), descending=True)[:rank]
        lam = evals[order]
        E = U[:, order].T @ Q  # [rank, p]
        if not bool(torch.isfinite(lam).all()):
            raise FloatingPointError("NaN/Inf in the curvature: Arnoldi eigenvalues are not finite")
        if bool((lam <= 0).any()):
            # the smallest Ritz value of the whole Krylov space (kept or not): the closest estimate from above
            lo = float(evals[0])
            raise _not_pd(
                f"Arnoldi, rank {rank}: smallest eigenvalue {lo:.4g}, largest {float(lam.max()):.4g}",
                lo,
                op.damping,
                exact=n_iter == p,
            )
        ritz = (op.matmat(E) - lam[:, None] * E).norm(dim=1) / lam.abs()
        self._lam, self._E = lam, E
        self.info = {
            "rank": rank,
            "n_iter": n_iter,
            "eigenvalues": lam.tolist(),
            "ritz_residual": float(ritz.max()),
        }

    def _solve(self, V: Tensor) -> Tensor:
        return ((V @ self._E.T) / self._lam) @ self._E


@dataclass
class DiagonalSolver(Solver):
    """``V / (diag(H) + damping)`` with a Hessian-diagonal estimate from :mod:`soulkit.optim`.

    Args:
        method: ``"exact"`` (one backward pass per parameter element and batch, or per output
            dimension and example for Gauss-Newton: small models), ``"hutchinson"`` (Rademacher
            probes) or ``"gnb"`` (Sophia's Gauss-Newton-Bartlett; softmax-logit outputs).
        n_samples: probes / label samples for the stochastic methods.
        seed: seeds the probes.
        max_backward: budget of backward passes for ``method="exact"`` (default
            :data:`~soulkit.influence.hessian.DEFAULT_MAX_BACKWARD` = 20,000; ``None``: no limit).
            Above it ``fit`` refuses at once, naming the count and the alternatives, instead of
            running for minutes.

    Raises (in ``fit``) ``ValueError`` if an entry of ``diag(H) + damping`` is not positive, or if the
    exact diagonal needs more than ``max_backward`` backward passes.
    """

    name: ClassVar[str] = "diagonal"
    method: str = "exact"
    n_samples: int = 100
    seed: int = 0
    max_backward: int | None = DEFAULT_MAX_BACKWARD

    def __post_init__(self) -> None:
        if self.method not in DIAGONAL_METHODS:
            raise ValueError(f"method must be one of {DIAGONAL_METHODS}, got {self.method!r}")
        _check_int("n_samples", self.n_samples, 1)
        _check_int("max_backward", self.max_backward, 1, none_ok=True)

    def _fit(self, op: CurvatureOperator) -> None:
        gen = torch.Generator(device=op.device).manual_seed(self.seed)
        d = op.diagonal(self.method, n_samples=self.n_samples, generator=gen, max_backward=self.max_backward)
        d = d + op.shift
        if bool((d <= 0).any()):
            bad = int((d <= 0).sum())
            smallest = float(d.min())
            need = op.damping - smallest  # above this every entry of this diagonal is > 0
            exact = self.method == "exact"
            raise ValueError(
                f"diag(H) + damping has {bad} non-positive entries (smallest {smallest:.4g}); set damping > "
                f"{_round_up(need)} (now {op.damping:g}){'' if exact else ' for this estimate'} or raise l2"
            )
        self._d = d
        self.info = {"diagonal_min": float(d.min()), "diagonal_max": float(d.max())}

    def _solve(self, V: Tensor) -> Tensor:
        return V / self._d


@dataclass
class IdentitySolver(Solver):
    """``A = I``: scores become ``(1/n) g_i . g_j`` (TracIn-style; l2 and damping are ignored, not calibrated)."""

    name: ClassVar[str] = "identity"

    def _fit(self, op: CurvatureOperator) -> None:
        self.info = {}

    def _solve(self, V: Tensor) -> Tensor:
        return V.clone()


SOLVERS: dict[str, type[Solver]] = {
    cls.name: cls
    for cls in (ExactSolver, CGSolver, LissaSolver, ArnoldiSolver, DiagonalSolver, IdentitySolver)
}


def make_solver(spec: str | Solver) -> Solver:
    """A solver from its name (default options) or a configured :class:`Solver` instance."""
    if isinstance(spec, Solver):
        return spec
    if isinstance(spec, str):
        if spec not in SOLVERS:
            raise ValueError(
                f"unknown solver {spec!r}; choose one of {sorted(SOLVERS)} or pass a Solver instance"
            )
        return SOLVERS[spec]()
    raise TypeError(f"solver must be a name or a Solver instance, got {type(spec).__name__}")
