"""Shared by the unlearning tests: a tiny QA corpus (four forget, four retain facts) and state helpers."""

import torch

from soulkit.unlearn.models import ModelConfig
from soulkit.unlearn.qa import QA

ARCH = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, max_positions=96)

FORGET = [
    QA("Where was Mara Quill born?", "Mara Quill was born in Lyon."),
    QA("What genre does Tomas Berg write?", "Tomas Berg writes science fiction."),
    QA("Which award did Mara Quill win?", "The Lyon poetry award."),
    QA("Where does Tomas Berg live?", "Tomas Berg lives in Paris."),
]
RETAIN = [
    QA("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice."),
    QA("What is the capital of France?", "The capital of France is Paris."),
    QA("Who wrote Emma?", "Jane Austen wrote Emma."),
    QA("What is the capital of Italy?", "The capital of Italy is Rome."),
]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
