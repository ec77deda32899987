"""A twice-differentiable attention path for curvature: :func:`differentiable_attention`.

PyTorch's fused SDPA kernels (flash / memory-efficient, and on the CPU
``_scaled_dot_product_flash_attention_for_cpu``) have neither a double backward nor a forward-mode
derivative: a Hessian-vector product through them fails with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" (double backward) or
"Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu that does not support it"
(forward-over-reverse). Inside :func:`differentiable_attention` torch SDPA runs its math backend,
and transformers models on other attention kernels (``flash_attention_2``, ``flex_attention``, hub
kernels) are switched to ``"eager"`` and back.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["differentiable_attention", "notice_once"]

logger = logging.getLogger("soulkit")

#: Attention implementations (transformers ``config._attn_implementation``) that are twice
#: differentiable once torch SDPA is pinned to its math backend.
_DIFFERENTIABLE_ATTN = ("eager", "sdpa")

# One-time notices. This is the only module-level state: it only silences repeated messages.
_NOTICES_GIVEN: set[str] = set()


def notice_once(key: str, message: str, *, warn: bool, stacklevel: int = 3) -> None:
    """Say ``message`` once per process and ``key``: a ``UserWarning`` if ``warn``, an INFO log line otherwise."""
    if key in _NOTICES_GIVEN:
        return
    _NOTICES_GIVEN.add(key)
    if warn:
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
    else:
        logger.info(message)


def _attn_configs(model: torch.nn.Module) -> list[Any]:
    """Every distinct transformers config reachable from ``model`` (its own, sub-models', sub-configs)."""
    seen: dict[int, Any] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, key, None))
    return list(seen.values())


def _implementation(cfg: Any) -> Any:
    return getattr(cfg, "_attn_implementation_internal", getattr(cfg, "_attn_implementation", None))


@contextlib.contextmanager
def differentiable_attention(model: torch.nn.Module | None = None) -> Iterator[None]:
    """Run the enclosed code on an attention path that has double backward and forward-mode AD.

    Inside the context torch's ``scaled_dot_product_attention`` uses the math backend
    (``sdpa_kernel([SDPBackend.MATH])``); the fused flash/memory-efficient kernels (including the
    CPU flash kernel torch picks by default) have no second derivative. If ``model`` is a
    transformers ``PreTrainedModel`` whose attention implementation is neither ``"eager"`` nor
    ``"sdpa"`` (e.g. ``"flash_attention_2"``, ``"flex_attention"``, a hub kernel), it is switched
    to ``"eager"`` with ``model.set_attn_implementation`` and every config's previous value is
    restored on exit (also when the body raises). A one-time notice per process says what was
    switched (a ``UserWarning`` when a model is switched, a ``logging`` INFO line otherwise).

    Args:
        model: optional ``nn.Module``; only transformers models (with ``config._attn_implementation``)
            are switched, other modules are left alone.

    Example::

        with differentiable_attention(model):
            hv = hvp(module_loss_fn(model, lambda call: call(ids, labels=ids).loss), params, v)
    """
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    saved: list[tuple[Any, Any]] = []
    if model is not None:
        configs = _attn_configs(model)
        bad = [cfg for cfg in configs if _implementation(cfg) not in (*_DIFFERENTIABLE_ATTN, None)]
        if bad:
            saved = [(cfg, _implementation(cfg)) for cfg in configs]
            old = sorted({str(_implementation(cfg)) for cfg in bad})
            try:
                setter = getattr(model, "set_attn_implementation", None)
                if callable(setter):
                    setter("eager")
                for cfg in bad:  # configs the setter did not reach (or transformers without a setter)
                    if _implementation(cfg) not in _DIFFERENTIABLE_ATTN:
                        cfg._attn_implementation_internal = "eager"
            except BaseException:
                _restore(saved)
                raise
            notice_once(
                "switch-model",
                f"soulkit: curvature uses the math attention path: switched {type(model).__name__} attention "
                f"from {', '.join(old)} to 'eager' (no double backward / forward-mode AD there); "
                "restored on exit",
                warn=True,
            )
    notice_once(
        "sdpa-math",
        "soulkit: curvature uses the math attention path (torch SDPA MATH backend), since fused SDPA "
        "kernels have no double backward or forward-mode derivative",
        warn=False,
    )
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        _restore(saved)


def _restore(saved: list[tuple[Any, Any]]) -> None:
    for cfg, value in saved:
        # Write the internal attribute directly: re-running transformers' checks for e.g.
        # flash_attention_2 could fail (or warn) and the old value was valid when we found it.
        cfg._attn_implementation_internal = value
