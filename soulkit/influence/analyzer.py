"""Influence scores with calibrated sign and scale: ``InfluenceAnalyzer``.

Setting. The model was trained on ``n`` examples to a minimum of

    L(theta) = (1/n) sum_j loss_j(theta) + (l2 / 2) ||theta||^2,

so ``H = (1/n) sum_j Hess loss_j + l2 I`` (solved with ``A = H + damping I``). "Removing ``j``" means
minimising ``L - loss_j / n`` -- the same objective without ``j``'s term, the regulariser unchanged
(exactly what retraining a sum-of-losses model such as scikit-learn's ``LogisticRegression(C=...)``
without ``j`` does; see the note below for the mean-over-``n - 1`` convention).

First order (Koh & Liang 2017). ``theta_{-j} - theta ~ A^{-1} g_j / n``, so the change of a query's loss is

    scores[i, j] = (1/n) g_i^T A^{-1} g_j       ~ loss_i(theta_{-j}) - loss_i(theta)

in loss units: positive means removing ``j`` raises query ``i``'s loss (``j`` helps ``i``).

Newton-corrected (``loo="newton"``). One Newton step on the leave-one-out objective from ``theta`` uses
its own Hessian ``A - H_j / n``: ``scores[i, j] = (1/n) g_i^T (A - H_j/n)^{-1} g_j``, with ``H_j`` the
Gauss-Newton block ``J_j^T Lambda_j J_j`` of example ``j`` (``J_j``: Jacobian ``[k, p]`` of its ``k``
outputs, ``Lambda_j``: Hessian ``[k, k]`` of its loss in the outputs). Woodbury,

    (A - J^T (Lambda/n) J)^{-1} = A^{-1} + A^{-1} J^T (I - (Lambda/n) M)^{-1} (Lambda/n) J A^{-1},
    M_j = J_j A^{-1} J_j^T   [k, k],

and ``g_j = J_j^T r_j`` (``r_j = d loss_j / d out_j``) collapse it to

    scores[i, j] = (1/n) (J_j A^{-1} g_i)^T (I - X_j)^{-1} r_j,      X_j = Lambda_j M_j / n,

i.e. first-order influence with ``g_j`` replaced by ``J_j^T (I - X_j)^{-1} r_j``. For a scalar output
``X_j`` is the leverage ``lambda_j J_j A^{-1} J_j^T / n`` and the score is the first-order score divided
by ``1 - X_j``. Cost: ``k`` extra solves per training example. For a quadratic objective (ridge) the
Newton step is the exact leave-one-out parameter change.

Mean-over-``(n - 1)`` convention. Retraining on ``(1/(n-1)) sum_{k != j} loss_k + (l2/2)||theta||^2``
instead moves ``theta`` by an extra ``(l2/n) A^{-1} theta`` (the same for every ``j``): the scores of
query ``i`` shift by the constant ``(l2/n) g_i^T A^{-1} theta``; correlations across ``j`` are unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._data import Batch, DataSource, slice_batch
from .factored import FISHERS, LIKELIHOODS, FactoredInfluence, factored_method
from .gradients import BoundLoss, OutputLoss
from .hessian import CURVATURES, ENGINES, CurvatureOperator
from .kfac import FACTOR_METHODS
from .optimizer_state import OPTIMIZER_STATE_RULES, OptimizerStateSolver
from .solvers import Solver, make_solver
from .store import InfluenceStore

__all__ = ["InfluenceAnalyzer", "InfluenceConfig"]

LOO_MODES = ("first_order", "newton")
_HVP_MODES = ("auto", "forward_over_reverse", "double_backward")


@dataclass
class InfluenceConfig:
    """Options of :class:`InfluenceAnalyzer`, validated on construction.

    Args:
        solver: ``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``, ``"diagonal"``, ``"identity"`` or a
            configured :class:`~soulkit.influence.solvers.Solver` (e.g. ``CGSolver(tol=1e-10)``). A name
            gives every analyzer built from this config its own solver; an instance is used as is.
            ``"kfac"`` and ``"ekfac"`` (and ``"identity"`` together with ``modules``) take the factored
            route for transformer LMs (:mod:`.factored`): curvature from module hooks, no per-example
            parameter vectors; it needs an :class:`~soulkit.influence.OutputLoss` whose outputs are logits.
            ``"optimizer_state"`` preconditions with the diagonal curvature the training optimizer kept
            (Sophia's ``h``, AdaHessian's or Adam's second moment; :mod:`.optimizer_state`), from
            ``optimizer_state``; with ``modules`` it takes the factored route (query gradients of the
            tracked modules divided by the diagonal).
        l2: the training objective's L2 coefficient: ``+ (l2/2) ||theta||^2``, so ``H`` has ``+ l2 I``.
        damping: extra ``damping * I`` added to ``H`` for solving (not part of the objective).
        curvature: ``"hessian"`` (exact Hessian products) or ``"gauss_newton"`` (``J^T Lambda J``, PSD
            for convex losses).
        loo: ``"first_order"`` (classic influence) or ``"newton"`` (removed example's own curvature).
        params: names of the attributed parameters (default all with ``requires_grad``); ``l2`` applies
            to them.
        batch_size: batch size when a ``Dataset`` is given.
        dtype: ``torch.float32``/``torch.float64`` to compute in (default: the parameters' dtype).
        chunk_size, max_memory_mb: per-example gradient chunking (see :mod:`.gradients`); the training
            batches are kept in memory (once prepared) while they fit in ``max_memory_mb``.
        engine: curvature-product engine (``"auto"``, ``"batched"``, ``"loop"``; see :mod:`.hessian`).
        hvp_mode: passed to :func:`soulkit.optim.hvp`.
        solve_chunk: right-hand sides per ``solve`` call.
        progress: tqdm bars (``None``: only on a terminal).
        modules: factored route: names or types of the tracked linear modules (default every
            ``nn.Linear``/``Conv1D`` except the LM head and embedding-tied weights).
        fisher: factored route: ``"true"`` (pseudo-gradients sampled from the model, the Gauss-Newton in
            expectation) or ``"empirical"`` (the training labels' gradients).
        likelihood: factored route, ``fisher="true"``: ``"categorical"`` (softmax over the last dimension)
            or ``"gaussian"`` (squared error).
        fisher_samples: factored route: pseudo-gradient draws per sequence (each an extra backward).
        query_rank: factored route: keep each preconditioned query gradient as a rank-``r`` product per
            module (``None``: exact).
        projection: factored route: LoGra-style random projection of each module's gradients to
            ``k x k`` (:class:`~soulkit.influence.factored.FactoredInfluence`); needed by
            :meth:`InfluenceAnalyzer.train_statistics`.
        seed: factored route: seeds the pseudo-gradient draws.
        optimizer_state: ``solver="optimizer_state"``: the optimizer's ``state_dict`` (Sophia, AdaHessian,
            Adam/AdamW), or a path to one saved with ``torch.save`` (read with ``weights_only=True`` only).
        optimizer_state_rule: ``"auto"`` (Sophia/AdaHessian: ``"hessian"``, a Hessian diagonal in
            calibrated units; Adam: ``"adam"``, ``sqrt(v_hat) + eps`` as TrackStar), ``"hessian"``,
            ``"adam"`` or ``"fisher"`` (Adam: ``v_hat``, an empirical-Fisher diagonal up to ``1/batch``).
        optimizer_params: the model's parameter names in the order the optimizer was built with (its
            ``state_dict`` numbers parameters by position); default ``model.named_parameters()`` in order.
            Frozen parameters without state must be left out of ``params``.
        optimizer_state_bias_correction: divide the state's EMAs by ``1 - beta2**t``.

    On the factored route, when ``l2`` and ``damping`` are both 0 each module is damped by
    :data:`~soulkit.influence.kfac.DEFAULT_RELATIVE_DAMPING` times its mean curvature eigenvalue.
    """

    solver: str | Solver = "cg"
    l2: float = 0.0
    damping: float = 0.0
    curvature: Literal["hessian", "gauss_newton"] = "hessian"
    loo: Literal["first_order", "newton"] = "first_order"
    params: Sequence[str] | None = None
    batch_size: int = 64
    dtype: torch.dtype | None = None
    chunk_size: int | None = None
    max_memory_mb: float = 512.0
    engine: Literal["auto", "batched", "loop"] = "auto"
    hvp_mode: Literal["auto", "forward_over_reverse", "double_backward"] = "auto"
    solve_chunk: int = 256
    progress: bool | None = None
    modules: Sequence[str | type] | None = None
    fisher: Literal["true", "empirical"] = "true"
    likelihood: Literal["categorical", "gaussian"] = "categorical"
    fisher_samples: int = 1
    query_rank: int | None = None
    projection: int | None = None
    seed: int = 0
    optimizer_state: Any = dataclasses.field(default=None, repr=False)
    optimizer_state_rule: Literal["auto", "hessian", "adam", "fisher"] = "auto"
    optimizer_params: Sequence[str] | None = None
    optimizer_state_bias_correction: bool = True

    def __post_init__(self) -> None:
        for name in ("l2", "damping"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.loo not in LOO_MODES:
            raise ValueError(f"loo must be one of {LOO_MODES}, got {self.loo!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.hvp_mode not in _HVP_MODES:
            raise ValueError(f"hvp_mode must be one of {_HVP_MODES}, got {self.hvp_mode!r}")
        for name, low in (("batch_size", 1), ("solve_chunk", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be an integer >= 1 or None, got {self.chunk_size!r}")
        m = self.max_memory_mb
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0 or not math.isfinite(m):
            raise ValueError(f"max_memory_mb must be a finite number > 0, got {m!r}")
        if self.dtype not in (None, torch.float32, torch.float64):
            raise TypeError(f"dtype must be None, torch.float32 or torch.float64, got {self.dtype!r}")
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {self.fisher!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if isinstance(self.fisher_samples, bool) or not isinstance(self.fisher_samples, int) or self.fisher_samples < 1:
            raise ValueError(f"fisher_samples must be an integer >= 1, got {self.fisher_samples!r}")
        if self.query_rank is not None and (isinstance(self.query_rank, bool) or not isinstance(self.query_rank, int)
                                            or self.query_rank < 1):
            raise ValueError(f"query_rank must be an integer >= 1 or None, got {self.query_rank!r}")
        if self.projection is not None and (isinstance(self.projection, bool) or not isinstance(self.projection, int)
                                            or self.projection < 1):
            raise ValueError(f"projection must be an integer >= 1 or None, got {self.projection!r}")
        if self.optimizer_state_rule not in OPTIMIZER_STATE_RULES:
            raise ValueError(
                f"optimizer_state_rule must be one of {OPTIMIZER_STATE_RULES}, got {self.optimizer_state_rule!r}"
            )
        if not isinstance(self.optimizer_state_bias_correction, bool):
            raise TypeError(
                f"optimizer_state_bias_correction must be a bool, got {self.optimizer_state_bias_correction!r}"
            )
        if self.optimizer_params is not None and (
            isinstance(self.optimizer_params, str) or not isinstance(self.optimizer_params, Sequence)
        ):
            raise TypeError(f"optimizer_params must be a sequence of parameter names, got {self.optimizer_params!r}")
        if self.solver == "optimizer_state":
            if self.optimizer_state is None:
                raise ValueError(
                    "solver='optimizer_state' needs optimizer_state=<an optimizer state_dict, or a path to one "
                    "saved with torch.save>"
                )
        elif self.optimizer_state is not None:
            raise ValueError(
                f"optimizer_state is used only by solver='optimizer_state' (solver is {self.solver!r})"
            )
        elif not (isinstance(self.solver, str) and self.solver in FACTOR_METHODS):
            make_solver(self.solver)  # an unknown name or a wrong type fails here, not at fit

    @classmethod
    def from_options(cls, config: InfluenceConfig | None = None, **options: Any) -> InfluenceConfig:
        """``config`` (default: all defaults) with ``options`` replacing its fields; unknown names raise ``TypeError``."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be an InfluenceConfig or None, got {type(config).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise TypeError(
                f"unknown influence option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"the options are the fields of InfluenceConfig: {', '.join(names)}"
            )
        return cls(**options) if config is None else dataclasses.replace(config, **options)


class InfluenceAnalyzer:
    """Influence of training examples on query losses, in the units of leave-one-out retraining.

    Args:
        model: a trained ``nn.Module`` (never modified; put it in eval mode if it has dropout or
            batch norm).
        loss_fn: ``loss_fn(model, batch) -> Tensor [B]`` of per-example losses (checked). Batches
            are what the ``DataLoader`` yields. ``curvature="gauss_newton"`` and ``loo="newton"`` need
            an :class:`~soulkit.influence.OutputLoss` (``output_fn`` + ``loss_on_output``).
        config: an :class:`InfluenceConfig` (default: its defaults).
        **options: any field of :class:`InfluenceConfig` (``solver``, ``l2``, ``damping``, ``curvature``,
            ``loo``, ...; documented there), replacing the value in ``config``. An unknown name raises
            ``TypeError``.

    Example::

        an = InfluenceAnalyzer(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
                               solver="cg", l2=1e-3).fit(train)
        s = an.scores(train, test)        # [n_test, n_train], ~ loss_test(theta without j) - loss_test(theta)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Batch], Tensor],
        config: InfluenceConfig | None = None,
        **options: Any,
    ) -> None:
        self.config = InfluenceConfig.from_options(config, **options)
        cfg = self.config
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}"
            )
        self.model, self.loss_fn = model, loss_fn
        self.factored: FactoredInfluence | None = None
        method = factored_method(cfg.solver, cfg.modules)
        if method is not None:
            if cfg.loo != "first_order":
                raise ValueError(f"solver={method!r} computes first-order influence; use loo='first_order'")
            self.factored = FactoredInfluence(
                model, loss_fn, method=method, modules=cfg.modules, l2=cfg.l2, damping=cfg.damping,
                fisher=cfg.fisher, likelihood=cfg.likelihood, fisher_samples=cfg.fisher_samples,
                query_rank=cfg.query_rank, projection=cfg.projection, batch_size=cfg.batch_size, seed=cfg.seed,
                progress=cfg.progress,
                optimizer_state=cfg.optimizer_state, optimizer_state_rule=cfg.optimizer_state_rule,
                optimizer_params=cfg.optimizer_params,
                optimizer_state_bias_correction=cfg.optimizer_state_bias_correction,
            )
            return
        if cfg.projection is not None:
            raise ValueError("projection is an option of the factored route: solver='kfac'/'ekfac', or 'identity' "
                             "with modules=[...]")
        needs = [
            what
            for what, on in (
                ("loo='newton'", cfg.loo == "newton"),
                ("curvature='gauss_newton'", cfg.curvature == "gauss_newton"),
            )
            if on
        ]
        if needs and not isinstance(loss_fn, OutputLoss):
            raise TypeError(
                f"{' and '.join(needs)} need loss_fn to be an OutputLoss(output_fn, loss_on_output): the "
                "per-example Gauss-Newton block J^T Lambda J is taken w.r.t. the model outputs"
            )
        self.solver: Solver
        if cfg.solver == "optimizer_state":  # the state (or its file) is loaded and checked here
            self.solver = OptimizerStateSolver(
                state=cfg.optimizer_state, rule=cfg.optimizer_state_rule, optimizer_params=cfg.optimizer_params,
                bias_correction=cfg.optimizer_state_bias_correction,
            )  # fmt: skip
        else:
            self.solver = make_solver(cfg.solver)
        self.bound = BoundLoss(model, loss_fn, params=cfg.params, dtype=cfg.dtype)
        self.operator: CurvatureOperator | None = None
        self.n_train: int | None = None
        self._train_obj: Any = None
        self._newton_cache: tuple[Any, dict[str, Tensor]] | None = None

    # ---- data ------------------------------------------------------------------------------

    def _source(self, data: Any, name: str, *, cache: bool) -> DataSource:
        if data is self._train_obj and self.operator is not None and name == "train":
            return self.operator.source
        return DataSource(
            data,
            name=name,
            batch_size=self.config.batch_size,
            dtype=self.bound.dtype,
            device=self.bound.device,
            cache_bytes=int(self.config.max_memory_mb * 2**20) if cache else 0,
        )

    def _bar(self, desc: str, total: int | None = None) -> tqdm:
        p = self.config.progress
        return tqdm(total=total, desc=desc, unit="ex", disable=None if p is None else not p, leave=False)

    def _check_first(self, batch: Batch, b: int, name: str) -> None:
        self.bound.check_batch(batch, b, name=name)
        k = min(b, 16)
        self.bound.grads(slice_batch(batch, 0, k), k, chunk_size=self.config.chunk_size, check=True)
        if self.bound.output_loss is not None:
            self.bound.check_outputs(slice_batch(batch, 0, k), k)  # no output Hessian: not needed here

    def _grads(self, source: DataSource, name: str) -> Iterator[tuple[Tensor, Batch, int]]:
        first = True
        with self._bar(f"gradients ({name})", total=source.n if source._n is not None else None) as bar:
            for batch, b in source:
                if first:
                    self._check_first(batch, b, name)
                    first = False
                g, _ = self.bound.grads(
                    batch, b, chunk_size=self.config.chunk_size, max_memory_mb=self.config.max_memory_mb
                )
                yield g, batch, b
                bar.update(b)

    def _require_fit(self) -> CurvatureOperator:
        if self.factored is not None:
            raise RuntimeError(f"solver={self.factored.method!r} offers fit, scores (per_token too) and "
                               "save_factors/load_factors; this method needs a per-example solver")
        if self.operator is None:
            raise RuntimeError("InfluenceAnalyzer: call fit(train) before scores/self_scores/inverse_hvp")
        return self.operator

    def _no_store(self, store: Any) -> None:
        if store is not None:
            raise ValueError("store= keeps K-FAC/EK-FAC factors and chunked scores: it needs the factored route "
                             "(solver='kfac'/'ekfac', or 'identity'/'optimizer_state' with modules=[...])")

    def _check_count(self, n: int, name: str = "train") -> None:
        if n != self.n_train:
            raise ValueError(
                f"{name} has {n} examples but the analyzer was fitted on {self.n_train}: pass the training set given to fit"
            )

    # ---- public ----------------------------------------------------------------------------

    def fit(self, train: Any, *, store: InfluenceStore | str | os.PathLike | None = None) -> InfluenceAnalyzer:
        """Check the loss on ``train``, count it, and fit the solver to its curvature. Returns ``self``.

        ``train``: the ``Dataset``/unshuffled ``DataLoader`` the model was trained on (all ``n`` examples).
        The attributed parameters are copied here: later scores refer to the model as it was at ``fit``.
        ``store`` (factored route): a directory or :class:`~soulkit.influence.InfluenceStore` where the factors
        are written as they are computed and from which a rerun resumes (:mod:`.store`); under
        torch.distributed the ranks split the training batches and sum their statistics.
        """
        if self.factored is not None:
            self.factored.fit(train, store=store)
            return self
        self._no_store(store)
        cfg = self.config
        self.bound = BoundLoss(self.model, self.loss_fn, params=cfg.params, dtype=cfg.dtype)  # fresh snapshot
        self.operator, self._train_obj, self._newton_cache = None, None, None
        source = self._source(train, "train", cache=True)
        first = True
        for batch, b in source:
            if first:
                self._check_first(batch, b, "train")
                first = False
        op = CurvatureOperator(
            self.bound, source, curvature=cfg.curvature, l2=cfg.l2, damping=cfg.damping,
            hvp_mode=cfg.hvp_mode, engine=cfg.engine,
        )  # fmt: skip
        self.solver.fit(op)
        self.operator, self.n_train, self._train_obj = op, source.n, train
        return self

    def inverse_hvp(self, V: Tensor) -> Tensor:
        """``(H + damping I)^{-1}`` applied to the rows of ``V [m, p]`` (chunked by ``solve_chunk``)."""
        self._require_fit()
        if V.dim() == 1:
            return self.solver.solve(V)
        step = self.config.solve_chunk
        if V.shape[0] <= step:
            return self.solver.solve(V)
        return torch.cat([self.solver.solve(V[s : s + step]) for s in range(0, V.shape[0], step)])

    def query_gradients(self, queries: Any) -> Tensor:
        """Per-example gradients ``[m, p]`` of the query losses."""
        if self.factored is not None:
            raise RuntimeError("the factored route never forms [examples, parameters] gradients; use scores()")
        source = self._source(queries, "queries", cache=False)
        return torch.cat([g for g, _, _ in self._grads(source, "queries")])

    def train_gradients(self, train: Any) -> Tensor:
        """Per-example gradients ``[n, p]`` of the training losses (memory ``n * p``)."""
        if self.factored is not None:
            raise RuntimeError("the factored route never forms [examples, parameters] gradients; use scores()")
        source = self._source(train, "train", cache=True)
        return torch.cat([g for g, _, _ in self._grads(source, "train")])

    def scores(self, train: Any, queries: Any, *, per_token: bool = False,
               store: InfluenceStore | str | os.PathLike | None = None) -> Tensor:
        """``[n_queries, n_train]``: predicted ``loss_i(theta without j) - loss_i(theta)``.

        ``(1/n) g_i^T A^{-1} g_j`` (``loo="first_order"``) or ``(1/n) g_i^T (A - H_j/n)^{-1} g_j``
        (``loo="newton"``). Queries are solved (``m`` solves), training gradients streamed.
        ``per_token=True`` (factored route only): ``[n_queries, n_train, T]``, one score per position of
        the training batches (0 on padding), summing over ``T`` to the sequence's score.
        ``store`` (factored route): scores are computed in chunks of training batches, each written to the
        store; a rerun computes only the missing ones (and under torch.distributed each rank scores its share
        of the chunks). The store must be the one given to :meth:`fit`, or a new one.
        """
        if self.factored is not None:
            return self.factored.scores(train, queries, per_token=per_token, store=store)
        self._no_store(store)
        if per_token:
            raise ValueError("per_token scores need the factored route: solver='kfac'/'ekfac', or 'identity' "
                             "with modules=[...]")
        self._require_fit()
        n = self.n_train
        assert n is not None
        S = self.inverse_hvp(self.query_gradients(queries))  # [m, p]
        out = torch.empty(S.shape[0], n, dtype=S.dtype, device=S.device)
        source = self._source(train, "train", cache=True)
        j = 0
        if self.config.loo == "first_order":
            for g, _, b in self._grads(source, "train"):
                if j + b > n:
                    self._check_count(j + b)
                out[:, j : j + b] = S @ g.T / n
                j += b
        else:
            factors = self._newton_factors(train, source)
            W = factors["W"]
            with self._bar("Jacobians (train)", total=n) as bar:
                for batch, b in source:
                    if j + b > n:
                        self._check_count(j + b)
                    J = self._jac(batch, b)
                    gt = torch.einsum("bkp,bk->bp", J, W[j : j + b])
                    out[:, j : j + b] = S @ gt.T / n
                    j += b
                    bar.update(b)
        self._check_count(j)
        return out

    def train_statistics(self, train: Any, *,
                         store: InfluenceStore | str | os.PathLike | None = None) -> dict[str, Tensor]:
        """Factored route with ``projection``: keep every training example's projected gradient per module
        (:meth:`FactoredInfluence.train_statistics`), so that later :meth:`scores` calls skip the pass over
        the training set. Call after :meth:`fit`; ``store`` keeps them on disk."""
        if self.factored is None:
            raise RuntimeError("train_statistics needs the factored route (solver='kfac'/'ekfac', or 'identity' with "
                               "modules=[...]) and projection=k")
        return self.factored.train_statistics(train, store=store)

    def save_factors(self, directory: Any) -> None:
        """Factored route: write the fitted K-FAC/EK-FAC factors (safetensors + JSON) into ``directory``."""
        if self.factored is None:
            raise RuntimeError("save_factors needs solver='kfac' or 'ekfac'")
        self.factored.save_factors(directory)

    def load_factors(self, directory: Any, train: Any) -> InfluenceAnalyzer:
        """Factored route: use factors saved by :meth:`save_factors` instead of :meth:`fit` (checked against
        the tracked modules and the size of ``train``). Returns ``self``."""
        if self.factored is None:
            raise RuntimeError("load_factors needs solver='kfac' or 'ekfac'")
        self.factored.load_factors(directory, train)
        return self

    def self_scores(self, train: Any) -> Tensor:
        """``[n_train]``: predicted ``loss_j(theta without j) - loss_j(theta)`` for each training example."""
        self._require_fit()
        n = self.n_train
        assert n is not None
        source = self._source(train, "train", cache=True)
        if self.config.loo == "newton":
            f = self._newton_factors(train, source)
            return (f["Mr"] * f["W"]).sum(1) / n
        out, j = [], 0
        for g, _, b in self._grads(source, "train"):
            if j + b > n:
                self._check_count(j + b)
            out.append((g * self.inverse_hvp(g)).sum(1) / n)
            j += b
        self._check_count(j)
        return torch.cat(out)

    def leverages(self, train: Any) -> Tensor:
        """``X_j = Lambda_j J_j A^{-1} J_j^T / n`` ``[n, k, k]`` (``loo="newton"``; ``k = 1``: the leverage)."""
        self._require_fit()
        if self.config.loo != "newton":
            raise RuntimeError(
                "leverages are computed for loo='newton'; construct the analyzer with loo='newton'"
            )
        return self._newton_factors(train, self._source(train, "train", cache=True))["X"]

    # ---- Newton-corrected leave-one-out ---------------------------------------------------------

    def _jac(self, batch: Batch, b: int) -> Tensor:
        k = self._out_dim(batch)
        return self.bound.jacobians(
            batch, b, k, chunk_size=self.config.chunk_size, max_memory_mb=self.config.max_memory_mb
        )

    def _out_dim(self, batch: Batch) -> int:
        with torch.no_grad():
            out = self.bound.outputs(self.bound.params, batch)
        return int(out[0].numel()) if out.dim() > 0 else 1

    def _newton_factors(self, train: Any, source: DataSource) -> dict[str, Tensor]:
        """Per training example: ``W_j = (I - X_j)^{-1} r_j``, ``X_j``, and ``M_j r_j``."""
        if self._newton_cache is not None and self._newton_cache[0] is train:
            return self._newton_cache[1]
        n = self.n_train
        assert n is not None
        Ws, Xs, Mrs = [], [], []
        j, first = 0, True
        with self._bar("Newton leave-one-out factors", total=n) as bar:
            for batch, b in source:
                if first:
                    self._check_first(batch, b, "train")
                    first = False
                J = self._jac(batch, b)  # [b, k, p]
                k = J.shape[1]
                r, lam = self.bound.output_derivatives(batch, b)  # [b, k], [b, k, k]
                Z = self.inverse_hvp(J.reshape(b * k, -1)).reshape(b, k, -1)
                M = torch.einsum("bkp,blp->bkl", J, Z)
                M = 0.5 * (M + M.transpose(1, 2))
                X = lam @ M / n
                eig = torch.linalg.eigvals(X).real.amax(dim=1)
                if bool((eig >= 1).any()):
                    bad = torch.nonzero(eig >= 1).flatten()[:5] + j
                    raise ValueError(
                        f"loo='newton': removing training examples {bad.tolist()} leaves H - H_j/n + damping singular or "
                        f"indefinite (leverage {float(eig.max()):.4g} >= 1); add damping or l2, or use loo='first_order'"
                    )
                eye = torch.eye(k, dtype=X.dtype, device=X.device).expand(b, k, k)
                W = torch.linalg.solve(eye - X, r.unsqueeze(-1)).squeeze(-1)
                Ws.append(W)
                Xs.append(X)
                Mrs.append(torch.einsum("bkl,bl->bk", M, r))
                j += b
                bar.update(b)
        self._check_count(j)
        factors = {"W": torch.cat(Ws), "X": torch.cat(Xs), "Mr": torch.cat(Mrs)}
        self._newton_cache = (train, factors)
        return factors
