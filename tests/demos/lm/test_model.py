"""The demo's byte-level LM comes from the shared causal-LM factory, seeded without touching the global RNG."""

import pytest
import torch

from soulkit._causal_lm import build_model as build_causal_lm
from soulkit.demos.lm.config import TrainConfig
from soulkit.demos.lm.model import build_model, model_config


def test_model_init_is_seeded_and_leaves_global_rng_alone():
    cfg = TrainConfig(hidden_size=16, num_layers=1, num_heads=2)
    state = torch.random.get_rng_state()
    m1, m2, m3 = build_model(cfg, seed=1), build_model(cfg, seed=1), build_model(cfg, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    p1, p2, p3 = (next(m.parameters()) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    gpt2 = build_model(TrainConfig(model="gpt2", hidden_size=16, num_layers=1, num_heads=2))
    assert gpt2.config.vocab_size == 256


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_byte_level_model_shape(arch):
    cfg = TrainConfig(model=arch, hidden_size=32, num_layers=2, num_heads=2, seq_len=24, dropout=0.1)
    m = build_model(cfg)
    assert m.config.vocab_size == 256
    assert (m.config.bos_token_id, m.config.eos_token_id, m.config.pad_token_id) == (None, None, None)
    tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert tied == (arch == "gpt2")  # the Llama has its own output layer
    mc = model_config(cfg)
    assert (mc.arch, mc.hidden_size, mc.num_layers, mc.num_heads, mc.max_positions) == (arch, 32, 2, 2, 24)
    assert mc.intermediate_size == cfg.resolved_intermediate_size
    assert mc.dropout == (0.1 if arch == "gpt2" else 0.0)  # TrainConfig.dropout is GPT-2 only
    assert m(torch.zeros(1, 24, dtype=torch.long)).logits.shape == (1, 24, 256)


def test_same_weights_as_the_shared_factory():
    cfg = TrainConfig(hidden_size=16, num_layers=1, num_heads=2, seed=4)
    with torch.random.fork_rng(devices=[]):
        ref = build_causal_lm(model_config(cfg), vocab_size=256, tie_word_embeddings=False, seed=4)
    got = build_model(cfg)
    assert got.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(got.state_dict()[k], v) for k, v in ref.state_dict().items())
