"""A tiny causal LM in plain torch (no transformers import) and its data, for the store, resume and
distributed tests: the same model and batches in the test process, in a killed subprocess and on every rank."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from soulkit.influence import InfluenceAnalyzer, InfluenceStore, OutputLoss

VOCAB, WIDTH, T = 24, 12, 6
N_TRAIN, N_QUERIES, BATCH = 22, 3, 4  # 6 training batches, the last one of 2


class TinyLM(nn.Module):
    """Embedding, two tracked linear layers, an untracked ``lm_head``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.lm_head = nn.Linear(2 * WIDTH, VOCAB)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.up(torch.tanh(self.mix(self.embed(ids))))))


def data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=gen)
    return [{"input_ids": ids[i]} for i in range(n)]


def train_set() -> list[dict[str, torch.Tensor]]:
    return data(N_TRAIN, 1)


def query_set() -> list[dict[str, torch.Tensor]]:
    return data(N_QUERIES, 2)


def _logits(model, batch):
    return model(batch["input_ids"])[:, :-1]


def _loss(logits, batch):
    return F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none").sum(1)


def lm_loss(delay: float = 0.0) -> OutputLoss:
    """Summed next-token cross-entropy; ``delay`` seconds of sleep per forward make a run slow enough to kill."""
    if delay <= 0:
        return OutputLoss(_logits, _loss)

    def slow(model, batch):
        time.sleep(delay)
        return _logits(model, batch)

    return OutputLoss(slow, _loss)


def analyzer(model: nn.Module | None = None, *, solver: str = "ekfac", delay: float = 0.0) -> InfluenceAnalyzer:
    return InfluenceAnalyzer(model if model is not None else TinyLM(), lm_loss(delay), solver=solver, batch_size=BATCH,
                             progress=False)


def store(directory, **kw) -> InfluenceStore:
    """A store that checkpoints after every batch and scores one batch per chunk (many resume points)."""
    return InfluenceStore(directory, **{"chunk_batches": 1, "checkpoint_seconds": 0.0, **kw})


def run(directory, *, per_token: bool = False, delay: float = 0.0, **kw) -> torch.Tensor:
    """EK-FAC fit and scores of the tiny LM with a store in ``directory``."""
    st = store(directory, **kw)
    an = analyzer(delay=delay)
    return an.fit(train_set(), store=st).scores(train_set(), query_set(), per_token=per_token, store=st)


if __name__ == "__main__":  # the killed run: python -m tests.influence._tiny_lm STORE_DIR DELAY_S
    import sys

    torch.set_num_threads(1)
    run(sys.argv[1], delay=float(sys.argv[2]))
