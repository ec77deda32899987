"""Small transformers causal LMs built from scratch: :class:`ModelConfig` and :func:`build_model`.

One factory for every tiny model soulkit trains: the fictitious-author benchmark's models
(:mod:`soulkit.unlearn.models`, which re-exports both names; vocabulary and special tokens from a
trained tokenizer) and the byte-level demo LM (:mod:`soulkit.demos.lm`; 256 byte values, no special
tokens). It lives outside both packages so that the demo does not import :mod:`soulkit.unlearn`,
whose optional dependencies (the ``unlearn`` extra) the training demo does not need.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["ARCHS", "ModelConfig", "build_model"]

ARCHS = ("llama", "gpt2")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a tiny causal LM. ``arch``: ``"llama"`` (default) or ``"gpt2"``."""

    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int | None = None  # default 4 * hidden (gpt2) / ~2.7 * hidden (llama)
    max_positions: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch must be {' or '.join(map(repr, ARCHS))}, got {self.arch!r}")
        for name in ("hidden_size", "num_layers", "num_heads", "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(config: ModelConfig, tokenizer=None, *, vocab_size: int | None = None,
                tie_word_embeddings: bool = True, seed: int = 0):
    """A freshly initialised transformers causal LM (``LlamaForCausalLM`` / ``GPT2LMHeadModel``).

    The vocabulary comes from ``tokenizer`` (its length and its bos/eos/pad ids) or, without one, from
    ``vocab_size`` (no special tokens: e.g. 256 byte values). ``tie_word_embeddings``: the output
    layer shares the input embedding. The weights are drawn after ``torch.manual_seed(seed)`` (the
    global RNG is left seeded; wrap the call in ``torch.random.fork_rng`` to keep it).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if (tokenizer is None) == (vocab_size is None):
        raise ValueError("build_model needs a tokenizer or a vocab_size (exactly one of them)")
    if tokenizer is not None:
        common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        common = dict(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    if config.arch == "llama":
        inter = config.intermediate_size or int(8 * config.hidden_size / 3 + 7) // 8 * 8
        cfg = LlamaConfig(hidden_size=config.hidden_size, intermediate_size=inter,
                          num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                          num_key_value_heads=config.num_heads, max_position_embeddings=config.max_positions,
                          attention_dropout=config.dropout, tie_word_embeddings=tie_word_embeddings, **common)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
                         n_inner=config.intermediate_size, n_positions=config.max_positions,
                         resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                         tie_word_embeddings=tie_word_embeddings, **common)
        model = GPT2LMHeadModel(cfg)
    return model
