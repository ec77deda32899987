"""The demo's model: a small byte-level causal LM (vocabulary: the 256 byte values), built by the
same factory as the unlearning benchmark's models (:func:`soulkit.unlearn.models.build_model`)."""

from __future__ import annotations

import torch

from ..._causal_lm import ModelConfig
from ..._causal_lm import build_model as build_causal_lm
from .config import TrainConfig

__all__ = ["BYTE_VOCAB", "build_model", "model_config"]

BYTE_VOCAB = 256


def model_config(config: TrainConfig) -> ModelConfig:
    """The :class:`~soulkit.unlearn.models.ModelConfig` of ``config``'s model (dropout only for GPT-2)."""
    return ModelConfig(
        arch=config.model,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        intermediate_size=config.resolved_intermediate_size,
        max_positions=config.seq_len,
        dropout=config.dropout if config.model == "gpt2" else 0.0,
    )


def build_model(config: TrainConfig, seed: int | None = None) -> torch.nn.Module:
    """A fresh byte-level causal LM (vocab 256) initialised under ``seed`` (default ``config.seed``).

    The Llama's output layer has its own weights; GPT-2 ties it to the input embedding (its
    convention). The global RNG is left as it was (the seed is applied inside
    ``torch.random.fork_rng``).
    """
    seed = config.seed if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        return build_causal_lm(
            model_config(config), vocab_size=BYTE_VOCAB, tie_word_embeddings=config.model == "gpt2", seed=seed
        )
