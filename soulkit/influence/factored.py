"""Influence for transformer LMs: K-FAC / EK-FAC curvature from module hooks, factored scores.

:class:`FactoredInfluence` is what :class:`~soulkit.influence.InfluenceAnalyzer` runs for
``solver="kfac"``, ``"ekfac"`` (and ``"identity"`` or ``"optimizer_state"`` with ``modules=``). It never flattens the
parameters and never calls ``vmap``: the model runs as it is (SDPA/flash attention, padding masks,
bf16 weights), forward hooks keep each tracked module's inputs ``a`` and one backward gives the
gradients ``s`` at its outputs (:mod:`.modules`). A training sequence's gradient of a module is
``G_j = sum_t s_t a_t^T``; a query's is preconditioned once (``Q_i = (F + lambda I)^{-1} G_i``,
:mod:`.kfac`) and every score is a contraction

    scores[i, j] = (1/n) sum_modules <Q_i, G_j> = (1/n) sum_modules sum_t s_{j,t}^T Q_i a_{j,t},

so per-token scores (the terms of the inner sum) come at the same cost and sum to the sequence's.
No ``[queries, parameters]`` or ``[train, parameters]`` tensor exists: ``Q_i`` is kept per module
(optionally as a rank-``r`` product, ``query_rank``), training gradients only per batch and module.

The loss is an :class:`~soulkit.influence.OutputLoss`: ``output_fn(model, batch)`` returns logits
(classes on the last dimension) and ``loss_on_output(logits, batch)`` the per-sequence losses ``[B]``;
the training objective is their mean plus ``(l2/2) ||theta||^2``, as everywhere in soulkit, so
``scores[i, j] ~ loss_i(theta without j) - loss_i(theta)``.

The Fisher behind the curvature (``fisher="true"``, the default) backpropagates *pseudo-gradients*
``r~`` at the logits whose covariance is the loss's output Hessian: for ``likelihood="categorical"``
labels drawn from the model's softmax (the sampler of Sophia's GNB), ``r~_t = sqrt(w_t) (p_t - e_y~)``,
where ``w_t`` is the token's weight in the sequence loss (recovered from the loss's own gradient, so
sums, means and masked prompts all work); for ``likelihood="gaussian"`` (squared error)
``r~ = sqrt(w) * N(0, 1)``. In expectation this is exactly the Gauss-Newton matrix.
``fisher="empirical"`` uses the training labels' gradients instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..optim.estimators import derive_seed, sample_from_logits
from ._data import Batch, DataSource
from .gradients import OutputLoss, _categorical_weights
from .kfac import (
    FACTOR_METHODS,
    CovarianceAccumulator,
    KFACFactors,
    ModuleFactors,
    add_correction,
    correction_sums,
    default_damping,
    low_rank,
    with_corrections,
)
from .modules import ModuleCapture, TrackedModule, per_example_gradients, tracked_modules
from .optimizer_state import optimizer_state_diagonal
from .store import (
    CheckpointClock,
    InfluenceStore,
    Sharding,
    data_fingerprint,
    model_fingerprint,
    tensors_digest,
)

__all__ = ["FACTORED_METHODS", "FISHERS", "LIKELIHOODS", "FactoredInfluence"]

FACTORED_METHODS = ("kfac", "ekfac", "identity", "optimizer_state")
FISHERS = ("true", "empirical")
LIKELIHOODS = ("categorical", "gaussian")


def _attention_mask(batch: Batch) -> Tensor | None:
    if isinstance(batch, Mapping):
        m = batch.get("attention_mask")
        return m if isinstance(m, Tensor) and m.dim() == 2 else None
    return None


class FactoredInfluence:
    """K-FAC / EK-FAC / gradient-dot-product influence over tracked linear modules (see the module docstring).

    Args:
        model: a trained ``nn.Module`` (never modified; put it in eval mode). Its weights may be bf16.
        loss: an :class:`OutputLoss` (``output_fn`` -> logits, ``loss_on_output`` -> ``[B]``).
        method: ``"kfac"``, ``"ekfac"``, ``"identity"`` (gradient dot products, no curvature) or
            ``"optimizer_state"`` (each query gradient divided by the training optimizer's diagonal
            curvature ``c + l2 + damping``, :mod:`.optimizer_state`; no fitting pass).
        modules: names or types of the modules to track (default: every ``nn.Linear``/``Conv1D``
            except the LM head and embedding-tied weights).
        l2, damping: ``(F + (l2 + damping) I)`` is inverted. When both are 0, each module gets
            :data:`~soulkit.influence.kfac.DEFAULT_RELATIVE_DAMPING` times its mean eigenvalue.
        fisher: ``"true"`` (pseudo-gradients sampled from the model) or ``"empirical"``.
        likelihood: ``"categorical"`` (softmax over the last dimension) or ``"gaussian"``.
        fisher_samples: pseudo-gradient draws per sequence (each one extra backward, no forward).
        query_rank: keep each preconditioned query gradient as a rank-``r`` product (``None``: exact).
        projection: LoGra-style gradient projection (Choe et al. 2024): each module's inputs ``a`` and output
            gradients ``s`` are multiplied by fixed Gaussian matrices ``P_in [k, in]``, ``P_out [k, out]``
            (entries ``N(0, 1/k)``, seeded by ``seed`` and the module's position; a side of ``k`` or fewer
            features is left as it is), so a gradient ``G = sum_t s_t a_t^T`` becomes ``P_out G P_in^T``
            ``[k, k]`` and the curvature, query and training gradients all live in that space. Inner
            products are kept in expectation (Johnson-Lindenstrauss). This is what makes
            :meth:`train_statistics` small enough to keep: ``k * k`` numbers per module and example.
        batch_size: batch size when a ``Dataset`` is given.
        seed: seeds the label draws (``derive_seed(seed, pass, batch, draw)``).
        progress: tqdm bars (``None``: only on a terminal).
        optimizer_state, optimizer_state_rule, optimizer_params, optimizer_state_bias_correction:
            ``method="optimizer_state"``: the optimizer's ``state_dict`` (or a ``torch.save`` file of one)
            and how to read it (:func:`~soulkit.influence.optimizer_state.optimizer_state_diagonal`).
            Every parameter of the tracked modules needs state.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: OutputLoss,
        *,
        method: str = "ekfac",
        modules: Any = None,
        l2: float = 0.0,
        damping: float = 0.0,
        fisher: str = "true",
        likelihood: str = "categorical",
        fisher_samples: int = 1,
        query_rank: int | None = None,
        projection: int | None = None,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool | None = None,
        optimizer_state: Any = None,
        optimizer_state_rule: str = "auto",
        optimizer_params: Any = None,
        optimizer_state_bias_correction: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(loss, OutputLoss):
            raise TypeError(
                "the factored route needs loss to be an OutputLoss(logits_fn, loss_on_logits): the Fisher is "
                "sampled at the logits"
            )
        if method not in FACTORED_METHODS:
            raise ValueError(f"method must be one of {FACTORED_METHODS}, got {method!r}")
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        for name, v, low in (("fisher_samples", fisher_samples, 1), ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if query_rank is not None and (isinstance(query_rank, bool) or not isinstance(query_rank, int)
                                       or query_rank < 1):
            raise ValueError(f"query_rank must be an integer >= 1 or None, got {query_rank!r}")
        if projection is not None and (isinstance(projection, bool) or not isinstance(projection, int)
                                       or projection < 1):
            raise ValueError(f"projection must be an integer >= 1 or None, got {projection!r}")
        if projection is not None and method == "optimizer_state":
            raise ValueError("method='optimizer_state' preconditions each parameter by its own curvature, which has "
                             "no projected counterpart: leave projection=None")
        for name, v in (("l2", l2), ("damping", damping)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.model, self.loss = model, loss
        self.method, self.fisher, self.likelihood = method, fisher, likelihood
        self.fisher_samples, self.query_rank = fisher_samples, query_rank
        self.l2, self.damping = float(l2), float(damping)
        self.batch_size, self.seed, self.progress = batch_size, int(seed), progress
        self.tracked: list[TrackedModule] = tracked_modules(model, modules)
        self._device = next(model.parameters()).device
        self.projection = projection
        self._projections = self._make_projections(projection) if projection is not None else {}
        self.statistics: dict[str, Tensor] | None = None  # train_statistics(): projected training gradients
        self.factors: KFACFactors | None = None
        self._fingerprint: tuple[Any, dict[str, Any]] | None = None
        self.n_train: int | None = None
        self._train_obj: Any = None
        self._device = next(model.parameters()).device
        self.diagonal: dict[str, Tensor] | None = None
        if method == "optimizer_state":
            self.diagonal = self._optimizer_state_diagonal(
                optimizer_state, optimizer_state_rule, optimizer_params, optimizer_state_bias_correction
            )
        elif optimizer_state is not None:
            raise ValueError(f"optimizer_state is used only by method='optimizer_state' (method is {method!r})")

    def _optimizer_state_diagonal(self, state: Any, rule: str, order: Any, bias_correction: bool) -> dict[str, Tensor]:
        """Per tracked module, ``c + l2 + damping`` laid out like its gradient matrix ``[out, in (+1)]``."""
        if state is None:
            raise ValueError("method='optimizer_state' needs optimizer_state=<an optimizer state_dict or file>")
        names = {id(p): k for k, p in self.model.named_parameters()}
        wanted = {}
        for tm in self.tracked:
            wanted[tm.name] = (names[id(tm.module.weight)], names[id(tm.module.bias)] if tm.has_bias else None)
        flat = [k for pair in wanted.values() for k in pair if k is not None]
        c, self.optimizer_state_info = optimizer_state_diagonal(
            state, self.model, flat, optimizer_params=order, rule=rule, bias_correction=bias_correction
        )
        shift = self.l2 + self.damping
        out = {}
        for tm in self.tracked:
            w, b = wanted[tm.name]
            cw = c[w].t() if tm.transposed else c[w]
            d = torch.cat([cw, c[b].unsqueeze(1)], dim=1) if b is not None else cw
            d = d + shift
            if not bool((d > 0).all()):
                bad = int((d <= 0).sum())
                raise ValueError(
                    f"optimizer_state: module {tm.name!r} has {bad} zero curvature entries and l2 + damping = "
                    f"{shift:g}; set damping > 0 or raise l2"
                )
            out[tm.name] = d.to(self._device)
        return out

    # ---- plumbing ---------------------------------------------------------------------------

    @property
    def dims(self) -> dict[str, tuple[int, int]]:
        """Per module, ``(out, in)`` of its gradients as the curvature sees them (projected with ``projection``)."""
        out = {}
        for tm in self.tracked:
            p_in, p_out = self._projections.get(tm.name, (None, None))
            out[tm.name] = (tm.out_features if p_out is None else p_out.shape[0],
                            tm.in_dim if p_in is None else p_in.shape[0])
        return out

    def _make_projections(self, k: int) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """Per module ``(P_in, P_out)``, ``None`` for a side of ``k`` or fewer features (kept exact)."""
        out = {}
        for i, tm in enumerate(self.tracked):
            sides = []
            for side, d in enumerate((tm.in_dim, tm.out_features)):
                if d <= k:
                    sides.append(None)
                    continue
                gen = torch.Generator().manual_seed(derive_seed(self.seed, 3, i, side))
                P = torch.randn(k, d, generator=gen, dtype=torch.float64) / math.sqrt(k)
                sides.append(P.to(device=self._device, dtype=torch.float32))  # the dtype ModuleCapture keeps
            out[tm.name] = (sides[0], sides[1])
        return out

    def _project(self, tensors: Mapping[str, Tensor], side: int) -> dict[str, Tensor]:
        """``a`` (``side=0``) or ``s`` (``side=1``) of each module, ``[b, T, d] -> [b, T, k]`` when projected."""
        if not self._projections:
            return dict(tensors)
        out = {}
        for name, t in tensors.items():
            P = self._projections[name][side]
            out[name] = t if P is None else t.to(P.dtype) @ P.T
        return out

    def _inputs(self, cap: ModuleCapture) -> dict[str, Tensor]:
        return self._project(cap.inputs(), 0)

    def _output_grads(self, cap: ModuleCapture, logits: Tensor, r: Tensor, **kw: Any) -> dict[str, Tensor]:
        return self._project(cap.output_grads(logits, r, **kw), 1)

    def _source(self, data: Any, name: str) -> DataSource:
        return DataSource(data, name=name, batch_size=self.batch_size, dtype=None, device=self._device,
                          cache_bytes=0)

    def _bar(self, desc: str, total: int | None) -> tqdm:
        p = self.progress
        return tqdm(total=total, desc=desc, unit="seq", disable=None if p is None else not p, leave=False)

    def _check_positions(self, batch: Batch, name: str) -> None:
        cfg = getattr(self.model, "config", None)
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if not limit:
            return
        for leaf in pytree.tree_leaves(batch):
            if isinstance(leaf, Tensor) and leaf.dim() == 2 and not leaf.is_floating_point() and leaf.shape[1] > limit:
                raise ValueError(f"{name} holds sequences of {leaf.shape[1]} positions but the model has "
                                 f"{limit} (max_position_embeddings): truncate them")

    def _forward(self, capture: ModuleCapture, batch: Batch, b: int, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """Run the model with hooks; return ``(logits, fp32 logits leaf, r = d sum(losses) / d logits)``.

        For the Gaussian Fisher ``r`` keeps its graph (a function of the leaf) for output-Hessian products.
        """
        self._check_positions(batch, name)
        capture.clear()
        with torch.enable_grad():
            logits = self.loss.output_fn(self.model, batch)
            if not isinstance(logits, Tensor) or not logits.is_floating_point():
                raise TypeError(f"output_fn must return a floating-point tensor of logits, got {type(logits).__name__}")
            if logits.shape[0] != b:
                raise ValueError(f"output_fn returned {logits.shape[0]} rows for a batch of {b} sequences")
            leaf = logits.detach()
            leaf = (leaf if leaf.dtype == torch.float64 else leaf.float()).requires_grad_(True)
            losses = self.loss.loss_on_output(leaf, batch)
            if not isinstance(losses, Tensor) or losses.shape != (b,):
                raise ValueError(
                    f"loss_on_output must return one loss per sequence, shape ({b},), got "
                    f"{getattr(losses, 'shape', type(losses).__name__)}: reduce over tokens, not over the batch"
                )
            if not bool(torch.isfinite(losses).all()):
                raise FloatingPointError(f"{name}: a loss is NaN or Inf")
            create = self.fisher == "true" and self.likelihood == "gaussian"
            (r,) = torch.autograd.grad(losses.sum(), leaf, create_graph=create)
        return logits, leaf, r

    def _pseudo_gradients(self, leaf: Tensor, r: Tensor, generator: torch.Generator) -> Tensor:
        """Output-gradient draws whose covariance is the loss's output Hessian (see the module docstring)."""
        if self.fisher == "empirical":
            return r.detach()
        if self.likelihood == "categorical":
            flat_r = r.reshape(-1, r.shape[-1])
            with torch.no_grad():
                p = torch.softmax(leaf.detach().reshape(-1, r.shape[-1]), dim=-1)
                w = _categorical_weights(flat_r, p)
                y = sample_from_logits(leaf.detach().reshape(-1, r.shape[-1]), generator=generator)
                out = p.clone()
                out.scatter_add_(-1, y.unsqueeze(-1), -torch.ones_like(out[:, :1]))
                out.mul_(w.sqrt().unsqueeze(-1))
            return out.reshape(r.shape)
        # gaussian: w = diag of the output Hessian, from one product with ones (the loss-only graph)
        rg = r
        (lam,) = torch.autograd.grad(rg, leaf, grad_outputs=torch.ones_like(rg), retain_graph=True)
        u = torch.randn(rg.shape, generator=generator, device=rg.device, dtype=rg.dtype)
        (lam_u,) = torch.autograd.grad(rg, leaf, grad_outputs=u, retain_graph=True)
        if not torch.allclose(lam_u, lam * u, rtol=1e-4, atol=1e-8) or bool((lam < 0).any()):
            raise ValueError("likelihood='gaussian' needs a squared-error loss (a constant, diagonal output "
                             "Hessian); this one is not: pass fisher='empirical'")
        eps = torch.randn(rg.shape, generator=generator, device=rg.device, dtype=rg.dtype)
        return (lam.sqrt() * eps).detach()

    def _generator(self, *parts: int) -> torch.Generator:
        gen = torch.Generator(device=self._device)
        gen.manual_seed(derive_seed(self.seed, *parts))
        return gen

    def _passes(self, source: DataSource, desc: str, select: Callable[[int], bool] | None = None,
                ) -> Iterator[tuple[int, int, Batch, int, ModuleCapture]]:
        """``(k, start, batch, b, capture)`` for the batches ``k`` that ``select`` keeps (default all);
        ``start`` is the index of the batch's first example in the whole data set. A skipped batch is
        collated but never run."""
        try:
            total = source._n if source._n is not None else len(source.loader.dataset)
        except TypeError:  # an iterable dataset: no length
            total = None
        start = 0
        with self._bar(desc, total=total if select is None else None) as bar, \
                ModuleCapture(self.tracked) as capture:
            for k, (batch, b) in enumerate(source):
                if select is None or select(k):
                    yield k, start, batch, b, capture
                    capture.clear()
                    bar.update(b)
                start += b

    def _token_mask(self, batch: Batch, a: Tensor) -> Tensor | None:
        mask = _attention_mask(batch)
        if mask is None or mask.shape != a.shape[:2]:
            return None
        return mask.to(device=a.device, dtype=torch.bool)

    # ---- fitting ----------------------------------------------------------------------------

    def factor_fingerprint(self, train: Any, sharding: Sharding | None = None) -> dict[str, Any]:
        """What the factors depend on: digests of the model's weights and of the training batches, and the
        options. Every rank must compute the same (checked under torch.distributed)."""
        if self._fingerprint is not None and self._fingerprint[0] is train:
            return self._fingerprint[1]
        sharding = sharding or Sharding.current()
        digest, n, batches = data_fingerprint(self._source(train, "train").loader)
        model = model_fingerprint(self.model)
        sharding.check_same(digest, "training data")
        sharding.check_same(model, "model weights")
        fp = {"model": model, "train": digest, "n_train": n, "train_batches": batches, "method": self.method,
              "modules": {n_: list(d) for n_, d in self.dims.items()}, "fisher": self.fisher,
              "likelihood": self.likelihood, "fisher_samples": self.fisher_samples, "seed": self.seed,
              **({"projection": self.projection} if self.projection is not None else {}),
              "optimizer_state": tensors_digest(self.diagonal) if self.diagonal is not None else None}
        self._fingerprint = (train, fp)
        return fp

    def _sharded_pass(self, source: DataSource, phase: str, desc: str, sums: dict[str, Tensor],
                      body: Callable[[int, int, Batch, int, ModuleCapture], None], store: InfluenceStore | None,
                      sharding: Sharding) -> None:
        """Run ``body(k, start, batch, b, capture)`` (which adds into ``sums``) on this rank's batches, from the
        store's partial checkpoint of ``phase`` when there is one, saving one every ``store.checkpoint_seconds``;
        then sum over ranks."""
        begin = 0
        if store is not None and (got := store.load_partial(phase, sharding, self._device)) is not None:
            saved, meta = got
            for key, t in sums.items():
                t.copy_(saved[key])
            begin = int(meta["next_batch"])
        clock = CheckpointClock(store.checkpoint_seconds) if store is not None else None
        select = None if begin == 0 and sharding.world == 1 else (lambda k: k >= begin and sharding.owns(k))
        for k, start, batch, b, cap in self._passes(source, desc, select):
            body(k, start, batch, b, cap)
            if clock is not None and clock.due():
                store.save_partial(phase, sharding, sums, {"next_batch": k + 1})  # type: ignore[union-attr]
        sharding.sum_(sums.values())

    def fit(self, train: Any, *, store: InfluenceStore | str | os.PathLike | None = None) -> FactoredInfluence:
        """Fit the factors on ``train`` (the data the model was trained on): one pass for the covariances
        (K-FAC), a second for EK-FAC's eigenvalues; ``identity`` only counts the examples. The seconds
        each phase took are left in :attr:`fit_seconds`.

        ``store``: an :class:`~soulkit.influence.store.InfluenceStore` (or its directory) that keeps each
        phase's results (and partial sums of an unfinished pass) so that a rerun resumes; one made for
        another model, data set or options is refused. Under torch.distributed each rank takes its share
        of the batches and the sums are all-reduced (:mod:`.store`)."""
        self.factors, self._train_obj, self._fingerprint, self.statistics = None, None, None, None
        self.fit_seconds: dict[str, float] = {}
        sharding = Sharding.current()
        st = InfluenceStore.of(store)
        source = self._source(train, "train")
        if st is not None:
            st.claim("factors", self.factor_fingerprint(train, sharding), sharding)
        if self.method in ("identity", "optimizer_state"):
            self.n_train = source.n
            self._train_obj = train
            return self
        t0 = time.perf_counter()
        acc = CovarianceAccumulator(self.dims, self._device)
        if st is not None and st.has("covariances"):
            saved, meta = st.load_phase("covariances", self._device)
            for name in self.dims:
                acc.a[name].copy_(saved[f"{name}/a"])
                acc.s[name].copy_(saved[f"{name}/s"])
            acc.tokens, acc.sequences = int(meta["tokens"]), int(meta["sequences"])
        else:
            counts = torch.zeros(2, dtype=torch.int64, device=self._device)  # tokens, sequences
            sums = {**{f"{n}/a": t for n, t in acc.a.items()}, **{f"{n}/s": t for n, t in acc.s.items()},
                    "counts": counts}

            def covariances(k: int, start: int, batch: Batch, b: int, cap: ModuleCapture) -> None:
                logits, leaf, r = self._forward(cap, batch, b, "train")
                inputs = self._inputs(cap)
                for name, a in inputs.items():
                    acc.add_inputs(name, a, self._token_mask(batch, a))
                first = next(iter(inputs.values()))
                m = self._token_mask(batch, first)
                counts[0] += int(m.sum()) if m is not None else first.shape[0] * first.shape[1]
                counts[1] += b
                for draw in range(self.fisher_samples):
                    rt = self._pseudo_gradients(leaf, r, self._generator(1, k, draw))
                    s = self._output_grads(cap, logits, rt.to(logits.dtype),
                                           retain_graph=draw < self.fisher_samples - 1)
                    for name, sm in s.items():
                        acc.add_output_grads(name, sm, 1.0 / self.fisher_samples)

            self._sharded_pass(source, "covariances", "K-FAC covariances", sums, covariances, st, sharding)
            acc.tokens, acc.sequences = int(counts[0]), int(counts[1])
            if st is not None:
                st.save_phase("covariances", {k: v for k, v in sums.items() if k != "counts"},
                              {"tokens": acc.tokens, "sequences": acc.sequences}, sharding)
        self.fit_seconds["covariances"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if st is not None and st.has("eigendecompositions"):
            factors = KFACFactors.from_tensors(st.load_phase("eigendecompositions", self._device)[0], self.dims,
                                               "kfac", source=str(st.directory)).modules
        else:
            factors = acc.factors()
            if st is not None:
                st.save_phase("eigendecompositions", KFACFactors(factors, "kfac").tensors(), None, sharding)
        self.fit_seconds["eigendecompositions"] = time.perf_counter() - t0
        n = acc.sequences
        t0 = time.perf_counter()
        if self.method == "ekfac":
            if st is not None and st.has("eigenvalue_corrections"):
                saved, _ = st.load_phase("eigenvalue_corrections", self._device)
                factors = {name: dataclasses.replace(f, corrected=saved[f"{name}/corrected"])
                           for name, f in factors.items()}
            else:
                sums = correction_sums(self.dims, self._device)

                def corrections(k: int, start: int, batch: Batch, b: int, cap: ModuleCapture) -> None:
                    logits, leaf, r = self._forward(cap, batch, b, "train")
                    a = self._inputs(cap)
                    for draw in range(self.fisher_samples):
                        rt = self._pseudo_gradients(leaf, r, self._generator(2, k, draw))
                        s = self._output_grads(cap, logits, rt.to(logits.dtype),
                                               retain_graph=draw < self.fisher_samples - 1)
                        for name in a:
                            add_correction(sums[name], factors[name], a[name], s[name], 1.0 / self.fisher_samples)

                self._sharded_pass(source, "eigenvalue_corrections", "EK-FAC eigenvalues", sums, corrections, st,
                                   sharding)
                factors = with_corrections(factors, sums, n)
                if st is not None:
                    st.save_phase("eigenvalue_corrections", {f"{name}/corrected": f.corrected
                                                             for name, f in factors.items()}, None, sharding)
            self.fit_seconds["ekfac-eigenvalues"] = time.perf_counter() - t0
        self.factors = KFACFactors(factors, self.method, {
            "sequences": n, "tokens": acc.tokens, "fisher": self.fisher, "likelihood": self.likelihood,
            "fisher_samples": self.fisher_samples, "fit_seconds": dict(self.fit_seconds),
            **({"projection": self.projection, "seed": self.seed} if self.projection is not None else {}),
        })
        self.n_train, self._train_obj = n, train
        return self

    def train_statistics(self, train: Any, *, store: InfluenceStore | str | os.PathLike | None = None
                         ) -> dict[str, Tensor]:
        """Compute and keep every training example's projected gradient per module, ``[n, k_out, k_in]``
        (``projection`` must be set), so that :meth:`scores` needs no pass over the training set: scoring a
        new set of queries then costs its query gradients and one product per module (LoGra's stored
        statistics). ``store``: kept there as ``train_gradients.safetensors`` (resumable, sharded like the
        factor passes), and read back by a later ``scores(..., store=)``. Call after :meth:`fit`."""
        if self.n_train is None:
            raise RuntimeError("call fit(train) before train_statistics(train)")
        if self.projection is None:
            raise ValueError("train_statistics keeps one gradient per training example and module: set projection=k "
                             "(k x k numbers per module and example) so that they fit")
        sharding = Sharding.current()
        st = InfluenceStore.of(store)
        if st is not None:
            st.claim("factors", self.factor_fingerprint(train, sharding), sharding)
            if st.has("train_gradients"):
                self.statistics = st.load_phase("train_gradients", self._device)[0]
                return self.statistics
        n = self.n_train
        dtype = torch.float32  # what ModuleCapture keeps
        sums = {name: torch.zeros(n, o, i, dtype=dtype, device=self._device) for name, (o, i) in self.dims.items()}

        def gradients(k: int, start: int, batch: Batch, b: int, cap: ModuleCapture) -> None:
            if start + b > n:
                raise ValueError(f"train has more than the {n} sequences the analyzer was fitted on: pass the "
                                 "training set given to fit")
            a, s = self._batch_gradients(cap, batch, b, "train")
            for name, t in sums.items():
                t[start:start + b] = per_example_gradients(a[name], s[name]).to(dtype)

        self._sharded_pass(self._source(train, "train"), "train_gradients", "training gradients (projected)", sums,
                           gradients, st, sharding)
        if st is not None:
            st.save_phase("train_gradients", sums, {"n_train": n}, sharding)
        self.statistics = sums
        return sums

    def save_factors(self, directory: Any) -> None:
        """Write the fitted factors (:meth:`KFACFactors.save`)."""
        if self.factors is None:
            raise RuntimeError("nothing to save: fit(train) with solver 'kfac' or 'ekfac' first")
        self.factors.save(directory)

    def load_factors(self, directory: Any, train: Any) -> FactoredInfluence:
        """Use factors saved by :meth:`save_factors` (checked against the tracked modules) for ``train``."""
        if self.method == "optimizer_state":
            raise RuntimeError("method='optimizer_state' has no factors to load: its curvature is the optimizer state")
        factors = KFACFactors.load(directory, device=self._device)
        factors.check_matches(self.dims)
        saved = (factors.meta.get("projection"), factors.meta.get("seed") if factors.meta.get("projection") else None)
        if saved != (self.projection, self.seed if self.projection is not None else None):
            raise ValueError(f"these factors were fitted with projection={saved[0]} (seed {saved[1]}) but this analyzer "
                             f"has projection={self.projection} (seed {self.seed}): the projected spaces differ")
        if self.method == "ekfac" and factors.method != "ekfac":
            raise ValueError("these factors were fitted with 'kfac'; EK-FAC needs its eigenvalue pass: refit")
        n = int(factors.meta.get("sequences", 0))
        source = self._source(train, "train")
        if source.n != n:
            raise ValueError(f"the factors were fitted on {n} sequences but train has {source.n}")
        self.factors, self.n_train, self._train_obj, self.statistics = factors, n, train, None
        return self

    # ---- scoring ----------------------------------------------------------------------------

    def _damping(self, f: ModuleFactors) -> float:
        lam = self.l2 + self.damping
        return lam if lam > 0 else default_damping(f, self.method)

    def _batch_gradients(self, cap: ModuleCapture, batch: Batch, b: int, name: str
                         ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        logits, _, r = self._forward(cap, batch, b, name)
        s = self._output_grads(cap, logits, r.detach().to(logits.dtype))
        return self._inputs(cap), s

    def query_gradients(self, queries: Any) -> dict[str, Tensor | tuple[Tensor, Tensor]]:
        """Per module, the preconditioned query gradients ``Q`` ``[m, out, in]`` (or ``(U, V)`` with
        ``query_rank``)."""
        if self.n_train is None:
            raise RuntimeError("call fit(train) before scoring")
        parts: dict[str, list[Tensor]] = {tm.name: [] for tm in self.tracked}
        source = self._source(queries, "queries")
        for _, _, batch, b, cap in self._passes(source, "query gradients"):
            a, s = self._batch_gradients(cap, batch, b, "queries")
            for name in parts:
                G = per_example_gradients(a[name], s[name])
                if self.factors is not None:
                    f = self.factors.modules[name]
                    G = f.precondition(G, self.method, self._damping(f))
                elif self.diagonal is not None:
                    G = G / self.diagonal[name].to(G.dtype)
                parts[name].append(G)
        out: dict[str, Any] = {}
        for name, gs in parts.items():
            Q = torch.cat(gs)
            out[name] = low_rank(Q, self.query_rank) if self.query_rank is not None else Q
        return out

    def score_fingerprint(self, train: Any, queries: Any, per_token: bool, store: InfluenceStore,
                          sharding: Sharding) -> dict[str, Any]:
        """What the scores depend on besides the factors' inputs: the fitted curvature's own bytes, the query
        batches and the scoring options."""
        digest, m, _ = data_fingerprint(self._source(queries, "queries").loader)
        sharding.check_same(digest, "queries")
        curvature = (self.factors.tensors() if self.factors is not None
                     else self.diagonal if self.diagonal is not None else {})
        return {"factors": tensors_digest(curvature), "queries": digest, "n_queries": m, "per_token": per_token,
                "l2": self.l2, "damping": self.damping, "query_rank": self.query_rank,
                "chunk_batches": store.chunk_batches}

    def scores(self, train: Any, queries: Any, *, per_token: bool = False,
               store: InfluenceStore | str | os.PathLike | None = None) -> Tensor:
        """``[m, n]`` scores (``per_token=True``: ``[m, n, T]``, one per training position, 0 on padding,
        summing over ``T`` to the sequence's score), in loss units.

        ``store``: training batches are scored in chunks of ``store.chunk_batches``, each written to the
        store as it is done; a rerun scores only the missing chunks, and once all exist they are joined into
        ``scores.safetensors`` (which a later call just reads). Under torch.distributed each rank scores its
        share of the chunks, rank 0 joins them, and every rank returns the whole tensor: the ranks need a
        store on a file system they all see."""
        if self.n_train is None:
            raise RuntimeError("call fit(train) before scoring")
        sharding = Sharding.current()
        st = InfluenceStore.of(store)
        if st is None and sharding.world > 1:
            raise ValueError("under torch.distributed the ranks join their scores through a store: pass "
                             "store=<a directory every rank sees>")
        n = self.n_train
        done: set[int] = set()
        if st is not None:
            st.claim("factors", self.factor_fingerprint(train, sharding), sharding)
            if self.statistics is None and not per_token and st.has("train_gradients"):
                self.statistics = st.load_phase("train_gradients", self._device)[0]
        if self.statistics is not None and not per_token:
            if train is not self._train_obj and (data_fingerprint(self._source(train, "train").loader)[0]
                                                 != data_fingerprint(self._source(self._train_obj, "train").loader)[0]):
                raise ValueError("train differs from the training set the kept training gradients were computed on: "
                                 "pass the training set given to fit and train_statistics")
            return self._scores_from_statistics(queries)
        if st is not None:
            st.claim("scores", self.score_fingerprint(train, queries, per_token, st, sharding), sharding)
            if st.has_scores():
                return st.load_scores(self._device)["per_token" if per_token else "scores"]
            done = st.chunks_done()
        Q = self.query_gradients(queries)
        m = next(iter(Q.values()))[0].shape[0] if self.query_rank else next(iter(Q.values())).shape[0]
        cb = st.chunk_batches if st is not None else None
        select = None if cb is None else (lambda k: sharding.owns(k // cb) and k // cb not in done)
        rows: list[Tensor] = []  # [m, b, T or 1] per batch of the current chunk (or of everything)
        chunk, chunk_start, seen = None, 0, 0

        def flush() -> None:
            if st is not None and rows:
                joined = _join(rows, per_token)
                st.save_chunk(chunk, chunk_start, {"scores": joined.sum(-1), "per_token": joined}
                              if per_token else {"scores": joined})
                rows.clear()

        source = self._source(train, "train")
        for k, start, batch, b, cap in self._passes(source, "scores (train)", select):
            if cb is not None and k // cb != chunk:
                flush()
                chunk, chunk_start = k // cb, start
            a, s = self._batch_gradients(cap, batch, b, "train")
            rows.append(self._score_block(Q, a, s, m, b, per_token) / n)
            seen = start + b
        if st is None:
            if seen != n:
                raise ValueError(f"train has {seen} sequences but the analyzer was fitted on {n}: pass the training "
                                 "set given to fit")
            return _join(rows, per_token)
        flush()
        st.assemble_scores(n, sharding)
        return st.load_scores(self._device)["per_token" if per_token else "scores"]

    def _scores_from_statistics(self, queries: Any) -> Tensor:
        """``[m, n]`` scores against the kept training gradients (:meth:`train_statistics`): no training pass.
        They are not written to a store: one product per module is cheaper than reading them back."""
        assert self.statistics is not None and self.n_train is not None
        Q = self.query_gradients(queries)
        out = None
        for name, q in Q.items():
            G = self.statistics[name]
            if self.query_rank is not None:
                U, V = q
                part = torch.einsum("mor,mir,noi->mn", U, V.to(U.dtype), G.to(U.dtype))
            else:
                part = q.reshape(q.shape[0], -1) @ G.reshape(G.shape[0], -1).T.to(q.dtype)
            out = part if out is None else out + part
        assert out is not None
        return (out / self.n_train).float()  # the dtype of the training-pass route

    def _score_block(self, Q: Mapping[str, Any], a: Mapping[str, Tensor], s: Mapping[str, Tensor], m: int, b: int,
                     per_token: bool) -> Tensor:
        """``[m, b, T]`` (``per_token``) or ``[m, b, 1]``: sum over modules of ``<Q_i, G_j>`` for one batch."""
        T = next(iter(a.values())).shape[1]
        block = torch.zeros(m, b, T if per_token else 1, dtype=torch.float32, device=self._device)
        for name, q in Q.items():
            am, sm = a[name], s[name]
            if am.shape[1] != T:
                raise ValueError(f"module {name!r} sees {am.shape[1]} positions where others see {T}: "
                                 "per-token scores need modules that run once per position")
            if self.query_rank is not None:
                U, V = q
                contrib = (torch.einsum("bto,mor->mbtr", sm, U) * torch.einsum("bti,mir->mbtr", am, V)).sum(-1)
                if not per_token:
                    contrib = contrib.sum(-1, keepdim=True)
            elif per_token:
                contrib = torch.einsum("bto,moi,bti->mbt", sm, q, am)
            else:  # <Q_i, G_j> as one [m, out*in] x [out*in, b] product (einsum is several times slower here)
                G = per_example_gradients(am, sm)
                contrib = (q.reshape(m, -1) @ G.reshape(b, -1).T.to(q.dtype)).unsqueeze(-1)
            block += contrib
        return block


def _join(rows: list[Tensor], per_token: bool) -> Tensor:
    """Batches' score blocks ``[m, b, T]`` side by side: ``[m, n]``, or ``[m, n, max T]`` zero-padded."""
    if not per_token:
        return torch.cat([r.squeeze(-1) for r in rows], dim=1)
    width = max(r.shape[-1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows], dim=1)


def factored_method(solver: Any, modules: Any) -> str | None:
    """The factored method an analyzer's options ask for, or ``None`` for the per-example (vmap) route."""
    if isinstance(solver, str) and (
        solver in FACTOR_METHODS or (solver in ("identity", "optimizer_state") and modules is not None)
    ):
        return solver
    return None
