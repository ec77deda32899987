import pytest

from soulkit.demos.lm import ARMS, TrainConfig, run_training_demo

# a tiny configuration of the byte-level LM demo: 12 steps of a 1-layer model, a few seconds
TINY = dict(
    steps=12, batch_size=4, seq_len=32, hidden_size=32, num_layers=1, num_heads=2,
    eval_every=4, eval_batches=2, max_bytes=100_000, adamw_lr=1e-2, sophia_lr=1e-2, progress=False,
    optimizers=("adamw", "sophia"),
)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny run of every arm (AdamW, Sophia, Sophia with Hessian bias correction), written to a temporary
    directory: ``(TrainResult, out_dir)``."""
    out = tmp_path_factory.mktemp("train_lm")
    return run_training_demo(TrainConfig(**{**TINY, "optimizers": ARMS, "sophia_hbc_lr": 1e-2}), out_dir=out), out
