"""Sophia: a clipped, diagonal-Hessian-preconditioned optimizer (Liu et al., ICLR 2024).

A drop-in replacement for ``torch.optim.AdamW``. Per element::

    theta <- theta * (1 - lr * weight_decay)
    m     <- beta1 * m + (1 - beta1) * g
    h     <- beta2 * h + (1 - beta2) * h_hat           # on a Hessian refresh, every k steps
    theta <- theta - lr * sign(m) * min(|m| / max(rho * h, eps), 1)

``h_hat`` is an estimate of the Hessian diagonal:

* Gauss-Newton-Bartlett (GNB, default): labels are sampled from the model's own softmax and
  ``h_hat = B * g_s * g_s``, with ``g_s`` the gradient of the mean sampled-label loss over its B
  terms (tokens). :meth:`Sophia.accumulate_gnb` builds it from the logits of the training forward
  pass (one extra backward, no extra forward) and works with gradient accumulation.
* Hutchinson: ``h_hat = u * (H u)`` with Rademacher ``u`` (:meth:`Sophia.accumulate_hutchinson`).
* Anything else: pass a list of tensors to :meth:`Sophia.update_hessian`.

Typical loop (the two refresh lines are marked)::

    opt = Sophia(model.parameters(), lr=3e-4, rho=0.04, weight_decay=0.1)
    for x, y in loader:
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if opt.hessian_due():                               # (1)
            opt.accumulate_gnb(logits, labels=y)            # (2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # does not touch the estimate
        opt.step()
        opt.zero_grad()

Scripts written for the paper's code port by changing the import: after a backward of the
sampled-label loss, ``opt.update_hessian()`` uses the current ``.grad`` as ``g_s``; B is given once
(``hessian_batch_size=`` at construction, or ``update_hessian(batch_size=...)``), never to ``step``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from ..kernels import sophia_step
from ..kernels.dispatch import implementation_from_flags
from ..kernels.finite import all_finite
from ..kernels.sophia import fold_hessian_ema
from .attention import differentiable_attention
from .estimators import LABEL_STREAM, hutchinson, rademacher_like, sampled_label_grads, seeded_generator

__all__ = ["Sophia", "sophia"]

_NONFINITE_CHOICES = ("skip", "raise", "ignore")
_STATE_KEYS = ("exp_avg", "hessian", "gnb_sum", "hutchinson_sum")


def _check_hyper(lr: float, betas: tuple[float, float], rho: float, weight_decay: float, eps: float) -> None:
    if not isinstance(lr, (float, int)) or not lr >= 0.0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
    if not float(rho) > 0.0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    if not float(weight_decay) >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


class Sophia(Optimizer):
    """Sophia with GNB / Hutchinson / user-supplied Hessian-diagonal estimates.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate; the largest per-coordinate step is ``lr`` (clipping).
        betas: ``(beta1, beta2)``: EMA of gradients, EMA of Hessian estimates.
        rho: clipping scale; tune it so that :meth:`win_rate` stays around 0.1-0.5.
        weight_decay: decoupled weight decay (as AdamW).
        eps: floor of the denominator ``rho * h``.
        maximize: maximise the objective instead of minimising it.
        bias_correction: divide ``m`` by ``1 - beta1**t`` (off in the paper).
        hessian_bias_correction: divide ``h`` by ``1 - beta2**n`` after n refreshes (off in the
            paper). ``h`` starts at 0, so without it the first refreshes leave ``h`` ~(1 - beta2) * n
            times too small and nearly every coordinate is clipped (win rate ~0) in short runs.
            Applied as ``rho / (1 - beta2**n)`` in the update (no extra pass). Off by default to keep the
            paper's update; for short runs ``True`` with rho ~0.5 is the setting the benchmarks support
            (README, "Sophia as a drop-in optimizer").
        hessian_update_interval: k; :meth:`hessian_due` is true every k steps (the first included).
        hessian_batch_size: B for :meth:`update_hessian` without an estimate (paper-style usage).
            :meth:`accumulate_gnb` counts B itself and ignores this.
        nonfinite: what a non-finite gradient does to :meth:`step`: ``"skip"`` (default: the step
            is skipped, state untouched, :attr:`skipped_steps` counts it; costs one host sync per
            step), ``"raise"`` (``FloatingPointError``, state untouched) or ``"ignore"`` (no check,
            no sync). A non-finite Hessian estimate is dropped and counted in
            :attr:`skipped_hessian_updates` under ``"skip"``/``"ignore"``, and raises under ``"raise"``.
        state_dtype: dtype of ``m`` and ``h``. Default: float32 for bf16/fp16 parameters, the
            parameter's dtype otherwise. ``torch.bfloat16`` halves state memory.
        foreach: ``False`` selects the plain per-tensor reference (for debugging), ``True`` the
            foreach path; ``None`` (default) the fastest path (:mod:`soulkit.kernels.dispatch`:
            Triton on CUDA, the compiled step for large groups on the CPU, foreach otherwise).
        fused: ``True`` requires the fused Triton kernel (one launch per dtype bucket of a group;
            CUDA, or the CPU under ``TRITON_INTERPRET=1``); ``None`` (default) uses it on CUDA when
            triton is installed.
        track_win_rate: count unclipped coordinates on the device (no host sync) on the first step
            and on each step that follows a Hessian refresh, so the extra reduction is paid once
            every k steps; :meth:`win_rate` reports the latest count.
        seed: seeds the label sampling of :meth:`accumulate_gnb` and the Rademacher vectors of
            :meth:`accumulate_hutchinson` (:func:`soulkit.optim.estimators.derive_seed` of the seed,
            the parameter's index, the step and the draw), so a resumed run draws the same numbers.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        *,
        eps: float = 1e-15,
        maximize: bool = False,
        bias_correction: bool = False,
        hessian_bias_correction: bool = False,
        hessian_update_interval: int = 10,
        hessian_batch_size: int | None = None,
        nonfinite: str = "skip",
        state_dtype: torch.dtype | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        track_win_rate: bool = True,
        seed: int = 0,
    ) -> None:
        _check_hyper(lr, betas, rho, weight_decay, eps)
        if not isinstance(hessian_update_interval, int) or hessian_update_interval < 1:
            raise ValueError(f"hessian_update_interval must be an int >= 1, got {hessian_update_interval!r}")
        if hessian_batch_size is not None and (not isinstance(hessian_batch_size, int) or hessian_batch_size < 1):
            raise ValueError(f"hessian_batch_size must be a positive int or None, got {hessian_batch_size!r}")
        if nonfinite not in _NONFINITE_CHOICES:
            raise ValueError(f"nonfinite must be one of {_NONFINITE_CHOICES}, got {nonfinite!r}")
        if state_dtype is not None and state_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"state_dtype must be a floating dtype or None, got {state_dtype!r}")
        if fused and foreach is False:
            raise ValueError("fused=True and foreach=False contradict each other: pick one")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            rho=rho,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            bias_correction=bias_correction,
            hessian_bias_correction=hessian_bias_correction,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyper(group["lr"], group["betas"], group["rho"], group["weight_decay"], group["eps"])
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError("Sophia does not support complex parameters; view them as real (torch.view_as_real)")
                if not p.is_floating_point():
                    raise TypeError(f"Sophia needs floating-point parameters, got {p.dtype}")
        self.hessian_update_interval = hessian_update_interval
        self.hessian_batch_size = hessian_batch_size
        self.nonfinite = nonfinite
        self.state_dtype = state_dtype
        self.track_win_rate = track_win_rate
        self.seed = int(seed)
        self.num_steps = 0
        self.num_hessian_updates = 0
        self.skipped_steps = 0
        self.skipped_hessian_updates = 0
        self._pending_terms = 0  # GNB terms accumulated since the last fold
        self._pending_hutchinson = 0  # Hutchinson samples accumulated since the last fold
        self._win_counts: list[torch.Tensor | None] = [None] * len(self.param_groups)
        self._win_totals: list[int] = [0] * len(self.param_groups)
        self._refreshed = False  # a Hessian estimate was folded since the last step

    # ------------------------------------------------------------------ helpers
    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _state_dtype_for(self, p: torch.Tensor) -> torch.dtype:
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "exp_avg" not in state:
            dt = self._state_dtype_for(p)
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _rank() -> int:
        """Part of the label-sampling seed, so that data-parallel ranks draw independent labels."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    def _label_generator(self, device: torch.device) -> torch.Generator:
        """The generator of the next :meth:`accumulate_gnb` draw (the terms so far number the draw)."""
        return seeded_generator(device, self.seed, LABEL_STREAM, self._rank(), self.num_steps, self._pending_terms)

    @staticmethod
    def _check_grad(p: torch.Tensor, g: torch.Tensor, where: str) -> None:
        if g.is_sparse:
            raise RuntimeError(f"Sophia does not support sparse gradients ({where}); use a dense embedding")
        if g.is_complex():
            raise RuntimeError(f"Sophia does not support complex gradients ({where})")
        if g.shape != p.shape:
            raise ValueError(f"{where} has shape {tuple(g.shape)} but its parameter has {tuple(p.shape)}")

    # ------------------------------------------------------------------ Hessian refresh
    def hessian_due(self) -> bool:
        """True when the next :meth:`step` is a refresh step (every ``hessian_update_interval`` steps,
        starting with the first). Call the estimator only then: a refresh costs one extra backward."""
        return self.num_steps % self.hessian_update_interval == 0

    @torch.no_grad()
    def update_hessian(
        self, estimate: Sequence[torch.Tensor | None] | None = None, *, batch_size: int | None = None
    ) -> bool:
        """Fold a Hessian-diagonal estimate into the EMA ``h <- beta2 h + (1 - beta2) h_hat`` now.

        Args:
            estimate: one tensor (or ``None`` to leave that ``h`` alone) per parameter, in the order
                of the optimizer's parameters over all groups. ``None``: use the current ``.grad`` as
                ``g_s`` of the GNB estimator, ``h_hat = B * grad**2`` (after a backward of the
                sampled-label loss, as in the paper's code); parameters without ``.grad`` keep their h.
            batch_size: B for the ``.grad`` form; defaults to ``hessian_batch_size`` of the constructor.

        Returns ``True`` if folded, ``False`` if a non-finite estimate was dropped.
        """
        params = self._all_params()
        if estimate is None:
            bs = batch_size if batch_size is not None else self.hessian_batch_size
            if bs is None:
                raise ValueError(
                    "update_hessian() without an estimate needs B, the number of terms of the sampled-label "
                    "loss: pass Sophia(..., hessian_batch_size=B) once or update_hessian(batch_size=B)"
                )
            if not isinstance(bs, int) or bs < 1:
                raise ValueError(f"batch_size must be a positive int, got {bs!r}")
            est: list[torch.Tensor | None] = []
            for i, p in enumerate(params):
                if p.grad is None:
                    est.append(None)
                    continue
                self._check_grad(p, p.grad, f"params[{i}].grad")
                est.append(p.grad.to(self._state_dtype_for(p)).square().mul_(bs))
        else:
            if isinstance(estimate, torch.Tensor) or not isinstance(estimate, Sequence):
                raise TypeError("estimate must be a list of tensors (one per parameter) or None")
            if len(estimate) != len(params):
                raise ValueError(
                    f"estimate has {len(estimate)} tensors but the optimizer has {len(params)} parameters "
                    "(all groups, in order)"
                )
            est = list(estimate)
            for i, (p, e) in enumerate(zip(params, est)):
                if e is None:
                    continue
                if not isinstance(e, torch.Tensor):
                    raise TypeError(f"estimate[{i}] must be a tensor or None, got {type(e).__name__}")
                if e.shape != p.shape:
                    raise ValueError(f"estimate[{i}] has shape {tuple(e.shape)} but params[{i}] has {tuple(p.shape)}")
                if e.is_complex() or not e.is_floating_point():
                    raise TypeError(f"estimate[{i}] must be a real floating-point tensor, got {e.dtype}")
                if e.device != p.device:
                    raise ValueError(f"estimate[{i}] is on {e.device} but params[{i}] is on {p.device}")
        present = {p: e for p, e in zip(params, est) if e is not None}
        if not present:
            return True
        if not self._estimate_finite(present, stacklevel=2):
            return False
        self._fold(present)
        self.num_hessian_updates += 1
        return True

    def _estimate_finite(self, estimates: dict[torch.Tensor, torch.Tensor], stacklevel: int) -> bool:
        """The one check of an estimate: False (counted, warned) or FloatingPointError if non-finite."""
        if all_finite(list(estimates.values())):
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError("the Hessian estimate contains NaN or Inf; the EMA was not updated")
        self.skipped_hessian_updates += 1
        warnings.warn("soulkit.Sophia: dropped a non-finite Hessian estimate", RuntimeWarning, stacklevel=stacklevel + 1)
        return False

    def _fold(self, estimates: dict[torch.Tensor, torch.Tensor]) -> None:
        """Fold estimates into the EMA outside the update pass, one foreach call per beta2."""
        if not estimates:
            return
        self._refreshed = True
        beta2_of = {p: g["betas"][1] for g in self.param_groups for p in g["params"]}
        by_beta: dict[float, list[torch.Tensor]] = {}
        for p in estimates:
            by_beta.setdefault(beta2_of[p], []).append(p)
        for beta2, ps in by_beta.items():
            fold_hessian_ema([self._init_state(p)["hessian"] for p in ps], [estimates[p] for p in ps], beta2)

    def _trainable(self) -> list[tuple[int, torch.Tensor]]:
        """(index over all groups, parameter) of the parameters that require grad."""
        return [(i, p) for i, p in enumerate(self._all_params()) if p.requires_grad]

    def accumulate_gnb(
        self,
        logits: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> int:
        """Add one (micro-)batch to the pending GNB estimate, reusing the training forward's logits.

        Samples labels from ``softmax(logits)``, backpropagates the summed sampled-label loss to the
        parameters (``retain_graph=True``, so the training loss can still be backpropagated) and adds
        the result to a buffer outside ``.grad`` (gradient clipping does not touch it). The next
        :meth:`step` folds ``h_hat = B * (sum / B)**2`` over all accumulated micro-batches, B being the
        total number of terms. Positions where ``labels == ignore_index`` or ``mask`` is False are left
        out. Under DDP the buffers and B are summed over ranks before folding.

        Returns the number of terms this call added.
        """
        params = [p for _, p in self._trainable()]
        if not params:
            raise ValueError("the optimizer has no parameters that require grad")
        if logits.grad_fn is None:
            raise ValueError(
                "logits carry no autograd graph: call accumulate_gnb(logits) with the logits of the training "
                "forward pass, before loss.backward() frees the graph"
            )
        # FSDP2 (DTensor) parameters: the forward runs on unsharded copies, so autograd.grad w.r.t. the
        # sharded parameters returns None for all of them and the estimate would silently be empty.
        if any(hasattr(p, "device_mesh") and hasattr(p, "to_local") for p in params):
            raise RuntimeError(_NO_SHARDED_GNB)
        grads, n_terms = sampled_label_grads(
            logits, params, labels=labels, mask=mask, ignore_index=ignore_index,
            generator=self._label_generator(logits.device),
        )
        if all(g is None for g in grads):
            raise RuntimeError(
                "the logits do not depend on any of the optimizer's parameters, so the GNB estimate would be "
                "empty; pass the logits of the model this optimizer trains"
            )
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                state = self._init_state(p)
                buf = state.get("gnb_sum")
                if buf is None:
                    state["gnb_sum"] = g.to(torch.float64 if p.dtype == torch.float64 else torch.float32).clone()
                else:
                    buf.add_(g.to(buf.dtype))
        self._pending_terms += n_terms
        return n_terms

    def accumulate_hutchinson(self, loss: torch.Tensor | Callable[[], torch.Tensor], *, n_samples: int = 1) -> None:
        """Add ``u * (H u)`` (Rademacher ``u``) to the pending estimate; folded by the next :meth:`step`.

        ``loss`` is a scalar with its graph (only the Hessian-vector product is differentiated twice:
        no ``backward(create_graph=True)`` is needed in the training loop) or a closure returning one.
        A closure runs inside :func:`~soulkit.optim.differentiable_attention`; a given loss must have
        been computed there already when the model uses SDPA/flash attention (their kernels have no
        double backward): ``with differentiable_attention(model): logits = model(x)`` on refresh steps.
        Several calls before a :meth:`step` average (each call draws its own probes). Under gradient
        accumulation pass each micro-batch's own loss, *not* scaled by ``1 / n_micro`` as for the
        training backward: the mean of the estimates is then the Hessian of the mean loss over
        micro-batches of equal size (:meth:`accumulate_gnb`, which takes logits, needs no such care: it
        sums the micro-batches' terms and divides by their total count).
        Under DDP each rank estimates the Hessian of its own loss with the same probes, and the estimates
        are averaged over ranks before folding (the Hessian of the loss whose gradient DDP averages).
        """
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
        indexed = self._trainable()
        # FSDP2 (DTensor) parameters: as for accumulate_gnb, autograd.grad w.r.t. the sharded parameters
        # returns None for all of them (the forward used unsharded copies): the estimate would be empty
        if any(hasattr(p, "device_mesh") and hasattr(p, "to_local") for _, p in indexed):
            raise RuntimeError("accumulate_hutchinson does not support sharded (DTensor/FSDP2) parameters; pass "
                               "an estimate to update_hessian, or use DDP")
        call = self._pending_hutchinson
        with differentiable_attention():
            owns_graph = callable(loss)  # a given loss is still backpropagated by the training loop
            if owns_graph:
                loss = loss()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss must be a scalar tensor (or a closure returning one)")
            grads = torch.autograd.grad(loss, [p for _, p in indexed], create_graph=True, allow_unused=True)
            used = [(i, p, g) for (i, p), g in zip(indexed, grads) if g is not None and g.requires_grad]

            def probe(j: int, s: int) -> torch.Tensor:
                i, p, _ = used[j]
                return rademacher_like(p, seeded_generator(p.device, self.seed, i, self.num_steps, call, s))

            def hvp_of(us: list[torch.Tensor | None], last: bool) -> Sequence[torch.Tensor | None]:
                try:
                    return torch.autograd.grad(
                        [g for _, _, g in used], [p for _, p, _ in used], grad_outputs=us,
                        retain_graph=not last or not owns_graph, allow_unused=True,
                    )
                except RuntimeError as exc:
                    if "not implemented" in str(exc) and "attention" in str(exc):
                        raise RuntimeError(
                            "the loss's forward pass used an attention kernel without a double backward "
                            f"({exc}); on refresh steps run the forward inside "
                            "`with soulkit.optim.differentiable_attention(model):`, or pass a closure that "
                            "computes the loss"
                        ) from exc
                    raise

            estimates = hutchinson(hvp_of, probe, [p for _, p, _ in used], n_samples) if used else []
        with torch.no_grad():
            for (_, p, _), est in zip(used, estimates):
                if est is None:
                    continue
                state = self._init_state(p)
                if "hutchinson_sum" in state:
                    state["hutchinson_sum"].add_(est)
                else:
                    state["hutchinson_sum"] = est
        self._pending_hutchinson += 1

    def _sync_pending(self) -> None:
        """Sum pending GNB buffers and term counts, and average pending Hutchinson estimates, over DDP ranks
        (plain-tensor parameters only)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        if self._pending_terms:
            bufs = [self.state[p]["gnb_sum"] for p in self._all_params() if "gnb_sum" in self.state.get(p, {})]
            if any(type(b) is not torch.Tensor for b in bufs):
                raise RuntimeError(_NO_SHARDED_GNB)
            dev = bufs[0].device if bufs else torch.device("cpu")
            terms = torch.tensor([float(self._pending_terms)], device=dev, dtype=torch.float64)
            torch.distributed.all_reduce(terms)
            for b in bufs:
                torch.distributed.all_reduce(b)
            self._pending_terms = int(terms.item())
        if self._pending_hutchinson:
            for p in self._all_params():
                buf = self.state.get(p, {}).get("hutchinson_sum")
                if buf is not None:
                    torch.distributed.all_reduce(buf)
                    buf.div_(world)

    def _take_pending(self) -> dict[torch.Tensor, torch.Tensor]:
        """The pending GNB / Hutchinson estimate (parameter -> h_hat), removed from the state."""
        if self._pending_terms == 0 and self._pending_hutchinson == 0:
            return {}
        self._sync_pending()
        est: dict[torch.Tensor, torch.Tensor] = {}
        for p in self._all_params():
            state = self.state.get(p, {})
            e = None
            if "gnb_sum" in state:
                e = state.pop("gnb_sum").square_().div_(self._pending_terms)
            if "hutchinson_sum" in state:
                h = state.pop("hutchinson_sum").div_(self._pending_hutchinson)
                e = h if e is None else (e + h) / 2
            if e is not None:
                est[p] = e
        self._pending_terms = 0
        self._pending_hutchinson = 0
        return est

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Sophia update; folds a pending GNB/Hutchinson estimate first. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [self._gather(gi, group) for gi, group in enumerate(self.param_groups)]
        if self.nonfinite != "ignore" and not all_finite([g for _, gs in groups for g in gs]):
            if self.nonfinite == "raise":
                raise FloatingPointError("a gradient contains NaN or Inf; the step was not taken (state untouched)")
            self.skipped_steps += 1
            return loss
        pending = self._take_pending()
        if pending and self._estimate_finite(pending, stacklevel=2):
            # estimates of stepping parameters are folded inside the update pass; the others here
            stepping = {p for ps, _ in groups for p in ps}
            self._fold({p: e for p, e in pending.items() if p not in stepping})
            self._refreshed = True
            self.num_hessian_updates += 1
        else:
            pending = {}
        for gi, (group, (ps, gs)) in enumerate(zip(self.param_groups, groups)):
            if ps:
                self._step_group(gi, group, ps, gs, pending)
        self.num_steps += 1
        self._refreshed = False
        return loss

    def _gather(self, gi: int, group: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ps, gs = [], []
        for p in group["params"]:
            if p.grad is not None:
                self._check_grad(p, p.grad, f"gradient of a parameter in param_groups[{gi}]")
                ps.append(p)
                gs.append(p.grad)
        return ps, gs

    def _step_group(self, gi: int, group: dict[str, Any], ps: list[torch.Tensor], gs: list[torch.Tensor],
                    pending: dict[torch.Tensor, torch.Tensor]) -> None:
        states = [self._init_state(p) for p in ps]
        ests = None
        if pending:
            have = {p: pending[p] for p in ps if p in pending}
            if len(have) == len(ps):
                ests = [have[p] for p in ps]
            else:  # some stepping parameters have no estimate: fold the others outside the pass
                self._fold(have)
        win = None
        if self.track_win_rate and (self._refreshed or self._win_counts[gi] is None):
            win = torch.zeros((), dtype=torch.int64, device=ps[0].device)
        sophia(
            ps, gs, [s["exp_avg"] for s in states], [s["hessian"] for s in states], [s["step"] for s in states],
            hessian_estimates=ests, lr=group["lr"], betas=group["betas"], rho=group["rho"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            bias_correction=group["bias_correction"],
            hessian_updates=self.num_hessian_updates if group.get("hessian_bias_correction") else 0,
            win_count=win, implementation=implementation_from_flags(group.get("foreach"), group.get("fused"), ps[0].device),
        )
        if win is not None:
            self._win_counts[gi] = win
            # DTensor (FSDP2): the kernel counts this rank's shard, so divide by the local numel
            # (the win rate is then per rank, with no collective).
            self._win_totals[gi] = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in ps)

    # ------------------------------------------------------------------ logging
    def win_rate(self) -> list[float]:
        """Per group: fraction of coordinates whose update was *not* clipped, at the latest counted
        step (the first step, then each step after a Hessian refresh).

        Counted on the device during :meth:`step`; this call does the only host sync. The paper's
        authors tune ``rho`` to keep it within 0.1-0.5. ``nan`` for a group that has not stepped.
        """
        out = []
        counts = [c for c in self._win_counts if c is not None]
        values = torch.stack([c.cpu() for c in counts]).tolist() if counts else []
        it = iter(values)
        for c, total in zip(self._win_counts, self._win_totals):
            out.append(next(it) / total if c is not None and total else math.nan)
        return out

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["soulkit_sophia"] = {
            "num_steps": self.num_steps,
            "num_hessian_updates": self.num_hessian_updates,
            "skipped_steps": self.skipped_steps,
            "skipped_hessian_updates": self.skipped_hessian_updates,
            "pending_terms": self._pending_terms,
            "pending_hutchinson": self._pending_hutchinson,
            "seed": self.seed,
            # the last counted win rate survives a resume (one host sync, at checkpoint time only)
            "win_counts": [None if c is None else int(c) for c in self._win_counts],
            "win_totals": list(self._win_totals),
            "refreshed": self._refreshed,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("soulkit_sophia", None)
        saved_state = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype; Sophia keeps its own state dtype
        # (fp32 state for bf16 parameters, or bf16 state): restore the saved tensors exactly.
        index_to_param = dict(enumerate(self._all_params()))
        for idx, saved in saved_state.items():
            p = index_to_param.get(idx)
            if p is None:
                continue
            for key in _STATE_KEYS:
                if key in saved and isinstance(saved[key], torch.Tensor):
                    self.state[p][key] = saved[key].detach().to(device=p.device, copy=True)
        if extra is not None:
            self.num_steps = int(extra["num_steps"])
            self.num_hessian_updates = int(extra["num_hessian_updates"])
            self.skipped_steps = int(extra["skipped_steps"])
            self.skipped_hessian_updates = int(extra["skipped_hessian_updates"])
            self._pending_terms = int(extra["pending_terms"])
            self._pending_hutchinson = int(extra["pending_hutchinson"])
            self.seed = int(extra["seed"])
            counts = extra.get("win_counts")
            if counts is not None and len(counts) == len(self.param_groups):
                for gi, (c, group) in enumerate(zip(counts, self.param_groups, strict=True)):
                    dev = group["params"][0].device if group["params"] else torch.device("cpu")
                    self._win_counts[gi] = None if c is None else torch.tensor(int(c), dtype=torch.int64, device=dev)
                self._win_totals = [int(t) for t in extra.get("win_totals", self._win_totals)]
            self._refreshed = bool(extra.get("refreshed", False))
        else:
            steps = [s["step"] for s in self.state.values() if "step" in s]
            self.num_steps = int(max(steps).item()) if steps else 0


_NO_SHARDED_GNB = (
    "accumulate_gnb does not support sharded (DTensor/FSDP2) parameters: backpropagate the "
    "sampled-label loss (soulkit.optim.sampled_label_loss) and call update_hessian(batch_size=B)"
)


def sophia(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    hessian_estimates: Sequence[torch.Tensor] | None = None,
    lr: float,
    betas: tuple[float, float],
    rho: float,
    weight_decay: float,
    eps: float,
    maximize: bool = False,
    bias_correction: bool = False,
    hessian_updates: int = 0,
    win_count: torch.Tensor | None = None,
    implementation: str = "auto",
) -> None:
    """Functional Sophia step of one parameter group (what :meth:`Sophia.step` calls), as
    ``torch.optim.adamw.adamw`` is AdamW's.

    Increments ``state_steps`` (0-d tensors, one per parameter), folds ``hessian_estimates`` into
    ``hessians`` (``h <- beta2 h + (1 - beta2) h_hat``) inside the update pass when given, and updates
    ``params`` and ``exp_avgs`` in place. ``bias_correction`` divides ``m`` by ``1 - beta1**t``;
    ``hessian_updates = n > 0`` divides ``h`` by ``1 - beta2**n`` (as ``rho / (1 - beta2**n)``).
    ``win_count``, a 0-d int64 tensor, receives the number of unclipped coordinates.
    """
    beta1, beta2 = betas
    torch._foreach_add_(list(state_steps), 1.0)
    bc1 = 1 - beta1 ** state_steps[0].item() if bias_correction else 1.0
    rho = float(rho)
    if hessian_updates > 0:
        rho = rho / (1 - beta2**hessian_updates)
    sophia_step(
        params, grads, exp_avgs, hessians, lr=float(lr), beta1=beta1, rho=rho,
        weight_decay=float(weight_decay), eps=float(eps), maximize=bool(maximize), bias_correction1=bc1,
        hessian_estimates=hessian_estimates, beta2=beta2, win_count=win_count, implementation=implementation,
    )
