"""The demo's text: byte streams of real text (by default the CPython standard library's ``.py`` files).

Every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (``site-packages``/``dist-packages``
left out) is listed in sorted order, then put in a fixed pseudo-random order by the SHA-1 of each
relative path (so a byte cap takes files from all over the library, not only its first
directories). Each file goes to the validation split when the SHA-1 of ``"val:" + relative path``,
read as a number, falls in the first ``val_fraction`` of the range; files are read in that order
until the training split holds ``(1 - val_fraction) * max_bytes`` bytes and the validation split
the rest (the last file of each is cut). No network, no randomness. ``TrainConfig.data_path`` points
at a local file or directory instead.

Batches are windows of ``seq_len + 1`` bytes: :func:`train_offsets` draws their start offsets from
``TrainConfig.resolved_data_seed``; :func:`val_batches` spreads fixed windows over the validation
stream.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig

__all__ = ["load_text_bytes", "train_offsets", "val_batches", "token_batch"]

_EXCLUDED_DIRS = ("site-packages", "dist-packages")


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big")


def _list_files(root: Path, pattern: str) -> list[Path]:
    """Files under ``root`` matching ``pattern`` (a ``Path.match``-style glob), without walking into
    ``site-packages``/``dist-packages`` (third-party code, and far larger than the library itself)."""
    name_pattern = pattern.rsplit("/", 1)[-1]
    recursive = "**" in pattern
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS) if recursive else []
        for fn in filenames:
            p = Path(dirpath, fn)
            if fnmatch.fnmatchcase(fn, name_pattern) and p.is_file():
                files.append(p)
    return sorted(files)


def load_text_bytes(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Train and validation byte streams (uint8 tensors) and a description of where they came from.

    Deterministic: the file list is sorted, ordered by the SHA-1 of each relative path and split by
    file (SHA-1 of ``"val:" + path``) into train/validation; files are read in that order until each
    split holds its share of ``config.max_bytes`` (the last file of a split is cut). A single file is
    split by bytes instead.
    """
    if config.data_path is not None:
        root = Path(config.data_path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"TrainConfig.data_path does not exist: {root}")
        source = str(root)
    else:
        root = Path(sysconfig.get_paths()["stdlib"])
        source = f"CPython {sysconfig.get_python_version()} standard library ({root})"
    if root.is_file():
        files, base = [root], root.parent
    else:
        files, base = _list_files(root, config.data_glob), root
    if not files:
        raise ValueError(f"no files matching {config.data_glob!r} under {root}")
    rels = [f.relative_to(base).as_posix() for f in files]  # sorted, deterministic
    order = sorted(range(len(files)), key=lambda i: (_path_hash(rels[i]), rels[i]))
    threshold = int(config.val_fraction * 2**64)
    budget = [config.max_bytes - int(config.val_fraction * config.max_bytes), int(config.val_fraction * config.max_bytes)]
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    n_files = [0, 0]
    single = len(files) == 1
    for i in order:
        if budget[0] <= 0 and budget[1] <= 0:
            break
        split = 0 if single else int(_path_hash("val:" + rels[i]) < threshold)
        if budget[split] <= 0:
            continue
        data = files[i].read_bytes()[: config.max_bytes if single else budget[split]]
        if not data:
            continue
        budget[split] -= len(data)
        parts[split].append(data + b"\n\n")
        n_files[split] += 1
    train_parts, val_parts = parts
    if single:  # one file: split its bytes instead
        n_files = [1, 1]
        data = b"".join(train_parts)
        cut = int(len(data) * (1 - config.val_fraction))
        train_parts, val_parts = [data[:cut]], [data[cut:]]
    train = b"".join(train_parts)
    val = b"".join(val_parts)
    need = config.seq_len + 1
    if len(train) < need or len(val) < need:
        raise ValueError(
            f"not enough text: {len(train)} train / {len(val)} validation bytes, each needs at least "
            f"seq_len + 1 = {need} (raise TrainConfig.max_bytes or val_fraction)"
        )
    info = {
        "source": source,
        "files_listed": len(files),
        "train_files": n_files[0],
        "val_files": n_files[1],
        "train_bytes": len(train),
        "val_bytes": len(val),
    }
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train), as_tensor(val), info


def train_offsets(n_bytes: int, config: TrainConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(config.resolved_data_seed)
    return torch.randint(0, n_bytes - config.seq_len - 1 + 1, (config.steps, config.batch_size), generator=gen)


def val_batches(val: torch.Tensor, config: TrainConfig) -> list[torch.Tensor]:
    """Fixed windows spread evenly over the validation stream (no randomness)."""
    n = config.eval_batches * config.batch_size
    last = val.numel() - config.seq_len - 1
    starts = torch.linspace(0, last, n).round().long()
    windows = torch.stack([val[s : s + config.seq_len + 1] for s in starts.tolist()]).long()
    return list(windows.split(config.batch_size))


def token_batch(data: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
    idx = offsets[:, None] + torch.arange(seq_len + 1)[None, :]
    return data[idx].long()

