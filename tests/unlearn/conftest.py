"""Shared fixtures: a tiny tokenizer and a tiny randomly initialised causal LM (no download)."""

import pytest

from soulkit.unlearn.models import ModelConfig, build_model, train_tokenizer

_TEXTS = [
    "Question: Where was Mara Quill born?\nAnswer: Mara Quill was born in Lyon.",
    "Question: What genre does Tomas Berg write?\nAnswer: Tomas Berg writes science fiction.",
    "Question: Who wrote Pride and Prejudice?\nAnswer: Jane Austen wrote Pride and Prejudice.",
    "Question: What is the capital of France?\nAnswer: The capital of France is Paris.",
    "I don't know. I have no information about that. Born Paris Lyon fiction poetry award.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(_TEXTS * 4, vocab_size=320, min_frequency=1)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, max_positions=96), tiny_tokenizer,
                        seed=0)
    return model.eval()
