"""Curvature primitives: Hessian- and Gauss-Newton-vector products and Hessian-diagonal estimators.

Everything here is written against ``torch.func`` / ``torch.autograd`` on *dicts of tensors*
(``name -> Tensor``, as returned by ``dict(model.named_parameters())``) and a loss written as a
function of such a dict. :func:`module_loss_fn` turns an ``nn.Module`` plus a loss into such a
function with :func:`torch.func.functional_call`.

Public API:

* :func:`hvp` -- Hessian-vector product ``H v`` (forward-over-reverse or double backward).
* :func:`gnvp` -- Gauss-Newton-vector product ``J^T H_L J v``.
* :func:`hutchinson_diag` -- Hutchinson estimate ``E[u * (H u)]`` of the Hessian diagonal.
* :func:`gnb_diag` -- Gauss-Newton-Bartlett estimate (Sophia) from logits that already carry a graph.
* :func:`exact_hessian_diag` -- exact Hessian diagonal for small problems (a reference for tests).
* :func:`module_loss_fn` -- ``nn.Module`` + loss -> ``loss_fn(params)``.

Attention: fused SDPA kernels have no second derivatives, so every second-order computation here
runs inside :func:`~soulkit.optim.attention.differentiable_attention` (torch SDPA on its math
backend); models on attention kernels outside torch SDPA need
``with differentiable_attention(model): ...``, which switches them to ``"eager"`` and back.

``mode="auto"`` runs double backward first: it was the faster mode in ``benchmarks/hvp.py``
(``benchmarks/results/hvp.md``), and it lets several HVPs share one gradient graph (used by
:func:`hutchinson_diag` and :func:`exact_hessian_diag`). If double backward is not implemented for
an op, ``"auto"`` retries with forward-over-reverse (and warns once per process), and vice versa.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ..kernels.finite import first_nonfinite
from .attention import differentiable_attention, notice_once
from .estimators import hutchinson, rademacher_like, sampled_label_grads

__all__ = [
    "exact_hessian_diag",
    "gnb_diag",
    "gnvp",
    "hutchinson_diag",
    "hvp",
    "module_loss_fn",
]

HVPMode = Literal["auto", "forward_over_reverse", "double_backward"]
_MODES = ("auto", "forward_over_reverse", "double_backward")
#: What ``mode="auto"`` runs first (see the module docstring for the measurement behind it).
_AUTO_MODE = "double_backward"
_NO_SECOND_DERIVATIVE = re.compile(
    r"derivative for .* is not implemented|does not support it because it has not been implemented"
    r"|forward AD|not implemented for forward|forward-mode|differentiate twice"
    # torch 2.13: F.mse_loss under forward-over-reverse writes into the ZeroTensor tangent of its target
    r"|ZeroTensors are immutable",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_mode(mode: str) -> str:
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return mode


def _check_tensor_dict(name: str, d: Any) -> dict[str, Tensor]:
    if not isinstance(d, Mapping):
        raise TypeError(f"{name} must be a dict mapping names to tensors, got {type(d).__name__}")
    if len(d) == 0:
        raise ValueError(f"{name} is empty")
    for key, t in d.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {type(key).__name__} ({key!r})")
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError(
                f"{name}[{key!r}] is complex ({t.dtype}); only real floating-point tensors are supported"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name}[{key!r}] must be floating point, got {t.dtype}")
        if t.layout != torch.strided:
            raise TypeError(f"{name}[{key!r}] must be a dense (strided) tensor, got layout {t.layout}")
    return dict(d)


def _check_like(
    name: str, v: Any, params: dict[str, Tensor], *, params_name: str = "params"
) -> dict[str, Tensor]:
    v = _check_tensor_dict(name, v)
    missing = [k for k in params if k not in v]
    extra = [k for k in v if k not in params]
    if missing or extra:
        raise ValueError(
            f"{name} must have the same keys as {params_name}; missing from {name}: {missing}, "
            f"not in {params_name}: {extra}"
        )
    for k, p in params.items():
        t = v[k]
        if t.shape != p.shape:
            raise ValueError(
                f"{name}[{k!r}] has shape {tuple(t.shape)}, {params_name}[{k!r}] has {tuple(p.shape)}"
            )
        if t.dtype != p.dtype:
            raise TypeError(f"{name}[{k!r}] has dtype {t.dtype}, {params_name}[{k!r}] has {p.dtype}")
        if t.device != p.device:
            raise ValueError(f"{name}[{k!r}] is on {t.device}, {params_name}[{k!r}] is on {p.device}")
    if first_nonfinite([v[k] for k in params]) is not None:
        bad = [k for k in params if not bool(torch.isfinite(v[k]).all())]
        raise ValueError(f"{name} contains NaN or Inf in {bad}")
    return {k: v[k] for k in params}  # params' key order


def _check_loss(loss: Any, what: str = "loss_fn") -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"{what} must return a scalar torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1 or loss.dim() > 1:
        raise ValueError(f"{what} must return a scalar (0-dim) tensor, got shape {tuple(loss.shape)}")
    if loss.is_complex() or not loss.is_floating_point():
        raise TypeError(f"{what} must return a real floating-point tensor, got {loss.dtype}")
    return loss.reshape(())


def _is_missing_derivative(err: BaseException) -> bool:
    return isinstance(err, (NotImplementedError, RuntimeError)) and bool(
        _NO_SECOND_DERIVATIVE.search(str(err))
    )


def _missing_derivative_error(err: BaseException, mode: str) -> RuntimeError:
    return RuntimeError(
        f"{mode} is not available for an op in loss_fn: {err}\n"
        "If the model uses fused attention outside torch SDPA (e.g. transformers flash_attention_2), "
        "wrap the call in `with soulkit.optim.curvature.differentiable_attention(model):`; "
        "otherwise try the other mode ('double_backward' / 'forward_over_reverse')."
    )


# --------------------------------------------------------------------------------------------
# HVP engines
# --------------------------------------------------------------------------------------------


def _hvp_fwd_over_rev(loss_fn: Callable, params: dict[str, Tensor], v: dict[str, Tensor], what: str) -> dict:
    def checked(p: dict[str, Tensor]) -> Tensor:
        return _check_loss(loss_fn(p), what)

    primals = {k: t.detach() for k, t in params.items()}
    tangents = {k: t.detach() for k, t in v.items()}
    with torch.enable_grad():
        _, hv = torch.func.jvp(torch.func.grad(checked), (primals,), (tangents,))
    return {k: hv[k].detach() for k in params}


class _GradGraph:
    """A gradient with its graph kept (``create_graph=True``): many HVPs for one forward/backward."""

    def __init__(self, loss_fn: Callable, params: dict[str, Tensor], what: str = "loss_fn") -> None:
        self.keys = list(params)
        self.leaves = [params[k].detach().requires_grad_(True) for k in self.keys]
        with torch.enable_grad():
            loss = _check_loss(loss_fn(dict(zip(self.keys, self.leaves))), what)
            if not loss.requires_grad:
                grads: Sequence[Tensor | None] = [None] * len(self.leaves)
            else:
                grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        # Gradients without a graph are constant in params: their rows of H are zero. That is right
        # when the loss is linear in that parameter, but it is also what an op without a real double
        # backward (a custom autograd.Function whose backward is @once_differentiable) produces, so say so.
        self.live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = grads
        flat = [self.keys[i] for i, g in enumerate(grads) if g is not None and not g.requires_grad]
        if flat:
            notice_once(
                "grad-without-graph",
                f"soulkit: the gradient of {what} w.r.t. {flat[:5]}{' ...' if len(flat) > 5 else ''} does not "
                "depend on the parameters, so their Hessian rows are taken as zero. This is exact if the "
                "loss is linear in them; if it is not, an op in the loss has no double backward (e.g. a "
                "custom autograd.Function with a @once_differentiable backward): use "
                "mode='forward_over_reverse'",
                warn=True,
            )

    def hvp(self, v: dict[str, Tensor], *, retain_graph: bool = True) -> dict[str, Tensor]:
        out = [torch.zeros_like(t) for t in self.leaves]
        if self.live:
            res = torch.autograd.grad(
                [self.grads[i] for i in self.live],
                self.leaves,
                grad_outputs=[v[self.keys[i]] for i in self.live],
                retain_graph=retain_graph,
                allow_unused=True,
            )
            out = [r.detach() if r is not None else o for r, o in zip(res, out)]
        return dict(zip(self.keys, out))


def _run_with_fallback(mode: str, double: Callable[[], Any], fwd: Callable[[], Any], *, what: str) -> Any:
    """Run ``double``/``fwd`` per ``mode``; ``"auto"`` runs ``_AUTO_MODE`` and falls back once to the other."""
    first = _AUTO_MODE if mode == "auto" else mode
    runners = {"double_backward": double, "forward_over_reverse": fwd}
    try:
        return runners[first]()
    except (NotImplementedError, RuntimeError) as err:
        if not _is_missing_derivative(err):
            raise
        if mode != "auto":
            raise _missing_derivative_error(err, first) from err
        other = "forward_over_reverse" if first == "double_backward" else "double_backward"
        notice_once(
            f"fallback-{first}",
            f"soulkit: {first} is not implemented for an op in {what} ({str(err).splitlines()[0]}); "
            f"falling back to {other}",
            warn=True,
        )
        try:
            return runners[other]()
        except (NotImplementedError, RuntimeError) as err2:
            if _is_missing_derivative(err2):
                raise _missing_derivative_error(err2, other) from err2
            raise


def hvp(
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    v: Mapping[str, Tensor],
    *,
    mode: HVPMode = "auto",
) -> dict[str, Tensor]:
    """Hessian-vector product ``H v`` of ``loss_fn`` at ``params``.

    Args:
        loss_fn: ``loss_fn(params_dict) -> scalar tensor``; must be a pure function of its argument
            (see :func:`module_loss_fn` for modules). Names absent from ``params`` are held fixed.
        params: ``name -> Tensor`` point at which the Hessian is taken (e.g.
            ``dict(model.named_parameters())``); real floating point. Never modified, and no ``.grad``
            is written.
        v: direction, with exactly the keys, shapes, dtypes and devices of ``params``.
        mode: ``"double_backward"`` (``autograd.grad`` with ``create_graph`` then a second grad),
            ``"forward_over_reverse"`` (``torch.func.jvp`` over ``torch.func.grad``), or ``"auto"``:
            double backward (the faster mode in benchmarks/results/hvp.md), retried with
            forward-over-reverse if an op lacks a double backward (warning once per process).
            Note: with torch 2.13, ``F.mse_loss`` fails under forward-over-reverse ("ZeroTensors are
            immutable", a torch bug); ``"auto"`` is unaffected, an explicit mode raises a clear error.

    Returns:
        ``name -> Tensor`` with ``(H v)[name]``, detached, in ``params``' key order.

    The second-order computation runs under the math SDPA backend (:func:`differentiable_attention`
    without a model); models on other attention kernels need ``with differentiable_attention(model)``.
    """
    mode = _check_mode(mode)
    params = _check_tensor_dict("params", params)
    v = _check_like("v", v, params)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    with differentiable_attention():
        return _run_with_fallback(
            mode,
            lambda: _GradGraph(loss_fn, params).hvp(v, retain_graph=False),
            lambda: _hvp_fwd_over_rev(loss_fn, params, v, "loss_fn"),
            what="loss_fn",
        )


# --------------------------------------------------------------------------------------------
# Gauss-Newton
# --------------------------------------------------------------------------------------------


def _check_output(out: Any) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"output_fn must return a torch.Tensor (e.g. logits; use `.logits` on a transformers output), "
            f"got {type(out).__name__}"
        )
    if out.is_complex() or not out.is_floating_point():
        raise TypeError(f"output_fn must return a real floating-point tensor, got {out.dtype}")
    return out


def _gnvp_jvp(
    output_fn: Callable, params: dict[str, Tensor], v: dict[str, Tensor]
) -> tuple[Tensor, Tensor, list]:
    """One forward: primal outputs with an (ordinary autograd) graph, and J v by forward-mode AD."""
    leaves = {k: t.detach().requires_grad_(True) for k, t in params.items()}
    tangents = {k: t.detach() for k, t in v.items()}
    with torch.enable_grad():
        out, jv = torch.func.jvp(lambda p: _check_output(output_fn(p)), (leaves,), (tangents,))
    return out, jv.detach(), list(leaves.values())


def _gnvp_double_vjp(output_fn: Callable, params: dict[str, Tensor], v: dict[str, Tensor]) -> tuple:
    """J v without forward-mode AD: J^T u is linear in u, so J v = d(v . J^T u)/du."""
    leaves = {k: t.detach().requires_grad_(True) for k, t in params.items()}
    with torch.enable_grad():
        out = _check_output(output_fn(leaves))
        if not out.requires_grad:
            return out, torch.zeros_like(out), list(leaves.values())
        u = torch.zeros_like(out, requires_grad=True)
        jtu = torch.autograd.grad(
            out, list(leaves.values()), grad_outputs=u, create_graph=True, allow_unused=True
        )
        pairs = [(g, v[k]) for g, k in zip(jtu, leaves) if g is not None and g.requires_grad]
        if not pairs:
            jv = torch.zeros_like(out)
        else:
            (jv,) = torch.autograd.grad(
                [g for g, _ in pairs],
                u,
                grad_outputs=[t for _, t in pairs],
                retain_graph=True,
                allow_unused=True,
            )
            jv = torch.zeros_like(out) if jv is None else jv
    return out, jv.detach(), list(leaves.values())


def gnvp(
    output_fn: Callable[[dict[str, Tensor]], Tensor],
    loss_on_output: Callable[[Tensor], Tensor],
    params: Mapping[str, Tensor],
    v: Mapping[str, Tensor],
    *,
    mode: HVPMode = "auto",
) -> dict[str, Tensor]:
    """Gauss-Newton-vector product ``G v = J^T H_L J v``.

    ``J`` is the Jacobian of ``output_fn`` at ``params`` and ``H_L`` the Hessian of
    ``loss_on_output`` at the outputs. ``G`` drops the second-derivative-of-the-model term of the
    Hessian: it equals the Hessian for a model linear in its parameters, and is positive
    semi-definite whenever the loss is convex in the outputs (cross-entropy, MSE).

    Args:
        output_fn: ``output_fn(params_dict) -> Tensor`` (e.g. logits).
        loss_on_output: ``loss_on_output(outputs) -> scalar tensor`` (targets closed over).
        params, v: as for :func:`hvp`.
        mode: how ``J v`` and ``H_L (J v)`` are formed: ``"forward_over_reverse"`` (``J v`` by
            ``torch.func.jvp`` in the same forward that records the graph for ``J^T``) or
            ``"double_backward"`` (``J v`` by differentiating ``J^T u`` w.r.t. ``u``); ``"auto"``
            as in :func:`hvp`, with the same fallback. ``J^T`` is always one ordinary backward.

    Returns:
        ``name -> Tensor`` with ``(G v)[name]``, detached.
    """
    mode = _check_mode(mode)
    params = _check_tensor_dict("params", params)
    v = _check_like("v", v, params)
    for name, fn in (("output_fn", output_fn), ("loss_on_output", loss_on_output)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")

    def finish(out: Tensor, jv: Tensor, leaves: list[Tensor], inner: str) -> dict[str, Tensor]:
        key = "outputs"
        o = {key: out.detach()}
        t = {key: jv}
        if inner == "double_backward":
            hjv = _GradGraph(lambda d: loss_on_output(d[key]), o, "loss_on_output").hvp(
                t, retain_graph=False
            )[key]
        else:
            hjv = _hvp_fwd_over_rev(lambda d: loss_on_output(d[key]), o, t, "loss_on_output")[key]
        if not out.requires_grad:
            return {k: torch.zeros_like(p) for k, p in params.items()}
        res = torch.autograd.grad(out, leaves, grad_outputs=hjv.to(out.dtype), allow_unused=True)
        return {
            k: (r.detach() if r is not None else torch.zeros_like(params[k])) for k, r in zip(params, res)
        }

    with differentiable_attention():
        return _run_with_fallback(
            mode,
            lambda: finish(*_gnvp_double_vjp(output_fn, params, v), "double_backward"),
            lambda: finish(*_gnvp_jvp(output_fn, params, v), "forward_over_reverse"),
            what="output_fn/loss_on_output",
        )


# --------------------------------------------------------------------------------------------
# diagonal estimators
# --------------------------------------------------------------------------------------------


def _check_generator(generator: Any, params: dict[str, Tensor]) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gdev = torch.device(generator.device)
    for k, p in params.items():
        same = gdev.type == p.device.type and (
            gdev.index is None or p.device.index is None or gdev.index == p.device.index
        )
        if not same:
            raise ValueError(
                f"generator is on {gdev} but params[{k!r}] is on {p.device}; the Rademacher vectors are drawn on "
                "each parameter's device, so pass a generator for that device (torch.Generator(device=...))"
            )


def hutchinson_diag(
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    *,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    mode: HVPMode = "auto",
) -> dict[str, Tensor]:
    """Hutchinson estimate of the Hessian diagonal: ``mean_s u_s * (H u_s)``, ``u_s`` Rademacher.

    Unbiased; the variance of one sample at coordinate ``i`` is ``sum_{j != i} H_ij^2``.

    Args:
        loss_fn, params, mode: as for :func:`hvp`. With double backward (the ``"auto"`` default) the
            gradient graph is built once and shared by all samples.
        n_samples: number of probe vectors (>= 1).
        generator: seeds the probes, drawn with ``torch.randint(0, 2, ..., generator=generator)`` on
            each parameter's device, parameter by parameter in ``params`` order, sample after sample;
            it must live on the parameters' device (``torch.Generator(device="cuda")`` for CUDA
            parameters). The result is deterministic for a given generator state.

    Returns:
        ``name -> Tensor`` estimate of ``diag(H)``, detached.
    """
    mode = _check_mode(mode)
    params = _check_tensor_dict("params", params)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    _check_generator(generator, params)
    # Restored if "auto" falls back to the other mode, so the probes (and the result) stay the same.
    start_state = generator.get_state() if generator is not None else None
    keys, tensors = list(params), list(params.values())

    def estimate(hvp_on: Callable[[dict[str, Tensor], bool], dict[str, Tensor]]) -> dict[str, Tensor]:
        if start_state is not None:
            generator.set_state(start_state)

        def hvp_of(us: list[Tensor | None], last: bool) -> list[Tensor]:
            hu = hvp_on(dict(zip(keys, us)), not last)
            return [hu[k] for k in keys]

        est = hutchinson(hvp_of, lambda j, s: rademacher_like(tensors[j], generator), tensors, n_samples)
        return {k: e.to(p.dtype) for (k, p), e in zip(params.items(), est)}

    def double() -> dict[str, Tensor]:
        graph = _GradGraph(loss_fn, params)
        return estimate(lambda u, retain: graph.hvp(u, retain_graph=retain))

    def fwd() -> dict[str, Tensor]:
        return estimate(lambda u, retain: _hvp_fwd_over_rev(loss_fn, params, u, "loss_fn"))

    with differentiable_attention():
        return _run_with_fallback(mode, double, fwd, what="loss_fn")


def gnb_diag(
    logits: Tensor,
    params: Mapping[str, Tensor] | Sequence[Tensor],
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    retain_graph: bool = True,
) -> dict[str, Tensor] | list[Tensor]:
    """Gauss-Newton-Bartlett estimate of the Hessian diagonal (Sophia), from logits with a graph.

    Samples ``y_hat ~ softmax(logits)`` and returns ``grad(L_hat_sum)**2 / B`` (``== B * grad(mean
    L_hat)**2``), where ``L_hat_sum`` is the summed cross-entropy of the ``B`` kept positions
    (:func:`soulkit.optim.estimators.sampled_label_loss`). Its expectation over ``y_hat`` is the
    diagonal of the Gauss-Newton matrix ``J^T (diag(p) - p p^T) J / B`` of the *mean* loss. It costs
    one backward and no forward: pass the logits of the training forward pass.

    Args:
        logits: ``[..., vocab]`` with the autograd graph reaching ``params``.
        params: dict ``name -> Tensor`` (a dict is returned) or a sequence of tensors (a list is
            returned); each must require grad. Parameters the logits do not depend on get zeros.
        mask, labels, ignore_index: which positions count (see ``sampled_label_loss``); labels'
            values are never used, only their positions.
        generator: seeds the label sampling (on the logits' device).
        retain_graph: keep the forward graph so the training loss can still be backpropagated
            (default ``True``); pass ``False`` for the last use of the graph.

    Returns:
        dict or list (matching ``params``) of detached estimates in each parameter's dtype.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.is_complex():
        raise TypeError(f"logits must be real floating point, got {logits.dtype}")
    if not logits.requires_grad:
        raise ValueError(
            "logits must carry the autograd graph of the forward pass (logits.requires_grad is False)"
        )
    as_dict = isinstance(params, Mapping)
    if as_dict:
        pd = _check_tensor_dict("params", params)
        names, tensors = list(pd), list(pd.values())
    else:
        if isinstance(params, Tensor) or not isinstance(params, Sequence):
            raise TypeError(f"params must be a dict or a sequence of tensors, got {type(params).__name__}")
        tensors = list(params)
        if not tensors:
            raise ValueError("params is empty")
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.is_complex() or not t.is_floating_point():
                raise TypeError(f"params[{i}] must be real floating point, got {t.dtype}")
        names = [str(i) for i in range(len(tensors))]
    for name, t in zip(names, tensors):
        if not t.requires_grad:
            raise ValueError(f"params[{name}] does not require grad")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    grads, n_terms = sampled_label_grads(
        logits, tensors, mask=mask, labels=labels, ignore_index=ignore_index, generator=generator,
        retain_graph=retain_graph,
    )
    est = [
        torch.zeros_like(t).detach() if g is None else (g.detach().square() / n_terms).to(t.dtype)
        for g, t in zip(grads, tensors)
    ]
    return dict(zip(names, est)) if as_dict else est


def exact_hessian_diag(
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    *,
    max_elements: int = 20_000,
) -> dict[str, Tensor]:
    """Exact Hessian diagonal, one backward per element (a reference for small problems).

    Builds the gradient with its graph once (double backward), then differentiates each gradient
    element ``g_i`` w.r.t. its own parameter block and keeps ``d g_i / d theta_i``. Cost: one
    backward through the gradient graph per parameter element.

    Args:
        loss_fn, params: as for :func:`hvp`.
        max_elements: refuse (``ValueError``) if ``params`` holds more elements than this.

    Returns:
        ``name -> Tensor`` with ``diag(H)`` reshaped like each parameter, detached.
    """
    params = _check_tensor_dict("params", params)
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1:
        raise ValueError(f"max_elements must be an integer >= 1, got {max_elements!r}")
    total = sum(p.numel() for p in params.values())
    if total > max_elements:
        raise ValueError(
            f"params hold {total} elements, above max_elements={max_elements}: the exact diagonal costs one "
            "backward per element; use hutchinson_diag / gnb_diag, or raise max_elements"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    with differentiable_attention():
        try:
            graph = _GradGraph(loss_fn, params)
            out = {k: torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for k, p in params.items()}
            for i in graph.live:
                key, leaf = graph.keys[i], graph.leaves[i]
                g = graph.grads[i].reshape(-1)
                for j in range(g.numel()):
                    (row,) = torch.autograd.grad(g[j], leaf, retain_graph=True, allow_unused=True)
                    if row is not None:
                        out[key][j] = row.reshape(-1)[j]
        except (NotImplementedError, RuntimeError) as err:
            if _is_missing_derivative(err):
                raise _missing_derivative_error(err, "double_backward") from err
            raise
    return {k: out[k].reshape(p.shape) for k, p in params.items()}


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


def module_loss_fn(
    model: torch.nn.Module,
    compute_loss: Callable[[Callable[..., Any]], Tensor],
    *,
    tie_weights: bool = True,
) -> Callable[[dict[str, Tensor]], Tensor]:
    """Turn a module and a loss into ``loss_fn(params) -> scalar`` for :func:`hvp` and friends.

    ``compute_loss`` receives ``call``, a stand-in for ``model(...)`` that runs the model with the
    given parameters (:func:`torch.func.functional_call`); parameters and buffers missing from
    ``params`` are taken from the model and held fixed. The model itself is never modified.

    Example::

        loss_fn = module_loss_fn(model, lambda call: call(input_ids, labels=input_ids).loss)
        hv = hvp(loss_fn, dict(model.named_parameters()), v)

        # output_fn for gnvp:
        output_fn = module_loss_fn(model, lambda call: call(input_ids).logits)

    Args:
        model: the module.
        compute_loss: ``compute_loss(call) -> Tensor``.
        tie_weights: passed to ``functional_call`` (tied weights such as GPT-2's embedding and LM
            head follow the name given in ``params``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(compute_loss):
        raise TypeError(f"compute_loss must be callable, got {type(compute_loss).__name__}")

    def loss_fn(params: dict[str, Tensor]) -> Tensor:
        def call(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(model, params, args, kwargs, tie_weights=tie_weights)

        return compute_loss(call)

    return loss_fn
