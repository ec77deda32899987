"""Shared fixtures: a tiny tokenizer and a tiny randomly initialised causal LM (no download)."""

import pytest
import torch

from soulkit.unlearn.models import ModelConfig, TrainRecipe, build_model, train_qa, train_tokenizer

from ._corpus import ARCH, FORGET, RETAIN

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


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and lose a lot when the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def memorised(tiny_tokenizer):
    """The tiny Llama after 60 full-batch AdamW epochs on FORGET + RETAIN (answer probability > 0.9)."""
    model = build_model(ARCH, tiny_tokenizer, seed=0)
    recipe = TrainRecipe(model=ARCH, vocab_size=320, lr=1e-2, warmup_steps=0, batch_size=8, weight_decay=0.0)
    train_qa(model, tiny_tokenizer, FORGET + RETAIN, epochs=60, recipe=recipe, seed=0, progress=False)
    return model.eval()
