"""Which modules the factored (K-FAC / EK-FAC) route tracks, and the hooks that see their data.

A tracked module is a linear map ``y = W x (+ b)``: ``nn.Linear`` (``W`` is ``[out, in]``) or
transformers' ``Conv1D`` (GPT-2; ``W`` is stored transposed, ``[in, out]``). Its per-example
gradient is ``G = sum_t s_t a_t^T`` (``[out, in (+1)]``), with ``a_t`` the module's input at position
``t`` (a 1 appended for the bias) and ``s_t`` the gradient of the loss w.r.t. its output there, so
knowing ``a`` and ``s`` is knowing every per-example (and per-token) gradient without forming it.

:class:`ModuleCapture` records them with a forward hook (``a``) and a tensor hook on the output
(``s``), so nothing about the model changes: SDPA/flash attention, attention masks, autocast and
bf16 weights, and gradient checkpointing (the recomputed forward overwrites ``a`` with the same
values) keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["ModuleCapture", "TrackedModule", "default_tracked", "is_trackable", "tracked_modules"]


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` ``[in, out]`` and attribute ``nf``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_trackable(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


@dataclass
class TrackedModule:
    """One tracked module: its name, the module, and the shape of its gradient matrix ``[out, in (+1)]``."""

    name: str
    module: nn.Module
    transposed: bool  # Conv1D: weight stored [in, out]
    has_bias: bool
    out_features: int = field(init=False)
    in_features: int = field(init=False)

    def __post_init__(self) -> None:
        w = self.module.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])
        self.out_features, self.in_features = int(out_f), int(in_f)

    @property
    def in_dim(self) -> int:
        """Columns of the gradient matrix: inputs, plus one for the bias."""
        return self.in_features + (1 if self.has_bias else 0)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_dim

    def gradient_matrix(self) -> Tensor:
        """The module's current ``.grad`` as ``[out, in (+1)]`` (for tests)."""
        w = self.module.weight.grad
        g = w.t() if self.transposed else w
        if self.has_bias:
            g = torch.cat([g, self.module.bias.grad.unsqueeze(1)], dim=1)
        return g


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def default_tracked(name: str, module: nn.Module, embedding_weights: set[int]) -> bool:
    """Every trackable module except an LM head: one named ``lm_head`` or whose weight is an embedding's."""
    if not is_trackable(module):
        return False
    return name.split(".")[-1] != "lm_head" and id(module.weight) not in embedding_weights


def tracked_modules(model: nn.Module, modules: Sequence[str | type] | None = None) -> list[TrackedModule]:
    """The modules to track, in the model's order.

    ``modules``: ``None`` (every ``nn.Linear``/``Conv1D`` except the LM head and embedding-tied
    weights), or names (exact module names as in ``model.named_modules()``) and/or module types.
    A name that does not exist, names a module that is not a linear map or has no trainable weight,
    or a selection that matches nothing, is an error naming it.
    """
    named = dict(model.named_modules())
    emb = _embedding_weights(model)
    if modules is None:
        chosen = [n for n, m in named.items() if default_tracked(n, m, emb)]
    else:
        if isinstance(modules, (str, type)):
            modules = [modules]
        chosen_set: set[str] = set()
        for sel in modules:
            if isinstance(sel, type):
                hits = [n for n, m in named.items() if isinstance(m, sel)]
                if not hits:
                    raise ValueError(f"modules: no module of type {sel.__name__} in the model")
                chosen_set.update(hits)
            elif isinstance(sel, str):
                if sel not in named:
                    close = [n for n in named if n and (sel in n or n.endswith(sel))][:5]
                    raise ValueError(f"modules: the model has no module named {sel!r}"
                                     + (f"; did you mean one of {close}?" if close else ""))
                chosen_set.add(sel)
            else:
                raise TypeError(f"modules entries must be module names or types, got {type(sel).__name__}")
        chosen = [n for n in named if n in chosen_set]
    out = []
    for n in chosen:
        m = named[n]
        if not is_trackable(m):
            raise ValueError(f"module {n!r} is a {type(m).__name__}; the factored route tracks nn.Linear and "
                             "transformers Conv1D modules")
        w = getattr(m, "weight", None)
        if w is None or not w.requires_grad:
            raise ValueError(f"module {n!r} holds no trainable weight (requires_grad is False)")
        bias = getattr(m, "bias", None)
        out.append(TrackedModule(n, m, transposed=_is_conv1d(m), has_bias=bias is not None and bias.requires_grad))
    if not out:
        raise ValueError("no module to track: the model has no nn.Linear/Conv1D outside its LM head; name "
                         "modules explicitly with modules=[...]")
    return out


class ModuleCapture:
    """Records each tracked module's inputs ``a`` ``[B, T, in (+1)]`` during a forward pass and gives
    the gradients ``s`` ``[B, T, out]`` of any output gradient w.r.t. the modules' outputs.

    Use as a context manager around the forward pass; then :meth:`output_grads` backpropagates
    ``grad_outputs`` from the model's output to the tracked modules' outputs only (no parameter's
    ``.grad`` is touched) and returns ``s`` per module. A module called several times per forward has
    its calls concatenated along ``T``. Forward passes recomputed during a backward (non-reentrant
    gradient checkpointing) are recognised and ignored; their originals carry the gradient.
    """

    def __init__(self, tracked: Iterable[TrackedModule], *, dtype: torch.dtype = torch.float32) -> None:
        self.tracked = list(tracked)
        self.dtype = dtype
        self._a: dict[str, list[Tensor]] = {}
        self._out: dict[str, list[Tensor]] = {}
        self._handles: list = []

    def _forward_hook(self, tm: TrackedModule):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0]
            if not isinstance(x, Tensor) or not isinstance(output, Tensor):
                return
            if torch._C._current_graph_task_id() != -1:
                return  # recomputed during a backward (gradient checkpointing): already recorded
            x = x.detach()
            if x.dim() == 2:
                x = x.unsqueeze(1)
            x = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.dtype)
            if tm.has_bias:
                x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
            self._a.setdefault(tm.name, []).append(x)
            self._out.setdefault(tm.name, []).append(output)

        return hook

    def __enter__(self) -> ModuleCapture:
        self.clear()
        for tm in self.tracked:
            self._handles.append(tm.module.register_forward_hook(self._forward_hook(tm)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget everything recorded (and free the graph references): before the next forward pass."""
        self._a.clear()
        self._out.clear()

    def inputs(self) -> dict[str, Tensor]:
        """Per module, ``a`` of the forward pass (several calls concatenated along ``T``)."""
        self._check_complete()
        return {name: torch.cat(calls, dim=1) if len(calls) > 1 else calls[0] for name, calls in self._a.items()}

    def output_grads(self, output: Tensor, grad_output: Tensor, *, retain_graph: bool = False) -> dict[str, Tensor]:
        """``s`` per module: the gradient of ``<output, grad_output>`` w.r.t. each tracked module's outputs."""
        self._check_complete()
        names = [tm.name for tm in self.tracked]
        outs = [o for name in names for o in self._out[name]]
        if any(not o.requires_grad for o in outs):
            raise RuntimeError(
                "a tracked module's output carries no autograd graph: the forward ran under no_grad, or with "
                "reentrant gradient checkpointing; use gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False}) and keep the tracked weights trainable"
            )
        grads = torch.autograd.grad(output, outs, grad_outputs=grad_output, retain_graph=retain_graph,
                                    allow_unused=True)
        res, k = {}, 0
        for name in names:
            parts = []
            for a, o in zip(self._a[name], self._out[name]):
                g = grads[k]
                k += 1
                if g is None:
                    parts.append(a.new_zeros(*a.shape[:2], o.shape[-1]))
                    continue
                g = g.detach()
                if g.dim() == 2:
                    g = g.unsqueeze(1)
                parts.append(g.reshape(g.shape[0], -1, g.shape[-1]).to(self.dtype))
            res[name] = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return res

    def _check_complete(self) -> None:
        missing = [tm.name for tm in self.tracked if tm.name not in self._a]
        if missing:
            raise RuntimeError(f"tracked modules {missing[:5]} were not called by the forward pass; track only "
                               "modules the loss goes through (modules=[...])")


def per_example_gradients(a: Tensor, s: Tensor) -> Tensor:
    """``G_b = sum_t s_{b,t} a_{b,t}^T``: ``[B, out, in]`` from ``a`` ``[B, T, in]`` and ``s`` ``[B, T, out]``."""
    return torch.bmm(s.transpose(1, 2), a)


def module_dims(tracked: Sequence[TrackedModule]) -> Mapping[str, tuple[int, int]]:
    return {tm.name: (tm.out_features, tm.in_dim) for tm in tracked}
