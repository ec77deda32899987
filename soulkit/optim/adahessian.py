"""AdaHessian: Adam with a Hutchinson estimate of the Hessian diagonal (Yao et al., AAAI 2021).

Per element (``D``: Hessian-diagonal estimate, ``t``: the parameter's step count)::

    D     = u * (H u)                     u Rademacher (+1/-1 with equal probability), averaged
                                          over n_samples draws; |D| averaged over conv kernels
    p    <- p * (1 - lr * weight_decay)   decoupled weight decay (see below)
    m    <- beta1 * m + (1 - beta1) * g
    v    <- beta2 * v + (1 - beta2) * D * D
    p    <- p - lr * (m / (1 - beta1**t)) / ((sqrt(v / (1 - beta2**t)))**hessian_power + eps)

Refreshing ``D`` needs a Hessian-vector product, i.e. gradients that carry an autograd graph.
Only the steps on which a refresh is due need one (every ``hessian_update_interval`` steps, the
first included); the other steps take plain gradients and reuse the last ``D``::

    opt = AdaHessian(model.parameters(), hessian_update_interval=4)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=opt.hessian_due())   # a graph only when a refresh is due
        opt.step()                                      # detaches .grad afterwards: no leak
        opt.zero_grad()

After a step, every ``.grad`` that carried a graph is replaced by its detached value, which
breaks the ``param -> grad -> graph -> param`` reference cycle that ``backward(create_graph=True)``
creates, so the graph is freed.

Choices made here (and where they differ from the paper's reference code):

* **Weight decay** is decoupled (AdamW-style): ``p <- p * (1 - lr * weight_decay)`` before the
  update. The paper's reference code writes ``p <- p - lr * (m_hat / denom + weight_decay * p)``
  with the pre-update ``p`` on the right: the same thing.
* **Spatial averaging** (``spatial_average=True``, as the paper's reference): for 4-D (conv2d)
  weights ``|D|`` is averaged over the kernel's spatial dims (2, 3). 1-D, 2-D and 3-D tensors are
  left element-wise, as in the reference's image-classification code. ``block_size > 1``
  additionally averages ``|D|`` of 2-D matrices over contiguous blocks of ``block_size`` entries
  along the last dim (the reference's transformer variant; a ragged last block is averaged on its
  own). Averaging only changes ``D**2`` where it averages: elsewhere the sign of ``D`` is irrelevant.
* **hessian_update_interval > 1**: on steps without a refresh the last ``D`` is reused and ``v`` is
  still updated with it every step, so ``v / (1 - beta2**t)`` stays an unbiased average (as in the
  widely used ``update_each`` variant of the reference; ``update_each=`` is still accepted).
* **Randomness**: the Rademacher vectors are drawn from a generator seeded by
  :func:`~soulkit.optim.estimators.derive_seed` of ``(seed, parameter index, step, sample)``, the
  scheme every soulkit estimator uses, so a run resumed from a ``state_dict`` draws exactly the
  same vectors as an uninterrupted one. ``seed`` (default 0, as Sophia's) is kept in the param
  groups and therefore in the ``state_dict``.
* **Non-finite values**: a non-finite gradient or Hessian estimate raises ``ValueError`` naming the
  parameter's index (its position in the optimizer's parameters across groups); nothing is
  updated. The check costs one host synchronisation per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from ..kernels import adahessian_step
from ..kernels.dispatch import implementation_from_flags
from ..kernels.finite import first_nonfinite
from .estimators import hutchinson, rademacher_like, seeded_generator, state_dtype

__all__ = ["AdaHessian"]

_STATE_TENSORS = ("exp_avg", "exp_hessian_diag_sq", "hessian_diag")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_group(group: dict[str, Any]) -> None:
    lr = group["lr"]
    lr_f = float(lr) if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr
    if not isinstance(lr_f, (float, int)) or not lr_f >= 0.0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not isinstance(b, (float, int)) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
    eps = group["eps"]
    if not isinstance(eps, (float, int)) or not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    wd = group["weight_decay"]
    if not isinstance(wd, (float, int)) or not wd >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {wd!r}")
    k = group["hessian_power"]
    if not isinstance(k, (float, int)) or not 0.0 <= k <= 1.0:
        raise ValueError(f"hessian_power must be in [0, 1], got {k!r}")
    for name in ("hessian_update_interval", "n_samples", "block_size"):
        val = group[name]
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    if not _is_int(group["seed"]):
        raise ValueError(f"seed must be an int, got {group['seed']!r}")
    if group["foreach"] not in (None, True, False):
        raise ValueError(f"foreach must be None, True or False, got {group['foreach']!r}")
    if group.get("fused") not in (None, True, False):
        raise ValueError(f"fused must be None, True or False, got {group['fused']!r}")
    if group.get("fused") and group["foreach"] is False:
        raise ValueError("fused=True and foreach=False contradict each other: pick one")


class AdaHessian(Optimizer):
    """AdaHessian (Yao et al. 2021) as a ``torch.optim.Optimizer``.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate (paper's reference default 0.15).
        betas: ``(beta1, beta2)``: EMA coefficients of the gradient and of ``D**2``.
        eps: added to the denominator (paper's reference default 1e-4).
        weight_decay: decoupled weight decay, ``p <- p * (1 - lr * weight_decay)``.
        hessian_power: k in ``(sqrt(v_hat))**k``; 1 is AdaHessian, 0 is SGD with momentum.
        hessian_update_interval: refresh ``D`` every this many steps (the first step included);
            :meth:`hessian_due` says when. ``update_each`` is an older name for it.
        n_samples: Rademacher draws averaged per refresh (each one extra Hessian-vector product).
        spatial_average: average ``|D|`` over the spatial dims of 4-D conv kernels.
        block_size: average ``|D|`` of 2-D matrices over blocks of this many entries along the
            last dim (1: element-wise, the default).
        maximize: maximise the objective instead of minimising it.
        foreach: ``False`` selects the plain per-tensor reference (for debugging), ``True`` the
            foreach path; ``None`` (default) the fastest path (the fused Triton kernel on CUDA).
        fused: ``True`` requires the fused Triton kernel (CUDA, or the CPU under
            ``TRITON_INTERPRET=1``); ``None`` (default) uses it on CUDA when triton is installed.
        seed: seeds the Rademacher vectors together with the parameter index and the step count.

    All of these can be set per param group. The optimizer keeps, per
    parameter, ``step`` (int), ``exp_avg`` (m), ``exp_hessian_diag_sq`` (v) and ``hessian_diag``
    (the last D) in float32 for fp16/bf16 parameters and in the parameter's dtype otherwise.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        *,
        hessian_update_interval: int = 1,
        n_samples: int = 1,
        spatial_average: bool = True,
        block_size: int = 1,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        seed: int = 0,
        update_each: int | None = None,
    ) -> None:
        if update_each is not None:
            hessian_update_interval = update_each
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            hessian_update_interval=hessian_update_interval,
            n_samples=n_samples,
            spatial_average=bool(spatial_average),
            block_size=block_size,
            maximize=bool(maximize),
            foreach=foreach,
            fused=fused,
            seed=seed,
            global_step=0,
        )
        _check_group(defaults)
        self._given: dict[int, torch.Tensor] | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "update_each" in param_group:  # the older name of the option
            param_group = dict(param_group)
            param_group.setdefault("hessian_update_interval", param_group.pop("update_each"))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(
                    "AdaHessian does not support complex parameters; view them as real (torch.view_as_real)"
                )
            if not p.is_floating_point():
                raise ValueError(f"AdaHessian needs floating-point parameters, got {p.dtype}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._given = None
        self._generators = {}
        for group in self.param_groups:
            group.setdefault("global_step", 0)
            group.setdefault("block_size", 1)
            if "update_each" in group:
                group.setdefault("hessian_update_interval", group.pop("update_each"))

    # ------------------------------------------------------------------ helpers
    def _indexed_params(self) -> list[tuple[int, dict[str, Any], torch.Tensor]]:
        out, i = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                out.append((i, group, p))
                i += 1
        return out

    @staticmethod
    def _average(d: torch.Tensor, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        if group["spatial_average"] and p.dim() == 4:
            return d.abs().mean(dim=(2, 3), keepdim=True).expand_as(d).clone()
        bs = group["block_size"]
        if bs > 1 and p.dim() == 2:
            a = d.abs()
            rows, cols = a.shape
            out = torch.empty_like(a)
            n_full = cols // bs
            if n_full:
                full = a[:, : n_full * bs].reshape(rows, n_full, bs).mean(dim=2, keepdim=True)
                out[:, : n_full * bs] = full.expand(rows, n_full, bs).reshape(rows, n_full * bs)
            if cols % bs:
                out[:, n_full * bs :] = a[:, n_full * bs :].mean(dim=1, keepdim=True)
            return out
        return d

    # ------------------------------------------------------------------ Hessian refresh API
    def hessian_due(self) -> bool:
        """True when the next :meth:`step` refreshes the Hessian estimate by Hutchinson.

        On such steps (every ``hessian_update_interval`` steps, the first included) call
        ``loss.backward(create_graph=True)``; on the others a plain ``loss.backward()`` is enough.
        False after :meth:`update_hessian` (the next step uses the given estimate).
        """
        if self._given is not None:
            return False
        return any(g["params"] and g["global_step"] % g["hessian_update_interval"] == 0 for g in self.param_groups)

    def update_hessian(self, estimate: Sequence[torch.Tensor | None]) -> None:
        """Give the Hessian-diagonal estimate ``D`` for the next :meth:`step` yourself.

        ``estimate`` lists one tensor per parameter, in the order of the optimizer's parameters
        across groups (``None`` keeps that parameter's last ``D``). It is used as given (no spatial
        averaging) and replaces the Hutchinson refresh of the next step, which then needs no
        autograd graph. Call it right before :meth:`step`: it is not part of the ``state_dict``.
        """
        entries = self._indexed_params()
        if isinstance(estimate, torch.Tensor) or not isinstance(estimate, Sequence):
            raise TypeError("estimate must be a list of tensors (one per parameter, in optimizer order)")
        if len(estimate) != len(entries):
            raise ValueError(
                f"estimate has {len(estimate)} entries but the optimizer has {len(entries)} parameters"
            )
        given: dict[int, torch.Tensor] = {}
        for (i, _group, p), e in zip(entries, estimate):
            if e is None:
                continue
            if not isinstance(e, torch.Tensor):
                raise TypeError(f"estimate[{i}] must be a tensor or None, got {type(e).__name__}")
            if e.is_sparse:
                raise ValueError(f"estimate[{i}] is sparse; give a dense tensor")
            if e.is_complex() or not e.is_floating_point():
                raise ValueError(f"estimate[{i}] has dtype {e.dtype}; a real floating-point tensor is needed")
            if e.shape != p.shape:
                raise ValueError(
                    f"estimate[{i}] has shape {tuple(e.shape)} but parameter {i} has shape {tuple(p.shape)}"
                )
            if e.device != p.device:
                raise ValueError(f"estimate[{i}] is on {e.device} but parameter {i} is on {p.device}")
            given[i] = e.detach().to(dtype=state_dtype(p), copy=True)
        keys = list(given)
        bad = first_nonfinite([given[i] for i in keys])
        if bad is not None:
            raise ValueError(f"estimate[{keys[bad]}] (parameter {keys[bad]}) contains NaN or Inf")
        self._given = given

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One AdaHessian step.

        ``closure`` (optional) re-evaluates the model and calls backward, as the torch contract
        says; when :meth:`hessian_due` is true it must call ``loss.backward(create_graph=True)``
        (``loss.backward(create_graph=opt.hessian_due())`` always works). Returns its loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        given, self._given = self._given, None
        entries = self._indexed_params()
        try:
            self._step(entries, given)
        except BaseException:
            self._given = given
            raise
        finally:
            for _, _, p in entries:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach()
        return loss

    def _step(self, entries, given: dict[int, torch.Tensor] | None) -> None:
        active = []  # (index, group, param) with a gradient
        for i, group, p in entries:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"AdaHessian does not support sparse gradients (parameter {i})")
            if g.is_complex():
                raise RuntimeError(f"AdaHessian does not support complex gradients (parameter {i})")
            if g.shape != p.shape:
                raise ValueError(
                    f"the gradient of parameter {i} has shape {tuple(g.shape)}, not {tuple(p.shape)}"
                )
            active.append((i, group, p))

        # Which parameters need a Hutchinson refresh on this step.
        refresh, due_any = [], False
        for i, group, p in active:
            has_d = "hessian_diag" in self.state.get(p, {}) or (given is not None and i in given)
            due = given is None and group["global_step"] % group["hessian_update_interval"] == 0
            if due or not has_d:
                refresh.append((i, group, p))
                due_any = due_any or due
        with_graph = [e for e in refresh if e[2].grad.requires_grad]
        if refresh and not with_graph:
            if due_any:
                raise RuntimeError(
                    "AdaHessian: a Hessian refresh is due on this step but the gradients carry no autograd "
                    "graph. When opt.hessian_due() is True, call loss.backward(create_graph=True) "
                    "(e.g. loss.backward(create_graph=opt.hessian_due())), or give an estimate with "
                    "opt.update_hessian(...)."
                )
            i = refresh[0][0]
            raise RuntimeError(
                f"AdaHessian: parameter {i} has a gradient but no Hessian estimate yet (it had no gradient "
                "at the last refresh), and its gradient carries no autograd graph. Call "
                "loss.backward(create_graph=True) on this step or give an estimate with opt.update_hessian(...)."
            )

        new_d: dict[int, torch.Tensor] = {}
        if with_graph:
            new_d = self._hutchinson(with_graph)
        for i, group, p in refresh:
            d = new_d.get(i)
            if d is None:  # gradient independent of the parameters: that Hessian row is zero
                d = torch.zeros_like(p, dtype=state_dtype(p))
            new_d[i] = self._average(d, p, group)

        # Non-finite gradients or estimates: raise before anything is modified.
        checked = [(i, "gradient", p.grad) for i, _, p in active] + [
            (i, "Hessian estimate", d) for i, d in new_d.items()
        ]
        bad = first_nonfinite([t for _, _, t in checked])
        if bad is not None:
            i, what, _ = checked[bad]
            raise ValueError(
                f"AdaHessian: the {what} of parameter {i} contains NaN or Inf; nothing was updated "
                "(check the loss scale / learning rate, or skip this batch)"
            )

        # Commit.
        if given is not None:
            new_d.update(given)
        per_group: dict[int, list] = {}
        for i, group, p in active:
            state = self.state[p]
            if "exp_avg" not in state:
                dt = state_dtype(p)
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                state["exp_hessian_diag_sq"] = torch.zeros_like(
                    p, dtype=dt, memory_format=torch.preserve_format
                )
            if i in new_d:
                state["hessian_diag"] = new_d.pop(i)
            state["step"] += 1
            per_group.setdefault(id(group), []).append(p)
        if given is not None:  # estimates for parameters without a gradient on this step are kept too
            for i, _, p in entries:
                if i in new_d:
                    self.state[p]["hessian_diag"] = new_d[i]

        for group in self.param_groups:
            group["global_step"] += 1
            params = per_group.get(id(group))
            if not params:
                continue
            states = [self.state[p] for p in params]
            implementation = implementation_from_flags(group["foreach"], group.get("fused"), params[0].device)
            beta1, beta2 = group["betas"]
            adahessian_step(
                params,
                [p.grad.detach() for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_hessian_diag_sq"] for s in states],
                [s["hessian_diag"] for s in states],
                [s["step"] for s in states],
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                hessian_power=float(group["hessian_power"]),
                maximize=bool(group["maximize"]),
                implementation=implementation,
            )

    def _hutchinson(self, entries: list[tuple[int, dict[str, Any], torch.Tensor]]) -> dict[int, torch.Tensor]:
        """``D = mean_s u_s * (H u_s)`` for the given parameters, whose ``.grad`` carry a graph.

        The Hessian is restricted to the block of these parameters (its diagonal is unchanged).
        """
        params = [p for _, _, p in entries]

        def probe(j: int, s: int) -> torch.Tensor:
            i, group, p = entries[j]
            gen = seeded_generator(p.device, group["seed"], i, group["global_step"], s, cache=self._generators)
            return rademacher_like(p, gen)

        def hvp_of(us: list[torch.Tensor | None], last: bool) -> list[torch.Tensor | None]:
            part = [j for j, u in enumerate(us) if u is not None]
            hvs = torch.autograd.grad(
                [params[j].grad for j in part], [params[j] for j in part],
                grad_outputs=[us[j] for j in part], retain_graph=not last, allow_unused=True,
            )
            out: list[torch.Tensor | None] = [None] * len(us)
            for j, hv in zip(part, hvs):
                out[j] = hv
            return out

        est = hutchinson(hvp_of, probe, params, [group["n_samples"] for _, group, _ in entries])
        return {i: e for (i, _, _), e in zip(entries, est) if e is not None}

    # ------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but the float32 state of fp16/bf16
        parameters stays float32 (torch would cast it to the parameter's dtype)."""
        saved_state = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        self._given = None
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        for pid, (_, _, p) in zip(ids, self._indexed_params()):
            saved = saved_state.get(pid)
            if not saved or p not in self.state:
                continue
            for key in _STATE_TENSORS:
                if key in saved and isinstance(saved[key], torch.Tensor):
                    want = state_dtype(p)
                    if self.state[p][key].dtype != want:
                        self.state[p][key] = saved[key].detach().to(device=p.device, dtype=want, copy=True)
