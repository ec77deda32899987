"""The curvature of the training objective as a matrix-free operator over the training data.

The objective is ``L(theta) = (1/n) sum_j loss_j(theta) + (l2/2) ||theta||^2`` over the attributed
parameters, so its curvature is

    H = (1/n) sum_j C_j + l2 * I,      C_j = Hessian of loss_j   (curvature="hessian")
                                       C_j = J_j^T Lambda_j J_j  (curvature="gauss_newton")

and solvers work with ``A = H + damping * I``. :class:`CurvatureOperator` applies ``A`` (or its data
part) to a block of vectors ``V [m, p]`` by one pass over the training batches, each batch's mean loss
weighted by ``B / n``.

Engines. ``"loop"`` calls :func:`soulkit.optim.hvp` / :func:`soulkit.optim.gnvp` once per vector and
batch. ``"batched"`` builds each batch's gradient graph once and pushes all ``m`` vectors through it
in one vmapped backward (``torch.autograd.grad(..., is_grads_batched=True)``) -- the same math,
checked against the loop engine in the tests. The forward pass and the first backward are shared by
all vectors of a block, so for blocks the batched engine costs far less per vector than the loop.
``"auto"`` uses the loop for a single vector and the batched engine for blocks, falling back to the
loop (with a warning) if an op has no batching rule. The second-order part always runs under
:func:`soulkit.optim.differentiable_attention` (math SDPA backend).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from soulkit.optim import differentiable_attention, exact_hessian_diag, gnb_diag, gnvp, hutchinson_diag, hvp

from ._data import DataSource
from .gradients import BoundLoss

__all__ = ["DEFAULT_MAX_BACKWARD", "CurvatureOperator", "Curvature", "Engine"]

Curvature = Literal["hessian", "gauss_newton"]
Engine = Literal["auto", "batched", "loop"]
CURVATURES = ("hessian", "gauss_newton")
ENGINES = ("auto", "batched", "loop")
DIAGONAL_METHODS = ("exact", "hutchinson", "gnb")
#: Backward passes the exact diagonal may take before :meth:`CurvatureOperator.diagonal` refuses
#: (as :func:`soulkit.optim.exact_hessian_diag` refuses above 20,000 parameter elements).
DEFAULT_MAX_BACKWARD = 20_000


class CurvatureOperator:
    """``A = (1/n) sum_j C_j + (l2 + damping) I`` applied to blocks of flat vectors.

    Args:
        bound: the model, loss and attributed parameters.
        source: the training data (fixed order; its size is ``n``).
        curvature: ``"hessian"`` or ``"gauss_newton"`` (needs an :class:`OutputLoss`).
        l2: the objective's L2 coefficient (part of ``H``).
        damping: added to ``H`` for solving only.
        hvp_mode: passed to :func:`soulkit.optim.hvp` / :func:`~soulkit.optim.gnvp` by the loop engine.
        engine: ``"auto"``, ``"batched"`` or ``"loop"`` (see the module docstring).
        vector_chunk: vectors per batched backward (bounds the vmapped activations).
    """

    def __init__(
        self,
        bound: BoundLoss,
        source: DataSource,
        *,
        curvature: Curvature = "hessian",
        l2: float = 0.0,
        damping: float = 0.0,
        hvp_mode: str = "auto",
        engine: Engine = "auto",
        vector_chunk: int = 64,
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if curvature == "gauss_newton" and bound.output_loss is None:
            raise TypeError(
                "curvature='gauss_newton' needs loss_fn to be an OutputLoss(output_fn, loss_on_output): the "
                "Gauss-Newton matrix J^T Lambda J is taken w.r.t. the model outputs"
            )
        self.bound, self.source = bound, source
        self.curvature = curvature
        self.l2, self.damping = float(l2), float(damping)
        self.hvp_mode, self.engine = hvp_mode, engine
        self.vector_chunk = int(vector_chunk)
        self.n = source.n
        self.matvecs = 0  # number of vectors pushed through the data part (cost accounting)
        self._batched_failed = False

    # ---- basic properties --------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.bound.space.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.bound.dtype

    @property
    def device(self) -> torch.device:
        return self.bound.device

    @property
    def shift(self) -> float:
        """``l2 + damping``: the multiple of the identity in ``A``."""
        return self.l2 + self.damping

    # ---- products ------------------------------------------------------------------------------

    def matmat(self, V: Tensor, *, data_only: bool = False) -> Tensor:
        """``A V^T`` row-wise: ``[m, p] -> [m, p]`` (``data_only``: without ``(l2 + damping) I``)."""
        squeeze = V.dim() == 1
        V2 = V.reshape(1, -1) if squeeze else V
        if V2.dim() != 2 or V2.shape[1] != self.dim:
            raise ValueError(f"V must have shape [m, {self.dim}] or [{self.dim}], got {tuple(V.shape)}")
        V2 = V2.to(dtype=self.dtype, device=self.device)
        out = torch.zeros_like(V2)
        for i, (batch, b) in enumerate(self.source):
            out.add_(self._product(batch, V2, where=f"train batch {i}"), alpha=b / self.n)
        self.matvecs += V2.shape[0]
        if not data_only and self.shift != 0.0:
            out.add_(V2, alpha=self.shift)
        return out[0] if squeeze else out

    def batch_matmat(self, batch, V: Tensor) -> Tensor:
        """``(C_batch + (l2 + damping) I) V`` with ``C_batch`` the curvature of one batch's mean loss."""
        out = self._product(batch, V, where="a train batch")
        self.matvecs += V.shape[0]
        return out.add_(V, alpha=self.shift) if self.shift != 0.0 else out

    def _product(self, batch, V: Tensor, *, where: str) -> Tensor:
        use_batched = self.engine == "batched" or (
            self.engine == "auto" and V.shape[0] > 1 and not self._batched_failed
        )
        if use_batched:
            try:
                part = self._batched(batch, V)
            except (RuntimeError, NotImplementedError) as err:
                if self.engine == "batched":
                    raise
                self._batched_failed = True
                warnings.warn(
                    f"soulkit.influence: the batched curvature engine failed ({str(err).splitlines()[0]}); "
                    "using one soulkit.optim product per vector instead (slower)",
                    UserWarning,
                    stacklevel=3,
                )
                part = self._loop(batch, V)
        else:
            part = self._loop(batch, V)
        if not bool(torch.isfinite(part).all()):
            raise FloatingPointError(
                f"NaN/Inf in the curvature: {self.curvature}-vector product on {where} is not finite "
                "(the loss's second derivative is undefined or overflows at these parameters)"
            )
        return part

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for one flat vector ``[p]``."""
        return self.matmat(v)

    def _batch_loss(self, batch) -> Callable[[dict[str, Tensor]], Tensor]:
        return lambda p: self.bound.losses(p, batch).mean()

    def _loop(self, batch, V: Tensor) -> Tensor:
        space, params = self.bound.space, self.bound.params
        ol = self.bound.output_loss
        loss_fn = self._batch_loss(batch)

        def output_fn(p: dict[str, Tensor]) -> Tensor:
            return self.bound.outputs(p, batch)

        def loss_on_output(o: Tensor) -> Tensor:
            assert ol is not None
            return ol.loss_on_output(o, batch).mean()

        rows = []
        for v in V:
            vd = space.unflatten(v)
            if self.curvature == "hessian":
                r = hvp(loss_fn, params, vd, mode=self.hvp_mode)
            else:
                r = gnvp(output_fn, loss_on_output, params, vd, mode=self.hvp_mode)
            rows.append(space.flatten(r))
        return torch.stack(rows)

    def _batched(self, batch, V: Tensor) -> Tensor:
        space = self.bound.space
        names = list(space.names)
        leaves = [self.bound.params[k].detach().requires_grad_(True) for k in names]
        pd = dict(zip(names, leaves))
        out_rows = []
        with torch.enable_grad(), differentiable_attention():
            if self.curvature == "hessian":
                loss = self.bound.losses(pd, batch).mean()
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                for start in range(0, V.shape[0], self.vector_chunk):
                    Vc = V[start : start + self.vector_chunk]
                    if not live:
                        out_rows.append(torch.zeros_like(Vc))
                        continue
                    vs = space.unflatten(Vc)
                    hv = torch.autograd.grad(
                        [grads[i] for i in live],
                        leaves,
                        grad_outputs=[vs[names[i]].contiguous() for i in live],
                        retain_graph=True,
                        is_grads_batched=True,
                        allow_unused=True,
                    )
                    out_rows.append(self._flat_rows(hv, leaves, Vc.shape[0]))
            else:
                ol = self.bound.output_loss
                assert ol is not None
                o = self.bound.outputs(pd, batch)
                u = torch.zeros_like(o, requires_grad=True)
                jtu = torch.autograd.grad(o, leaves, grad_outputs=u, create_graph=True, allow_unused=True)
                live = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
                od = o.detach().requires_grad_(True)
                lo = ol.loss_on_output(od, batch).mean()
                (r,) = torch.autograd.grad(lo, od, create_graph=True)
                for start in range(0, V.shape[0], self.vector_chunk):
                    Vc = V[start : start + self.vector_chunk]
                    if not live or not r.requires_grad:
                        out_rows.append(torch.zeros_like(Vc))
                        continue
                    vs = space.unflatten(Vc)
                    (jv,) = torch.autograd.grad(
                        [jtu[i] for i in live],
                        u,
                        grad_outputs=[vs[names[i]].contiguous() for i in live],
                        retain_graph=True,
                        is_grads_batched=True,
                    )
                    (hjv,) = torch.autograd.grad(
                        r, od, grad_outputs=jv, retain_graph=True, is_grads_batched=True
                    )
                    gv = torch.autograd.grad(
                        o,
                        leaves,
                        grad_outputs=hjv,
                        retain_graph=True,
                        is_grads_batched=True,
                        allow_unused=True,
                    )
                    out_rows.append(self._flat_rows(gv, leaves, Vc.shape[0]))
        return torch.cat(out_rows).detach()

    @staticmethod
    def _flat_rows(parts, leaves, m: int) -> Tensor:
        return torch.cat(
            [
                (
                    p.reshape(m, -1)
                    if p is not None
                    else torch.zeros(m, leaf.numel(), dtype=leaf.dtype, device=leaf.device)
                )
                for p, leaf in zip(parts, leaves)
            ],
            dim=1,
        )

    # ---- dense, diagonal, spectrum -------------------------------------------------------------

    def dense(self, *, max_dim: int = 20_000, progress: bool | None = None) -> Tensor:
        """The explicit ``A`` ``[p, p]`` from ``p`` products (symmetrised; raises on NaN/Inf)."""
        p = self.dim
        if p > max_dim:
            raise ValueError(
                f"the explicit Hessian has {p} x {p} entries, above max_dim={max_dim}; use solver='cg', 'lissa' "
                "or 'arnoldi', or raise max_dim"
            )
        from tqdm.auto import tqdm

        eye = torch.eye(p, dtype=self.dtype, device=self.device)
        cols = []
        step = max(1, self.vector_chunk)
        with tqdm(
            total=p,
            desc="explicit Hessian",
            unit="col",
            disable=None if progress is None else not progress,
            leave=False,
        ) as bar:
            for s in range(0, p, step):
                cols.append(self.matmat(eye[s : s + step]))
                bar.update(min(step, p - s))
        H = torch.cat(cols)
        asym = float((H - H.T).abs().max()) / max(float(H.abs().max()), 1e-300)
        if asym > (1e-3 if self.dtype == torch.float32 else 1e-6):
            warnings.warn(
                f"soulkit.influence: the explicit Hessian is not symmetric (relative asymmetry {asym:.2g})",
                UserWarning,
                stacklevel=2,
            )
        return 0.5 * (H + H.T)

    def diagonal(
        self,
        method: str = "exact",
        *,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        max_backward: int | None = DEFAULT_MAX_BACKWARD,
    ) -> Tensor:
        """Estimate of the diagonal of the data part ``(1/n) sum_j C_j`` (``[p]``, no ``l2``/damping).

        ``"exact"``: :func:`soulkit.optim.exact_hessian_diag` per batch (Hessian curvature) or
        ``sum_ab Lambda_ab J_a * J_b`` from per-example Jacobians (Gauss-Newton);
        ``"hutchinson"``: :func:`soulkit.optim.hutchinson_diag` with ``n_samples`` probes (Gauss-Newton:
        the same estimator over Gauss-Newton products); ``"gnb"``: :func:`soulkit.optim.gnb_diag`
        (Sophia's Gauss-Newton-Bartlett estimate; outputs must be softmax cross-entropy logits).

        The exact diagonal costs one backward pass per parameter element and batch (Hessian) or per
        output dimension and example (Gauss-Newton Jacobian rows), see :meth:`exact_diagonal_cost`;
        when that exceeds ``max_backward`` (default :data:`DEFAULT_MAX_BACKWARD`; ``None``: no limit)
        it raises ``ValueError`` before any work instead of running for minutes. The stochastic
        methods cost ``n_samples`` products per batch whatever the model size.
        """
        if method not in DIAGONAL_METHODS:
            raise ValueError(f"diagonal method must be one of {DIAGONAL_METHODS}, got {method!r}")
        if max_backward is not None and (
            isinstance(max_backward, bool) or not isinstance(max_backward, int) or max_backward < 1
        ):
            raise ValueError(f"max_backward must be an integer >= 1 or None, got {max_backward!r}")
        if method == "exact" and max_backward is not None:
            cost, how = self.exact_diagonal_cost()
            if cost > max_backward:
                batches = self._n_batches()
                raise ValueError(
                    f"the exact {self.curvature} diagonal needs {cost:,} backward passes ({how}), above the budget "
                    f"max_backward={max_backward:,}. Use an estimate: method='hutchinson' ({n_samples} "
                    f"{'Gauss-Newton' if self.curvature == 'gauss_newton' else 'Hessian'}-vector products per batch, "
                    f"{n_samples * batches:,} in all) or method='gnb' (Gauss-Newton, softmax outputs; {n_samples} "
                    f"backward passes per batch), e.g. DiagonalSolver(method='hutchinson'); or raise the budget, "
                    f"DiagonalSolver(max_backward={cost}) (max_backward=None: no limit)"
                )
        space, params = self.bound.space, self.bound.params
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        if method == "hutchinson" and self.curvature == "gauss_newton":
            gen = generator if generator is not None else torch.Generator(device=self.device).manual_seed(0)
            U = (
                torch.randint(0, 2, (n_samples, self.dim), generator=gen, device=self.device).to(self.dtype)
                * 2
                - 1
            )
            return (U * self.matmat(U, data_only=True)).mean(0)
        for batch, b in self.source:
            w = b / self.n
            if method == "exact" and self.curvature == "hessian":
                d = space.flatten(exact_hessian_diag(self._batch_loss(batch), params, max_elements=self.dim))
            elif method == "exact":
                J = self.bound.jacobians(
                    batch, b, self._out_dim(batch, b), chunk_size=None, max_memory_mb=256.0
                )
                _, lam = self.bound.output_derivatives(batch, b)
                d = torch.einsum("bkp,bkl,blp->p", J, lam, J) / b
            elif method == "hutchinson":
                d = space.flatten(
                    hutchinson_diag(
                        self._batch_loss(batch),
                        params,
                        n_samples=n_samples,
                        generator=generator,
                        mode=self.hvp_mode,
                    )
                )
            else:
                d = self._gnb(batch, n_samples, generator)
            out.add_(d, alpha=w)
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                f"NaN/Inf in the curvature: the {method} diagonal estimate is not finite"
            )
        return out

    def exact_diagonal_cost(self) -> tuple[int, str]:
        """Backward passes the exact diagonal takes, and how they add up (no curvature is computed).

        Hessian: ``p`` per batch (:func:`soulkit.optim.exact_hessian_diag`). Gauss-Newton: one
        Jacobian row per output dimension and example, ``k * n`` (vmapped; the output Hessian adds
        2 per batch for a softmax cross-entropy, ``k`` for other losses).
        """
        if self.curvature == "hessian":
            batches = self._n_batches()
            return self.dim * batches, f"{self.dim:,} parameters x {batches:,} batches"
        batch, b = next(iter(self.source))
        k = self._out_dim(batch, b)
        return k * self.n, f"{k:,} outputs x {self.n:,} examples, one Jacobian row each"

    def _n_batches(self) -> int:
        return sum(1 for _ in self.source)

    def _out_dim(self, batch, b: int) -> int:
        with torch.no_grad():
            return int(self.bound.outputs(self.bound.params, batch)[0].numel())

    def _gnb(self, batch, n_samples: int, generator: torch.Generator | None) -> Tensor:
        if self.bound.output_loss is None:
            raise TypeError(
                "the 'gnb' diagonal needs loss_fn to be an OutputLoss whose outputs are softmax logits"
            )
        names = list(self.bound.space.names)
        leaves = {k: self.bound.params[k].detach().requires_grad_(True) for k in names}
        acc = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            logits = self.bound.outputs(leaves, batch)
            if logits.dim() < 2 or logits.shape[-1] < 2:
                raise ValueError(
                    f"the 'gnb' diagonal samples labels from softmax(outputs) and needs outputs [B, ..., classes>=2], "
                    f"got {tuple(logits.shape)}; use method='exact' or 'hutchinson'"
                )
            for s in range(n_samples):
                est = gnb_diag(logits, leaves, generator=generator, retain_graph=s < n_samples - 1)
                acc.add_(self.bound.space.flatten(est))
        return acc / n_samples

    def smallest_eigenvalue(
        self, *, iters: int = 30, start: Tensor | None = None, seed: int = 0
    ) -> tuple[float, float, int]:
        """Lanczos estimate of the smallest eigenvalue of ``A``: ``(theta, residual, products)``.

        ``iters`` products (capped at ``p``) build an orthonormal Krylov basis from ``start`` (or a
        seeded random vector), fully re-orthogonalised; ``theta`` is the smallest Ritz value and
        ``residual = ||A e - theta e||`` for its unit Ritz vector ``e``. By Rayleigh-Ritz ``theta``
        approaches ``lambda_min(A)`` from above: ``lambda_min(A) <= theta <=`` the Rayleigh quotient of
        ``start``. So ``-theta`` is a lower bound on the shift that makes ``A`` positive definite, exact
        when the basis spans everything (``products == p``). When the Krylov space becomes invariant
        (repeated eigenvalues, or a start vector that misses eigenvectors), the basis is continued with
        a random vector orthogonal to it, as in :class:`~soulkit.influence.ArnoldiSolver`.
        """
        p = self.dim
        m = max(1, min(int(iters), p))
        gen = torch.Generator(device=self.device).manual_seed(seed)
        if start is None or not bool(torch.isfinite(start).all()) or float(start.norm()) == 0.0:
            start = torch.randn(p, generator=gen, dtype=self.dtype, device=self.device)
        q = start.detach().to(dtype=self.dtype, device=self.device).reshape(p)
        q = q / q.norm()
        Q = torch.zeros(m, p, dtype=self.dtype, device=self.device)
        AQ = torch.zeros_like(Q)
        used = m
        for j in range(m):
            Q[j] = q
            AQ[j] = self.matvec(q)
            if j == m - 1:
                break
            w = AQ[j].clone()
            for _ in range(2):
                w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
            nrm = float(w.norm())
            if nrm > 1e-10 * max(float(AQ[j].norm()), 1e-300):
                q = w / nrm
                continue
            # the Krylov space is invariant (repeated eigenvalues, or start misses some eigenvectors):
            # continue from a random vector orthogonal to it, so the smallest eigenvalue is not missed
            for _ in range(10):
                w = torch.randn(p, generator=gen, dtype=self.dtype, device=self.device)
                for _ in range(2):
                    w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
                if float(w.norm()) > 1e-8:
                    break
            else:
                used = j + 1
                break
            q = w / w.norm()
        Q, AQ = Q[:used], AQ[:used]
        T = Q @ AQ.T
        evals, U = torch.linalg.eigh(0.5 * (T + T.T))
        theta = float(evals[0])
        e, ae = U[:, 0] @ Q, U[:, 0] @ AQ
        return theta, float((ae - theta * e).norm() / e.norm()), used

    def top_eigenvalue(self, *, iters: int = 100, tol: float = 1e-4, seed: int = 0) -> float:
        """Largest-magnitude eigenvalue of ``A`` by power iteration (Rayleigh quotient)."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        v = torch.randn(self.dim, generator=gen, dtype=self.dtype, device=self.device)
        v /= v.norm()
        lam = 0.0
        for _ in range(iters):
            av = self.matvec(v)
            new = float(v @ av)
            norm = float(av.norm())
            if norm == 0.0:
                return 0.0
            v = av / norm
            if abs(new - lam) <= tol * abs(new):
                lam = new
                break
            lam = new
        return lam
