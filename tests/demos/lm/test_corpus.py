"""The demo's text: deterministic train/validation byte streams, local data, and the batches."""

import pytest
import torch

from soulkit.demos.lm.config import TrainConfig
from soulkit.demos.lm.corpus import load_text_bytes, token_batch, train_offsets, val_batches


def test_data_is_deterministic_and_split_by_file():
    cfg = TrainConfig(max_bytes=50_000, seq_len=32)
    a_train, a_val, info = load_text_bytes(cfg)
    b_train, b_val, _ = load_text_bytes(cfg)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert a_train.dtype == torch.uint8
    assert info["train_bytes"] + info["val_bytes"] >= 50_000  # the cap plus file separators
    assert info["train_files"] >= 1 and info["val_files"] >= 1


def test_local_data_path(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n" * 200)
    (tmp_path / "b.py").write_text("def f():\n    return 2\n" * 200)
    one_file = TrainConfig(data_path=str(tmp_path / "a.py"), seq_len=16, max_bytes=2048)
    train, val, info = load_text_bytes(one_file)
    assert train.numel() > val.numel() > 16
    with pytest.raises(FileNotFoundError, match="data_path"):
        load_text_bytes(TrainConfig(data_path=str(tmp_path / "missing")))


def test_not_enough_text_is_an_error(tmp_path):
    (tmp_path / "tiny.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="not enough text"):
        load_text_bytes(TrainConfig(data_path=str(tmp_path), seq_len=64, max_bytes=1024))


def test_batches():
    cfg = TrainConfig(steps=5, batch_size=3, seq_len=8, eval_batches=2)
    data = torch.arange(100, dtype=torch.uint8)
    offsets = train_offsets(data.numel(), cfg)
    assert offsets.shape == (5, 3)
    assert int(offsets.min()) >= 0 and int(offsets.max()) <= 100 - 9  # every window fits
    assert torch.equal(offsets, train_offsets(data.numel(), cfg))  # seeded by data_seed
    assert not torch.equal(offsets, train_offsets(data.numel(), TrainConfig(steps=5, batch_size=3, seq_len=8, data_seed=1)))
    b = token_batch(data, offsets[0], cfg.seq_len)
    assert b.shape == (3, 9) and b.dtype == torch.long
    assert torch.equal(b[0], torch.arange(int(offsets[0, 0]), int(offsets[0, 0]) + 9))
    windows = val_batches(data, cfg)
    assert [w.shape for w in windows] == [(3, 9), (3, 9)]
    starts = torch.cat(windows)[:, 0]
    assert int(starts[0]) == 0 and int(starts[-1]) == 100 - 9  # spread from the first to the last window
