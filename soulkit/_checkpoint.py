"""Checkpoints of soulkit's long jobs (``soulkit train``, and training and unlearning in
:mod:`soulkit.unlearn`): one format, one writer, one reader. Needs no optional extra (torch and
safetensors only), so ``soulkit train`` uses it without importing :mod:`soulkit.unlearn`.

    save_checkpoint(ckpt_dir, model, {"optimizer": opt.state_dict()}, {"step": step, "log": log})
    if has_checkpoint(ckpt_dir):
        states, info = load_checkpoint(ckpt_dir, model)       # the model's weights are restored in place
        opt.load_state_dict(states["optimizer"])

A checkpoint is a directory of three files:

* ``model.safetensors``: the model's state dict (a tied output embedding left out, as safetensors
  refuses shared storage; it is restored through the tie);
* ``optimizer.pt``: a dict of named state dicts (``"optimizer"``, ``"scheduler"``, ...), read back with
  ``torch.load(weights_only=True)``, so no pickled code is ever loaded;
* ``trainer.json``: the caller's JSON record (step, logs, configuration), strict JSON.

The directory is written complete under a temporary name beside its final path, and only then renamed
into place (the previous checkpoint is renamed away first and removed afterwards), so the files of a
checkpoint always belong to the same step.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_directory, atomic_write_bytes, atomic_write_json

__all__ = ["INFO_FILE", "MODEL_FILE", "STATES_FILE", "save_checkpoint", "load_checkpoint", "has_checkpoint",
           "drop_tied_weights"]

MODEL_FILE = "model.safetensors"
STATES_FILE = "optimizer.pt"
INFO_FILE = "trainer.json"


def drop_tied_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Drop the tied output embedding from a state dict in place (safetensors refuses shared storage)."""
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is inp.weight:
        for key in [k for k in state if k.endswith("lm_head.weight")]:
            del state[key]


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a complete checkpoint written by :func:`save_checkpoint`."""
    return (Path(directory) / INFO_FILE).is_file()


def save_checkpoint(directory: str | os.PathLike, model, states: Mapping[str, Mapping[str, Any]],
                    info: Mapping[str, Any], *, weights: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s weights, the named state dicts ``states`` (optimizer, scheduler...) and the JSON
    record ``info`` as the checkpoint ``directory``, replacing the one there. Returns the directory.

    ``weights``: the state dict to write instead of ``model.state_dict()`` (a sharded model's, gathered
    into full tensors); ``model`` still tells which output embedding is tied."""
    if not isinstance(states, Mapping) or not all(isinstance(k, str) for k in states):
        raise TypeError("states must be a dict of name -> state dict (e.g. {'optimizer': opt.state_dict()})")
    from safetensors.torch import save as safetensors_bytes

    with atomic_directory(directory) as tmp:
        source = model.state_dict() if weights is None else weights
        tensors = {k: v.detach().contiguous().clone() for k, v in source.items()}
        drop_tied_weights(model, tensors)
        atomic_write_bytes(tmp / MODEL_FILE, safetensors_bytes(tensors))
        buf = io.BytesIO()
        torch.save(dict(states), buf)
        atomic_write_bytes(tmp / STATES_FILE, buf.getvalue())
        atomic_write_json(tmp / INFO_FILE, dict(info))
    final = Path(directory)
    return final


def load_checkpoint(directory: str | os.PathLike, model, *,
                    load_weights: Callable[[dict[str, torch.Tensor]], Any] | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore ``model``'s weights from the checkpoint ``directory``; returns ``(states, info)``: the
    named state dicts and the JSON record given to :func:`save_checkpoint`.

    ``load_weights(weights)`` puts the checked weights into the model instead of
    ``model.load_state_dict(weights, strict=False)`` (a sharded model shards them first).

    Raises ``FileNotFoundError`` when there is no complete checkpoint, and ``ValueError`` when its
    weights do not fit ``model`` (a missing or unknown tensor). An ``optimizer.pt`` that holds a bare
    optimizer state dict (as unlearning runs wrote it before this format) is read as
    ``{"optimizer": ...}``.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    if not has_checkpoint(d):
        raise FileNotFoundError(f"{d} holds no complete checkpoint (no {INFO_FILE})")
    info = json.loads((d / INFO_FILE).read_text(encoding="utf-8"))
    weights = load_file(str(d / MODEL_FILE))
    expected = dict(model.state_dict())
    unknown = sorted(set(weights) - set(expected))
    drop_tied_weights(model, expected)
    missing = sorted(set(expected) - set(weights))
    if missing or unknown:
        raise ValueError(f"checkpoint {d} does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    if load_weights is None:
        model.load_state_dict(weights, strict=False)
    else:
        load_weights(weights)
    states = torch.load(d / STATES_FILE, weights_only=True)
    if isinstance(states, dict) and "state" in states and "param_groups" in states:
        states = {"optimizer": states}
    return states, info
