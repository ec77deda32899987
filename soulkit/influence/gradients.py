"""Per-example gradients and Jacobians with ``torch.func``, chunked to a memory budget.

The user's loss is ``loss_fn(model, batch) -> Tensor [B]`` (one loss per example). To differentiate
it per example, the model is run functionally (:func:`torch.func.functional_call` on a thin wrapper
module, so that whatever ``loss_fn`` does with ``model`` sees the given parameters) on one example at a
time under :func:`torch.func.vmap`: ``vmap(grad_and_value(loss_of_one_example))``. The model itself is
never modified: no ``.grad`` is written, ``requires_grad`` and the train/eval mode are left alone.

Public API:

* :func:`per_example_grads` -- ``[B, p]`` gradients of one batch.
* :func:`iter_per_example_grads` -- the same, batch after batch over a ``Dataset``/``DataLoader``,
  with a tqdm progress bar.
* :class:`ParamSpace` -- which parameters are attributed, and their flat layout.
* :func:`flatten_tensors` / :func:`unflatten_tensor` -- dict of tensors <-> one flat vector.
* :class:`OutputLoss` -- a loss written as ``loss_on_output(output_fn(model, batch), batch)``, which
  Gauss-Newton curvature and Newton-corrected leave-one-out need.
* :class:`BoundLoss` -- the engine behind all of the above (used by the analyzer).

Memory. The per-example gradients of ``c`` examples take ``c * p`` numbers (twice, while they are
flattened). ``max_memory_mb`` bounds that: ``chunk = max_memory_mb * 2**20 // (3 * p * itemsize)``
examples go through ``vmap`` at once (activations are not counted; for models whose activations dwarf
their parameters pass ``chunk_size`` explicitly).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._data import Batch, DataSource, batch_size_of, cast_batch, in_dims_of, slice_batch, unsqueeze_example

__all__ = [
    "BoundLoss",
    "OutputLoss",
    "ParamSpace",
    "categorical_fit",
    "flatten_tensors",
    "iter_per_example_grads",
    "per_example_grads",
    "softmax_output_hessian",
    "unflatten_tensor",
]

_FLOAT_DTYPES = (torch.float32, torch.float64)
_PREFIX = "model."
# categorical_fit: the label entry may be off by (C + this) * eps * w (cancellation in p_y - 1 near p_y = 1)
_LABEL_ROUNDING = 8.0
_NONFINITE_OUTPUT_DERIVATIVES = "derivatives of loss_on_output w.r.t. the outputs contain NaN/Inf"


# --------------------------------------------------------------------------------------------
# flat layout
# --------------------------------------------------------------------------------------------


def flatten_tensors(tensors: Mapping[str, Tensor] | Sequence[Tensor], *, batch_dims: int = 0) -> Tensor:
    """Concatenate tensors into one vector (or ``[*batch, p]`` when ``batch_dims`` > 0).

    Args:
        tensors: dict (in its key order) or sequence of tensors with equal leading ``batch_dims``.
        batch_dims: number of leading dimensions to keep (e.g. 1 for per-example gradients).
    """
    items = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    if not items:
        raise ValueError("tensors is empty")
    if not isinstance(batch_dims, int) or batch_dims < 0:
        raise ValueError(f"batch_dims must be an integer >= 0, got {batch_dims!r}")
    lead = items[0].shape[:batch_dims]
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.shape[:batch_dims] != lead:
            raise ValueError(
                f"tensors[{i}] has leading shape {tuple(t.shape[:batch_dims])}, tensors[0] has {tuple(lead)}"
            )
    return torch.cat([t.reshape(*lead, -1) for t in items], dim=batch_dims)


def unflatten_tensor(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a vector ``[..., p]`` into tensors shaped like ``like`` (views; leading dims kept)."""
    if not isinstance(flat, Tensor):
        raise TypeError(f"flat must be a torch.Tensor, got {type(flat).__name__}")
    total = sum(t.numel() for t in like.values())
    if flat.dim() == 0 or flat.shape[-1] != total:
        raise ValueError(f"flat has last dimension {tuple(flat.shape)[-1:]} but like holds {total} elements")
    out, i = {}, 0
    lead = flat.shape[:-1]
    for k, t in like.items():
        out[k] = flat[..., i : i + t.numel()].reshape(*lead, *t.shape)
        i += t.numel()
    return out


@dataclass(frozen=True)
class ParamSpace:
    """The attributed parameters of a model: names, shapes and the flat layout ``[p]``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def dim(self) -> int:
        """Total number of attributed parameter elements ``p``."""
        return sum(self.numels)

    @classmethod
    def from_model(
        cls, model: nn.Module, names: Sequence[str] | None = None, *, dtype: torch.dtype | None = None
    ) -> ParamSpace:
        """All parameters with ``requires_grad`` (default), or the named ones, in model order.

        Args:
            model: the module.
            names: parameter names (as in ``model.named_parameters()``) to attribute over.
            dtype: float32 / float64 for the flat space (default: the parameters' dtype).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = dict(model.named_parameters())
        if names is None:
            chosen = [k for k, p in named.items() if p.requires_grad]
            if not chosen:
                raise ValueError("model has no parameter with requires_grad=True; pass params=[names]")
        else:
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise TypeError(f"params must be a sequence of parameter names, got {type(names).__name__}")
            unknown = [k for k in names if k not in named]
            if unknown:
                raise ValueError(
                    f"params names {unknown} are not parameters of the model (known: {list(named)[:8]}...)"
                )
            if len(set(names)) != len(names):
                raise ValueError(f"params lists a name twice: {list(names)}")
            if not names:
                raise ValueError("params is empty")
            order = {k: i for i, k in enumerate(named)}
            chosen = sorted(names, key=order.__getitem__)
        tensors = [named[k] for k in chosen]
        for k, t in zip(chosen, tensors):
            if t.is_complex() or not t.is_floating_point():
                raise TypeError(f"parameter {k!r} must be real floating point, got {t.dtype}")
            if t.layout != torch.strided:
                raise TypeError(f"parameter {k!r} must be dense, got layout {t.layout}")
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"attributed parameters live on several devices {sorted(map(str, devices))}")
        dt = dtype if dtype is not None else tensors[0].dtype
        if dt not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dt}")
        return cls(tuple(chosen), tuple(t.shape for t in tensors), dt, tensors[0].device)

    def flatten(self, d: Mapping[str, Tensor], *, batch_dims: int = 0) -> Tensor:
        """dict ``name -> Tensor [*batch, *shape]`` -> ``[*batch, p]`` in this space's order."""
        return flatten_tensors([d[k] for k in self.names], batch_dims=batch_dims)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``[..., p]`` -> dict ``name -> [..., *shape]``."""
        like = {k: torch.empty(s, device="meta") for k, s in zip(self.names, self.shapes)}
        return unflatten_tensor(flat, like)


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputLoss:
    """A per-example loss that factors through the model's outputs.

    ``loss(model, batch) = loss_on_output(output_fn(model, batch), batch)``, where ``output_fn``
    returns ``[B, ...]`` (e.g. logits) and ``loss_on_output`` returns ``[B]``, the loss of example
    ``j`` depending only on ``outputs[j]``. Curvature ``"gauss_newton"`` (``J^T Lambda J``) and
    ``loo="newton"`` (Woodbury on each example's Gauss-Newton block) need this factorisation; an
    ``OutputLoss`` is itself a valid ``loss_fn``.

    Example::

        loss = OutputLoss(lambda m, b: m(b[0]).squeeze(-1),
                          lambda z, b: F.binary_cross_entropy_with_logits(z, b[1], reduction="none"))
    """

    output_fn: Callable[[nn.Module, Batch], Tensor]
    loss_on_output: Callable[[Tensor, Batch], Tensor]

    def __post_init__(self) -> None:
        for field in ("output_fn", "loss_on_output"):
            if not callable(getattr(self, field)):
                raise TypeError(
                    f"OutputLoss.{field} must be callable, got {type(getattr(self, field)).__name__}"
                )

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.loss_on_output(self.output_fn(model, batch), batch)


class _Bound(nn.Module):
    """``forward(batch) = fn(self.model, batch)``: lets ``functional_call`` reparametrise a user closure."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Batch], Any]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, batch: Batch) -> Any:  # noqa: D401
        return self._fn(self.model, batch)


def _vmap_hint(err: BaseException, what: str) -> RuntimeError:
    msg = str(err)
    hint = (
        "the model draws random numbers (dropout in training mode?): call model.eval() before computing influence"
        if "randomness" in msg.lower()
        else f"{what} must be vmap-compatible (no .item()/.tolist(), no data-dependent Python control flow, "
        "no in-place writes into the inputs)"
    )
    return RuntimeError(f"per-example {what} with torch.func.vmap failed: {msg.splitlines()[0]}\n{hint}")


class BoundLoss:
    """A model, a per-example loss and the attributed parameters, evaluated functionally.

    Args:
        model: the module (never modified).
        loss_fn: ``loss_fn(model, batch) -> Tensor [B]`` (an :class:`OutputLoss` enables Jacobians).
        params: names of the attributed parameters (default: all with ``requires_grad``).
        dtype: float32/float64 to compute in; parameters, floating buffers and floating batch
            tensors are cast (the model keeps its own dtype).

    The parameters are copied on construction (a snapshot); buffers are read from the model at each
    call unless they need a dtype cast.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Batch], Tensor],
        *,
        params: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.space = ParamSpace.from_model(model, params, dtype=dtype)
        dt = self.space.dtype
        named = dict(model.named_parameters())
        attributed = set(self.space.names)
        # a snapshot (copies): later in-place training steps on the model do not leak into the scores
        self.params: dict[str, Tensor] = {k: named[k].detach().to(dt, copy=True) for k in self.space.names}
        frozen: dict[str, Tensor] = {}
        for k, t in named.items():
            if k not in attributed:
                t = t.detach()
                frozen[k] = t.to(dt, copy=True) if t.is_floating_point() else t
        for k, b in model.named_buffers():
            if b.is_floating_point() and b.dtype != dt:
                frozen[k] = b.to(dt)
        self.frozen = frozen
        self._loss_mod = _Bound(model, loss_fn)
        self.output_loss = loss_fn if isinstance(loss_fn, OutputLoss) else None
        self._out_mod = _Bound(model, self.output_loss.output_fn) if self.output_loss is not None else None

    # ---- functional evaluation ------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.space.dtype

    @property
    def device(self) -> torch.device:
        return self.space.device

    def prepare(self, batch: Batch) -> Batch:
        """Move a raw batch to the parameters' device and cast its floating tensors to ``dtype``."""
        return cast_batch(batch, dtype=self.dtype, device=self.device)

    def _state(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {_PREFIX + k: v for k, v in {**self.frozen, **params}.items()}

    def losses(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """``loss_fn`` on a batch with the given attributed parameters (raw output, unchecked)."""
        return torch.func.functional_call(
            self._loss_mod, self._state(params), (batch,), tie_weights=True, strict=False
        )

    def outputs(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """``output_fn`` of the :class:`OutputLoss` on a batch."""
        if self._out_mod is None:
            raise TypeError("outputs need loss_fn to be an OutputLoss(output_fn, loss_on_output)")
        out = torch.func.functional_call(
            self._out_mod, self._state(params), (batch,), tie_weights=True, strict=False
        )
        if not isinstance(out, Tensor):
            raise TypeError(f"output_fn must return a Tensor [B, ...], got {type(out).__name__}")
        return out

    def checked_losses(self, params: Mapping[str, Tensor], batch: Batch, b: int) -> Tensor:
        """``losses`` with the per-example contract checked: a real float tensor of shape ``[b]``."""
        out = self.losses(params, batch)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"loss_fn must return a Tensor of per-example losses [B], got {type(out).__name__}"
            )
        if out.shape != (b,):
            hint = " (a mean/sum over the batch? use reduction='none')" if out.numel() == 1 else ""
            raise ValueError(
                f"loss_fn must return per-example losses of shape [B] = [{b}], got shape {tuple(out.shape)}{hint}"
            )
        if out.is_complex() or not out.is_floating_point():
            raise TypeError(f"loss_fn must return real floating-point losses, got {out.dtype}")
        return out

    # ---- checks ---------------------------------------------------------------------------

    def check_batch(self, batch: Batch, b: int, *, name: str) -> None:
        """Per-example shape, finiteness, and that the loss depends on every attributed parameter."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        with torch.enable_grad():
            out = self.checked_losses(leaves, batch, b)
            if not bool(torch.isfinite(out).all()):
                bad = torch.nonzero(~torch.isfinite(out)).flatten()[:5].tolist()
                raise FloatingPointError(f"loss_fn returned NaN/Inf on {name} (examples {bad} of a batch)")
            if not out.requires_grad:
                raise ValueError(
                    f"loss_fn does not depend on any attributed parameter ({list(self.space.names)[:5]}...)"
                )
            grads = torch.autograd.grad(out.sum(), list(leaves.values()), allow_unused=True)
        unused = [k for k, g in zip(leaves, grads) if g is None]
        if unused:
            raise ValueError(
                f"loss_fn does not depend on parameters {unused}: their Hessian rows are zero (no influence "
                "passes through them); exclude them with params=[...] or set requires_grad=False on them"
            )

    # ---- per-example gradients ------------------------------------------------------------

    def chunk_for(self, per_example_numbers: int, max_memory_mb: float, chunk_size: int | None) -> int:
        if chunk_size is not None:
            return chunk_size
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return max(1, int(max_memory_mb * 2**20) // max(1, 3 * per_example_numbers * itemsize))

    def _one_loss(self, params: dict[str, Tensor], example: Batch) -> Tensor:
        out = self.losses(params, unsqueeze_example(example))
        if not isinstance(out, Tensor) or out.numel() != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"loss_fn must return per-example losses of shape [B]; on a batch of 1 it returned {shape}"
            )
        return out.reshape(())

    def grads(
        self,
        batch: Batch,
        b: int,
        *,
        chunk_size: int | None = None,
        max_memory_mb: float = 256.0,
        check: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Per-example gradients ``[b, p]`` and losses ``[b]`` of one (prepared) batch.

        With ``check``, the vmapped single-example losses are compared with ``loss_fn`` on the whole
        batch: a mismatch means an example's loss depends on the other examples in the batch.
        """
        chunk = self.chunk_for(self.space.dim, max_memory_mb, chunk_size)
        fn = torch.func.vmap(
            torch.func.grad_and_value(self._one_loss), in_dims=(None, in_dims_of(batch)), randomness="error"
        )
        gs, ls = [], []
        for start in range(0, b, chunk):
            part = slice_batch(batch, start, min(b, start + chunk))
            try:
                g, loss = fn(self.params, part)
            except (RuntimeError, NotImplementedError) as err:
                raise _vmap_hint(err, "gradients of loss_fn") from err
            gs.append(self.space.flatten(g, batch_dims=1))
            ls.append(loss)
        grads, losses = torch.cat(gs), torch.cat(ls)
        if check:
            with torch.no_grad():
                full = self.checked_losses(self.params, batch, b)
            tol = 1e-4 if self.dtype == torch.float32 else 1e-9
            diff = (full - losses).abs()
            if not bool((diff <= tol * (1 + full.abs())).all()):
                raise ValueError(
                    "loss_fn is not per-example: the loss of an example computed alone differs from its entry in "
                    f"the batch (max difference {float(diff.max()):.3g}); each loss must depend only on its own "
                    "example (a loss normalised over the batch? BatchNorm in training mode? call model.eval())"
                )
        if not bool(torch.isfinite(grads).all()):
            rows = torch.nonzero(~torch.isfinite(grads).all(dim=1)).flatten()[:5].tolist()
            raise FloatingPointError(f"per-example gradients contain NaN/Inf (examples {rows} of a batch)")
        return grads, losses

    # ---- per-example Jacobians (OutputLoss) -----------------------------------------------

    def _one_output(self, params: dict[str, Tensor], example: Batch) -> Tensor:
        return self.outputs(params, unsqueeze_example(example)).reshape(-1)

    def jacobians(
        self, batch: Batch, b: int, k: int, *, chunk_size: int | None, max_memory_mb: float
    ) -> Tensor:
        """Per-example Jacobians of the flattened outputs, ``[b, k, p]``."""
        chunk = self.chunk_for(k * self.space.dim, max_memory_mb, chunk_size)
        fn = torch.func.vmap(
            torch.func.jacrev(self._one_output), in_dims=(None, in_dims_of(batch)), randomness="error"
        )
        out = []
        for start in range(0, b, chunk):
            part = slice_batch(batch, start, min(b, start + chunk))
            try:
                jac = fn(self.params, part)
            except (RuntimeError, NotImplementedError) as err:
                raise _vmap_hint(err, "Jacobians of output_fn") from err
            out.append(self.space.flatten(jac, batch_dims=2))
        res = torch.cat(out)
        if not bool(torch.isfinite(res).all()):
            raise FloatingPointError("per-example Jacobians of output_fn contain NaN/Inf")
        return res

    def _output_gradient(self, batch: Batch, b: int, *, check: bool) -> tuple[Tensor, tuple[int, ...], Tensor | None]:
        """Outputs as a leaf ``o`` ``[b, k]``, their own shape, and ``r = d sum(losses) / d o`` with its graph.

        ``r`` is ``None`` when the losses do not depend on the outputs. With ``check``, the loss of
        example 0 must not depend on the other examples' outputs, and ``r`` must be finite.
        """
        assert self.output_loss is not None
        with torch.no_grad():
            out0 = self.outputs(self.params, batch)
        if out0.dim() == 0 or out0.shape[0] != b:
            raise ValueError(
                f"output_fn must return outputs of shape [B, ...] with B = {b}, got {tuple(out0.shape)}"
            )
        k = out0[0].numel()
        o = out0.detach().reshape(b, k).requires_grad_(True)
        with torch.enable_grad():
            losses = self.output_loss.loss_on_output(o.reshape(out0.shape), batch)
            if not isinstance(losses, Tensor) or losses.shape != (b,):
                shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                raise ValueError(f"loss_on_output must return per-example losses of shape [{b}], got {shape}")
            if not losses.requires_grad:
                return o, tuple(out0.shape), None
            (r,) = torch.autograd.grad(losses.sum(), o, create_graph=True)
            if check and b > 1:
                (row,) = torch.autograd.grad(losses[0], o, retain_graph=True)
                if bool((row[1:] != 0).any()):
                    raise ValueError(
                        "loss_on_output is not per-example: the loss of example 0 depends on the outputs of other examples"
                    )
        if not bool(torch.isfinite(r).all()):
            raise FloatingPointError(_NONFINITE_OUTPUT_DERIVATIVES)
        return o, tuple(out0.shape), r

    def check_outputs(self, batch: Batch, b: int) -> None:
        """The checks of :meth:`output_derivatives` (shapes, per-example, finite gradient) without ``Lambda``."""
        self._output_gradient(batch, b, check=True)

    def output_derivatives(self, batch: Batch, b: int, *, check: bool = False) -> tuple[Tensor, Tensor]:
        """``r = d loss_j / d out_j`` ``[b, k]`` and ``Lambda = d^2 loss_j / d out_j^2`` ``[b, k, k]``.

        When ``loss_on_output`` is a (weighted) softmax cross-entropy over the last dimension of the
        outputs -- every position's gradient row is ``w (p - e_y)`` with ``p`` the softmax of that row's
        logits, and one Hessian-vector product with a random probe agrees with the closed form --
        ``Lambda`` is ``w (diag(p) - p p^T)`` per position (block diagonal over positions): two
        backward passes in all (:func:`softmax_output_hessian`). Otherwise ``Lambda`` is read off with
        ``k`` Hessian-vector products of the summed loss w.r.t. the outputs, one per output dimension
        (block diagonal over examples because each loss depends only on its own output row).
        """
        o, shape, r = self._output_gradient(batch, b, check=check)
        k = o.shape[1]
        if r is None:
            return torch.zeros(b, k, dtype=o.dtype, device=o.device), torch.zeros(
                b, k, k, dtype=o.dtype, device=o.device
            )
        with torch.enable_grad():
            # closed form: its blocks are checked for NaN/Inf before they are written (checking the dense
            # [b, k, k] result would cost more than building it)
            lam = softmax_output_hessian(o, r, shape) if r.requires_grad else None
            if lam is None:
                lam = torch.zeros(b, k, k, dtype=o.dtype, device=o.device)
                if r.requires_grad:
                    for c in range(k):
                        (col,) = torch.autograd.grad(r[:, c].sum(), o, retain_graph=c < k - 1, allow_unused=True)
                        if col is not None:
                            lam[:, c, :] = col
                lam = 0.5 * (lam + lam.transpose(1, 2))
                if not bool(torch.isfinite(lam).all()):
                    raise FloatingPointError(_NONFINITE_OUTPUT_DERIVATIVES)
        return r.detach(), lam


# --------------------------------------------------------------------------------------------
# softmax cross-entropy: the output Hessian in closed form
# --------------------------------------------------------------------------------------------


def categorical_fit(r: Tensor, p: Tensor) -> tuple[Tensor, bool]:
    """Weights ``w`` ``[N]`` with ``r = w (p - e_y)`` row by row, and whether that form fits every row.

    ``r`` ``[N, C]`` is a loss's gradient w.r.t. logits whose softmax is ``p`` ``[N, C]``. For a weighted
    sum of softmax cross-entropies (``F.cross_entropy(..., reduction="none")`` summed or averaged per
    sequence, ``ignore_index`` masks included) each row is exactly ``w (p - e_y)``: ``r_j / p_j = w`` off
    the label and ``w (1 - 1 / p_y) <= 0`` at it, so the label is the row's smallest ratio ``r_j / p_j``
    and ``w`` is read off another class's entry (the most probable one, for precision). Rows of zeros
    (masked positions) get ``w = 0``. The fit fails (``False``) on label smoothing, soft targets,
    temperatures, or any other loss; the returned ``w`` is then meaningless.

    Rounding. Off the label, ``r_j = w p_j`` carries a relative rounding error of a few ``eps`` (times
    ``|log p_j|``), well inside the ``1e-3`` relative test. At the label, ``r_y = w (p_y - 1)`` is a
    difference of two numbers near ``w`` whenever the model is sure of its answer, and ``p_y`` is only
    known to an absolute error set by the softmax's normaliser ``S = sum_j exp(z_j - max z)``: adding
    ``C`` terms to an accumulator near 1 rounds each time, ``|S_hat - S| <= (C - 1) eps / 2`` (the
    standard bound for a float sum; vectorised sums do better), and the exp/log/division around it add a
    few ``eps``. The loss's ``r_y`` and the fitted ``w (p_y - 1)`` come from two such computations (the
    loss's log-softmax, our softmax), so they may differ by ``~(C + 8) eps * w`` however small
    ``1 - p_y`` is (``p_y`` is 1 to within that from a logit margin of ~16 + log C in float32), while the
    row's own magnitude ``2 w (1 - p_y)`` may be far smaller. The label entry therefore gets an absolute
    allowance of ``(C + 8) * eps * w`` (``eps`` of ``p``'s dtype) -- only the label entry: the other
    entries keep the relative test on their own, so a loss whose off-label entries are not proportional
    to ``p`` (label smoothing, soft targets, a temperature) is still rejected even where its fitted
    ``w`` is large (smoothing ``eps_ls`` at a confident row even makes the fitted ``w`` negative). A floor
    of ``C * tiny * (1 + 3 |w|)`` covers entries that underflow to subnormals or 0 (margins above ~80
    in float32): there ``w`` cannot be read precisely, but the position's Fisher block
    ``w (diag p - p p^T)`` and the chance that the true-Fisher sampler draws a non-label class are both
    below ``C * tiny``, so the weight the fit gives (finite, non-negative) is as good as any -- it is kept
    rather than zeroed, because the true Fisher's weight is the loss's weight ``w`` (it multiplies the
    sampled-label term) whatever the size of the observed gradient.
    """
    fi = torch.finfo(p.dtype)
    pos = p > 0
    ratio = torch.where(pos, r / torch.where(pos, p, torch.ones_like(p)), torch.full_like(p, math.inf))
    y = ratio.argmin(dim=-1)
    others = p.scatter(-1, y.unsqueeze(-1), -1.0)  # p with the label's entry removed
    v = others.argmax(dim=-1, keepdim=True)
    w = (r.gather(-1, v) / p.gather(-1, v).clamp_min(fi.tiny)).squeeze(-1)
    w = torch.where(r.abs().sum(-1) > 0, w, torch.zeros_like(w))
    fit = w.unsqueeze(-1) * (p - torch.nn.functional.one_hot(y, p.shape[-1]).to(p.dtype))
    dev = (r - fit).abs()
    err_label = dev.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    wa = w.abs()
    # the label entry's cancellation error, forgiven up to (C + 8) eps w (see the docstring)
    err = dev.sum(-1) - torch.minimum(err_label, (p.shape[-1] + _LABEL_ROUNDING) * fi.eps * wa)
    scale = r.abs().sum(-1)
    floor = p.shape[-1] * fi.tiny * (1.0 + 3.0 * wa)
    # written as "not (err <= tol)" so that a NaN (an infinite w from a non-cross-entropy) is a failure
    ok = bool(torch.isfinite(w).all()) and bool((err <= 1e-3 * scale + floor).all()) and not bool(
        (w < -1e-6 * scale).any()
    )
    return w.clamp_min(0.0), ok


def _categorical_weights(r: Tensor, p: Tensor) -> Tensor:
    """``w`` ``[N]`` with ``r = w (p - e_y)`` row by row (``r`` the loss's gradient at the logits).

    :func:`categorical_fit`, raising when the loss is not a weighted token cross-entropy (the factored
    route's true Fisher with ``likelihood="categorical"`` needs it).
    """
    w, ok = categorical_fit(r, p)
    if not ok:
        raise ValueError(
            "fisher='true' with likelihood='categorical' needs each sequence's loss to be a weighted sum of "
            "token cross-entropies of the logits (e.g. F.cross_entropy(..., reduction='none') with ignore_index, "
            "summed or averaged per sequence); this loss is not (label smoothing? a different loss?). Pass "
            "fisher='empirical', or likelihood='gaussian' for a squared error"
        )
    return w


def softmax_output_hessian(o: Tensor, r: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """``Lambda`` ``[b, k, k]`` in closed form if the loss is a softmax cross-entropy over ``shape[-1]``, else ``None``.

    Args:
        o: the outputs ``[b, k]`` (a leaf that requires grad; ``k`` = outputs per example).
        r: ``d (sum of losses) / d o`` ``[b, k]``, built with ``create_graph=True``.
        shape: the outputs' own shape ``[b, ..., C]`` (classes on the last dimension).

    Two tests, both required: the gradient rows fit ``w (p - e_y)`` (:func:`categorical_fit`), and one
    Hessian-vector product of the loss with a seeded Gaussian probe ``u`` equals
    ``w (p * u - p (p . u))`` at every position to working precision (so a loss whose gradient merely
    looks like a cross-entropy's at this point, e.g. one with an extra quadratic term, is not taken for
    one). Then ``Lambda`` is ``w (diag(p) - p p^T)`` on each position's ``C x C`` diagonal block and 0
    elsewhere -- the same matrix as ``k`` backward passes give, at the cost of one.
    """
    if len(shape) < 2 or shape[-1] < 2 or o.dim() != 2:
        return None
    b, k = o.shape
    c = shape[-1]
    if k % c:
        return None
    t = k // c
    with torch.no_grad():
        p = torch.softmax(o.detach().reshape(b * t, c), dim=-1)
        w, ok = categorical_fit(r.detach().reshape(b * t, c), p)
    if not ok:
        return None
    gen = torch.Generator(device=o.device).manual_seed(0)
    u = torch.randn(o.shape, generator=gen, dtype=o.dtype, device=o.device)
    (hu,) = torch.autograd.grad(r, o, grad_outputs=u, retain_graph=True, allow_unused=True)
    if hu is None:
        return None
    P, W = p.reshape(b, t, c), w.reshape(b, t, 1)
    U = u.reshape(b, t, c)
    want = W * (P * U - P * (P * U).sum(-1, keepdim=True))
    got = hu.detach().reshape(b, t, c)
    tol = 1e-4 if o.dtype == torch.float32 else 1e-9
    err = (got - want).abs().amax(dim=(1, 2))
    scale = torch.maximum(want.abs().amax(dim=(1, 2)), got.abs().amax(dim=(1, 2)))
    if bool((err > tol * scale + torch.finfo(o.dtype).tiny).any()):
        return None
    blocks = W.unsqueeze(-1) * (torch.diag_embed(P) - P.unsqueeze(-1) * P.unsqueeze(-2))  # [b, t, c, c]
    if not bool(torch.isfinite(blocks).all()):
        raise FloatingPointError(_NONFINITE_OUTPUT_DERIVATIVES)
    lam = torch.zeros(b, t, c, t, c, dtype=o.dtype, device=o.device)
    lam.diagonal(dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))
    return lam.reshape(b, k, k)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def _check_chunking(chunk_size: int | None, max_memory_mb: float) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    if (
        isinstance(max_memory_mb, bool)
        or not isinstance(max_memory_mb, (int, float))
        or not max_memory_mb > 0
    ):
        raise ValueError(f"max_memory_mb must be a number > 0, got {max_memory_mb!r}")


def per_example_grads(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    batch: Batch,
    *,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    max_memory_mb: float = 256.0,
) -> Tensor:
    """Gradients of each example's loss, flattened: ``[B, p]``.

    Args:
        model: the module (never modified).
        loss_fn: ``loss_fn(model, batch) -> Tensor [B]`` of per-example losses.
        batch: one batch (tensor or tuple/list/dict of tensors batched along dim 0).
        params: attributed parameter names (default: all with ``requires_grad``), flattened in model order.
        dtype: ``torch.float32`` or ``torch.float64`` (default: the parameters' dtype).
        chunk_size: examples per ``vmap`` call (default: from ``max_memory_mb``).
        max_memory_mb: budget for the per-example gradient buffers of one chunk.

    Raises:
        ValueError: the loss is not per-example, or does not depend on an attributed parameter.
        FloatingPointError: NaN/Inf in the losses or gradients.
    """
    _check_chunking(chunk_size, max_memory_mb)
    bound = BoundLoss(model, loss_fn, params=params, dtype=dtype)
    b = batch_size_of(batch, name="batch")
    if b == 0:
        raise ValueError("batch is empty (0 examples)")
    prepared = bound.prepare(batch)
    bound.check_batch(prepared, b, name="batch")
    return bound.grads(prepared, b, chunk_size=chunk_size, max_memory_mb=max_memory_mb, check=True)[0]


def iter_per_example_grads(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    data: Any,
    *,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 64,
    chunk_size: int | None = None,
    max_memory_mb: float = 256.0,
    progress: bool | None = None,
    desc: str = "per-example gradients",
) -> Iterator[Tensor]:
    """Yield ``[B, p]`` per-example gradients batch by batch over a ``Dataset`` or ``DataLoader``.

    Args:
        data: ``Dataset`` (batched with ``batch_size``, in order) or an unshuffled ``DataLoader``.
        progress: tqdm bar (``None``: only on a terminal).
        Others: as for :func:`per_example_grads`.
    """
    _check_chunking(chunk_size, max_memory_mb)
    bound = BoundLoss(model, loss_fn, params=params, dtype=dtype)
    source = DataSource(
        data, name="data", batch_size=batch_size, dtype=bound.dtype, device=bound.device, cache_bytes=0
    )
    first = True
    with tqdm(desc=desc, unit="ex", disable=None if progress is None else not progress, leave=False) as bar:
        for batch, b in source:
            if first:
                bound.check_batch(batch, b, name="data")
            yield bound.grads(batch, b, chunk_size=chunk_size, max_memory_mb=max_memory_mb, check=first)[0]
            first = False
            bar.update(b)


def projected_per_example_grads(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    data: Any,
    k: int,
    *,
    seed: int = 0,
    implementation: str = "auto",
    **kwargs: Any,
) -> Tensor:
    """Per-example gradients projected to ``k`` dimensions: ``[n, k]`` instead of ``[n, p]``.

    Each batch's ``[B, p]`` block is multiplied by a seeded Rademacher matrix ``R`` (``[p, k]``,
    entries ``+-1/sqrt(k)``) that is never stored (:func:`soulkit.kernels.project`: Triton on CUDA,
    bounded row chunks in torch elsewhere), so only ``n * k`` numbers are kept. Inner products are
    preserved in expectation (Johnson-Lindenstrauss): ``E[proj_i . proj_j] = g_i . g_j`` with a
    relative spread of about ``sqrt(2 / k)``; the same ``seed`` gives the same projection for
    training and query sets. ``kwargs`` go to :func:`iter_per_example_grads`.
    """
    from ..kernels import project

    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    blocks = [
        project(g, k, seed, implementation=implementation).to(g.dtype if g.dtype == torch.float64 else torch.float32)
        for g in iter_per_example_grads(model, loss_fn, data, desc="projected per-example gradients", **kwargs)
    ]
    if not blocks:
        raise ValueError("data is empty: no per-example gradients to project")
    return torch.cat(blocks)
