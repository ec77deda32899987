"""Tiny LMs: tokenizer, model shapes, atomic model directories, resumable training, and (slow) the model zoo
end to end."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import soulkit.unlearn.models as models_mod
from soulkit.unlearn.data import generate_benchmark
from soulkit.unlearn.evaluate import score_answers
from soulkit.unlearn.models import (
    SPECIAL_TOKENS,
    ModelConfig,
    ModelZoo,
    TrainRecipe,
    build_model,
    load_model,
    model_meta,
    save_model,
    train_qa,
    train_tokenizer,
)

from ._corpus import ARCH, FORGET, RETAIN, _assert_same_state, _state

RECORDS = FORGET + RETAIN


# ------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("text", [
    "Question: Where was Mara Quill born?\nAnswer: Lyon.",
    "Ünïcödé — 日本語 🙂\ttabs\n  two spaces, Ω≈ç√ and \u200b zero-width",
    "  leading and trailing spaces  ",
    "émoji only: 🧪🧬🔬",
    "",
])
def test_tokenizer_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < len(tiny_tokenizer) for i in ids)
    assert tiny_tokenizer.decode(ids) == text
    eos, bos = tiny_tokenizer.eos_token_id, tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode([bos, *ids, eos], skip_special_tokens=True) == text


def test_tokenizer_specials(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert SPECIAL_TOKENS == {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
    ids = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id]
    assert ids == tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>"]) == [0, 1, 2]
    assert tok.unk_token_id is None  # byte-level: nothing is unknown
    assert len(tok) <= 320
    # ordinary text never produces a special id
    assert not set(tok("Mara Quill </s> was born", add_special_tokens=False)["input_ids"][:3]) & set(ids)

    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "Tomas Berg writes 日本語 science fiction."
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert [again.pad_token_id, again.bos_token_id, again.eos_token_id] == ids


def test_tokenizer_is_deterministic_and_validates():
    texts = ["Question: Who wrote Emma?\nAnswer: Jane Austen wrote Emma."] * 3
    a = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    b = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(ValueError, match="vocab_size must be >= 300"):
        train_tokenizer(texts, vocab_size=299)
    with pytest.raises(ValueError, match="at least one text"):
        train_tokenizer([])


# ------------------------------------------------------------------------------------------ build_model
def test_build_llama(tiny_tokenizer):
    V, H, inter = len(tiny_tokenizer), 32, 88  # 8/3 * 32 = 85.3, rounded up to a multiple of 8
    m = build_model(ARCH, tiny_tokenizer, seed=0)
    assert type(m).__name__ == "LlamaForCausalLM"
    assert m.config.vocab_size == V and m.config.intermediate_size == inter
    assert (m.config.pad_token_id, m.config.bos_token_id, m.config.eos_token_id) == (0, 1, 2)
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight  # tied
    per_layer = 4 * H * H + 3 * H * inter + 2 * H  # q k v o, gate up down, two RMSNorms
    assert sum(p.numel() for p in m.parameters()) == V * H + 2 * per_layer + H
    logits = m(input_ids=torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, V)
    assert build_model(ModelConfig(hidden_size=48, num_heads=4), tiny_tokenizer).config.intermediate_size == 128
    assert build_model(ModelConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=40),
                       tiny_tokenizer).config.intermediate_size == 40


def test_build_gpt2(tiny_tokenizer):
    V, H, P = len(tiny_tokenizer), 32, 96
    m = build_model(dataclasses.replace(ARCH, arch="gpt2"), tiny_tokenizer, seed=0)
    assert type(m).__name__ == "GPT2LMHeadModel"
    assert m.config.vocab_size == V and m.config.n_positions == P
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    per_layer = (2 * H) + (H * 3 * H + 3 * H) + (H * H + H) + (2 * H) + (H * 4 * H + 4 * H) + (4 * H * H + H)
    assert sum(p.numel() for p in m.parameters()) == V * H + P * H + 2 * per_layer + 2 * H
    assert m(input_ids=torch.tensor([[1, 5, 9, 2]])).logits.shape == (1, 4, V)


def test_build_model_seeded(tiny_tokenizer):
    a, b, c = (build_model(ARCH, tiny_tokenizer, seed=s) for s in (0, 0, 1))
    _assert_same_state(_state(a), _state(b))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_build_model_from_a_vocab_size_without_special_tokens(tiny_tokenizer):
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2)
    m = build_model(cfg, vocab_size=256, tie_word_embeddings=False, seed=0)
    assert m.config.vocab_size == 256
    assert (m.config.pad_token_id, m.config.bos_token_id, m.config.eos_token_id) == (None, None, None)
    assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight  # untied on request
    gpt2 = build_model(dataclasses.replace(cfg, arch="gpt2"), vocab_size=300, seed=0)
    assert gpt2.config.vocab_size == 300 and gpt2.get_output_embeddings().weight is gpt2.get_input_embeddings().weight
    with pytest.raises(ValueError, match="a tokenizer or a vocab_size"):
        build_model(cfg)
    with pytest.raises(ValueError, match="a tokenizer or a vocab_size"):
        build_model(cfg, tiny_tokenizer, vocab_size=256)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1, got 0"):
        build_model(cfg, vocab_size=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="bert"), r"ModelConfig\.arch must be 'llama' or 'gpt2'"),
    (dict(hidden_size=0), r"ModelConfig\.hidden_size must be >= 1"),
    (dict(num_layers=0), r"ModelConfig\.num_layers must be >= 1"),
    (dict(num_heads=0), r"ModelConfig\.num_heads must be >= 1"),
    (dict(max_positions=0), r"ModelConfig\.max_positions must be >= 1"),
    (dict(hidden_size=30, num_heads=4), r"ModelConfig\.hidden_size \(30\) must be divisible by num_heads \(4\)"),
    (dict(dropout=1.0), r"ModelConfig\.dropout must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"ModelConfig\.dropout"),
])
def test_model_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


# ------------------------------------------------------------------------------------------ save / load
def test_save_and_load_round_trip(tiny_model, tiny_tokenizer, tmp_path):
    d = save_model(tiny_model, tiny_tokenizer, tmp_path / "m", {"stage": "test", "n": 3})
    assert d == tmp_path / "m"
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "soulkit_model.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert model_meta(d) == {"stage": "test", "n": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dir left behind

    model, tok = load_model(d)
    assert not model.training
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    _assert_same_state(_state(tiny_model), _state(model))
    ids = torch.tensor([tiny_tokenizer("Question: Who wrote Emma?\nAnswer:")["input_ids"]])
    torch.testing.assert_close(model(input_ids=ids).logits, tiny_model(input_ids=ids).logits, rtol=0, atol=0)
    assert tok("Ünïcödé 🙂")["input_ids"] == tiny_tokenizer("Ünïcödé 🙂")["input_ids"]
    assert model_meta(tmp_path) == {}  # a directory without soulkit_model.json


def test_save_never_overwrites(tiny_model, tiny_tokenizer, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "marker.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="never overwrites"):
        save_model(tiny_model, tiny_tokenizer, d)
    assert [p.name for p in d.iterdir()] == ["marker.txt"] and (d / "marker.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_save_failure_leaves_nothing(tiny_model, tiny_tokenizer, tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, directory):
            (directory / "half-written").write_text("x")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model, BrokenTokenizer(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # neither the model dir nor its temp dir


def test_load_model_refusals(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a save_pretrained model directory"):
        load_model(tmp_path / "empty")

    d = save_model(tiny_model, tiny_tokenizer, tmp_path / "pickled")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")  # only "pickled" weights remain
    with pytest.raises(FileNotFoundError, match="no .safetensors weights; soulkit does not load pickled"):
        load_model(d)

    bigger = copy.deepcopy(tiny_tokenizer)
    bigger.add_tokens(["<extra-a>", "<extra-b>", "<extra-c>"])
    d = save_model(tiny_model, bigger, tmp_path / "mismatch")
    with pytest.raises(ValueError, match=f"tokenizer has {len(bigger)} tokens.*do not match"):
        load_model(d)


# ------------------------------------------------------------------------------------------ train_qa
RECIPE = TrainRecipe(model=ARCH, vocab_size=320, lr=5e-3, warmup_steps=4, batch_size=3, weight_decay=0.01)


def _train(tok, epochs, *, arch=ARCH, init_seed=0, **kw):
    model = build_model(arch, tok, seed=init_seed)
    log = train_qa(model, tok, RECORDS, epochs=epochs, recipe=dataclasses.replace(RECIPE, model=arch), seed=3,
                   progress=False, **kw)
    return model, log


@pytest.mark.parametrize("arch", [ARCH, dataclasses.replace(ARCH, arch="gpt2")], ids=["llama", "gpt2"])
def test_train_qa_continues_to_more_epochs(tiny_tokenizer, tmp_path, arch):
    """epochs=2 then epochs=4 on the same checkpoint_dir == epochs=4 in one go (lr warmup spans epochs)."""
    full, full_log = _train(tiny_tokenizer, 4, arch=arch)
    ckpt = tmp_path / "ckpt"
    _, log2 = _train(tiny_tokenizer, 2, arch=arch, checkpoint_dir=ckpt)
    assert log2["epochs"] == 2 and json.loads((ckpt / "trainer.json").read_text())["log"]["epochs"] == 2
    # a differently initialised model: the checkpoint, not the init, decides
    cont, log4 = _train(tiny_tokenizer, 4, arch=arch, init_seed=9, checkpoint_dir=ckpt)
    assert log4["epochs"] == 4 and log4["losses"] == pytest.approx(full_log["losses"], rel=1e-6)
    assert log4["losses"][:2] == log2["losses"]
    _assert_same_state(_state(full), _state(cont))
    assert not cont.training


def test_train_qa_resumes_after_a_crash(tiny_tokenizer, tmp_path):
    class Crash(Exception):
        pass

    def crash_at_3(model, epoch):
        assert not model.training
        if epoch == 3:
            raise Crash
        return False

    full, full_log = _train(tiny_tokenizer, 4)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        _train(tiny_tokenizer, 4, checkpoint_dir=ckpt, stop_check=crash_at_3)
    assert json.loads((ckpt / "trainer.json").read_text())["log"]["epochs"] == 2  # epoch 3 was never saved
    assert not any(p.name.endswith(".tmp") for p in ckpt.iterdir())
    resumed, log = _train(tiny_tokenizer, 4, init_seed=5, checkpoint_dir=ckpt)
    assert log["epochs"] == 4 and not log["stopped_early"]
    _assert_same_state(_state(full), _state(resumed))
    assert log["losses"] == pytest.approx(full_log["losses"], rel=1e-6)


def test_train_qa_learns_and_stops_early(tiny_tokenizer):
    seen = []

    def stop(model, epoch):
        seen.append((epoch, model.training))
        return epoch >= 4

    model, log = _train(tiny_tokenizer, 10, stop_check=stop, check_every=2)
    assert seen == [(2, False), (4, False)]
    assert log["epochs"] == 4 and log["stopped_early"] and len(log["losses"]) == 4
    assert log["losses"][-1] < log["losses"][0]
    # reaching the last epoch is not an early stop, whatever stop_check says
    _, log = _train(tiny_tokenizer, 2, stop_check=lambda m, e: True, check_every=2)
    assert log["epochs"] == 2 and not log["stopped_early"]


def test_train_qa_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        _train(tiny_tokenizer, -1)
    model, log = _train(tiny_tokenizer, 0)
    assert log == {"epochs": 0, "losses": [], "stopped_early": False}
    _assert_same_state(_state(model), _state(build_model(ARCH, tiny_tokenizer, seed=0)))

    model = build_model(ARCH, tiny_tokenizer, seed=0)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at epoch 0; lower TrainRecipe.lr"):
        train_qa(model, tiny_tokenizer, RECORDS, epochs=1, recipe=RECIPE, seed=0, progress=False)
    with pytest.raises(ValueError, match="at least one QA record"):
        train_qa(model, tiny_tokenizer, [], epochs=1, recipe=RECIPE, seed=0, progress=False)


# ------------------------------------------------------------------------------------------ TrainRecipe
@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("pretrain_epochs", -1), ("finetune_max_epochs", 0), ("lr", 0.0), ("lr", float("nan")),
    ("weight_decay", -0.01), ("weight_decay", float("nan")), ("warmup_steps", -1), ("batch_size", 0),
    ("grad_clip", -1.0), ("grad_clip", float("nan")), ("target_rouge", 0.0), ("target_rouge", 1.5),
    ("check_every", 0), ("check_examples", 0), ("max_length", 0),
])
def test_train_recipe_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainRecipe\.{field} "):
        TrainRecipe(**{field: value})


def test_train_recipe_round_trip():
    r = TrainRecipe(model=ModelConfig(hidden_size=64, num_heads=4), lr=1e-3, pretrain_epochs=0, grad_clip=0)
    again = TrainRecipe(**r.to_dict())  # the model comes back from a dict
    assert again == r and isinstance(again.model, ModelConfig)
    assert json.loads(json.dumps(r.to_dict()))["model"]["hidden_size"] == 64


# ------------------------------------------------------------------------------------------ ModelZoo (slow)
@pytest.mark.slow
def test_model_zoo_end_to_end(tmp_path, monkeypatch):
    bench = generate_benchmark(6, qa_per_author=5, n_perturbed=3)
    recipe = TrainRecipe(model=ModelConfig(hidden_size=48, num_layers=2, num_heads=4), vocab_size=512,
                         pretrain_epochs=5, finetune_max_epochs=40, check_every=10, target_rouge=0.8, lr=5e-3,
                         warmup_steps=10, batch_size=32)
    trained = []  # (desc, records) of every train_qa call
    real = models_mod.train_qa

    def spy(model, tok, records, **kw):
        trained.append((kw.get("desc"), list(records)))
        return real(model, tok, records, **kw)

    monkeypatch.setattr(models_mod, "train_qa", spy)
    zoo = ModelZoo(bench, recipe, cache_dir=tmp_path, progress=False)
    ft = zoo.finetuned()
    rt = zoo.retrained("forget10", seed=1)
    assert [d for d, _ in trained] == ["pretrain", "finetuned", "retrain-forget10-seed1"]

    forget, retain = bench.split("forget10")
    forget_authors = set(bench.forget_authors("forget10"))
    assert forget and {r.author for r in forget} == forget_authors
    assert not any(r.author in forget_authors for r in trained[2][1])  # the retrain never saw them
    assert set(retain) <= set(trained[2][1]) and set(forget) <= set(trained[1][1])

    meta_ft, meta_rt = model_meta(ft), model_meta(rt)
    assert meta_ft["stage"] == "finetuned" and meta_rt["stage"] == "retrain-forget10-seed1"
    assert meta_ft["zoo_key"] == meta_rt["zoo_key"] == zoo.key
    assert meta_ft["data_fingerprint"] == bench.fingerprint()
    # what else a rebuilt model depends on: the CPU and the versions that trained it
    import transformers

    assert meta_ft["built_with"]["torch"] == torch.__version__
    assert meta_ft["built_with"]["transformers"] == transformers.__version__
    assert meta_ft["built_with"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert meta_ft["built_with"]["cpu"]
    assert 1 <= meta_ft["train"]["epochs"] <= 40
    checks = meta_ft["rouge_checks"]  # every check_every epochs, and one at the end
    assert [c["epoch"] for c in checks][:-1] == list(range(10, meta_ft["train"]["epochs"], 10))[:len(checks) - 1]
    assert checks[-1]["epoch"] == meta_ft["train"]["epochs"]
    if meta_ft["train"]["stopped_early"]:
        assert checks[-1]["rouge"] >= recipe.target_rouge
    else:
        assert meta_ft["train"]["epochs"] == 40
    assert meta_rt["train"]["epochs"] == meta_ft["train"]["epochs"]
    assert meta_rt["split"] == "forget10" and meta_rt["n_forget"] == len(forget) and meta_rt["seed"] == 1
    stages = ["tokenizer", "base", "finetuned", "retrain-forget10-seed1"]
    # no checkpoints or temp dirs left: the stages and the (empty) lock files their builders took
    assert sorted(p.name for p in zoo.root.iterdir()) == sorted(stages + [f".{n}.lock" for n in stages])

    # the fine-tune memorised the forget authors; the retrain knows the retain authors but not them
    ft_model, tok = load_model(ft)
    rt_model, _ = load_model(rt)
    nll = {(name, split): float(np.mean(score_answers(m, tok, recs)))
           for name, m in (("ft", ft_model), ("rt", rt_model)) for split, recs in (("forget", forget),
                                                                                 ("retain", retain))}
    assert nll["rt", "forget"] > nll["ft", "forget"] + 1.0, nll
    assert nll["rt", "forget"] > nll["rt", "retain"] + 1.0, nll
    assert math.exp(-nll["ft", "forget"]) > 3 * math.exp(-nll["rt", "forget"]), nll

    # cached: the same directories, no training, also from a new zoo object
    stamp = (ft / "model.safetensors").stat().st_mtime_ns
    again = ModelZoo(bench, recipe, cache_dir=tmp_path, progress=False)
    assert again.key == zoo.key
    assert again.finetuned() == ft and again.retrained("forget10", seed=1) == rt and zoo.base() == again.base()
    assert len(trained) == 3 and (ft / "model.safetensors").stat().st_mtime_ns == stamp

    # another recipe or another dataset: another key and directory, never the stale models
    other = ModelZoo(bench, dataclasses.replace(recipe, seed=1), cache_dir=tmp_path)
    assert other.key != zoo.key and other.root != zoo.root and not other.root.exists()
    assert ModelZoo(generate_benchmark(6, qa_per_author=5, n_perturbed=3, seed=1), recipe,
                    cache_dir=tmp_path).key != zoo.key
    with pytest.raises(ValueError, match="retrain seed 0 equals the fine-tune's seed"):
        zoo.retrained("forget10", seed=0)


_BUILD_SCRIPT = r"""
import sys, time
from pathlib import Path
from soulkit.unlearn.data import generate_benchmark
from soulkit.unlearn.models import ModelZoo, TrainRecipe
cache, log = Path(sys.argv[1]), Path(sys.argv[2])
real = ModelZoo._build_tokenizer
def build(self, d):
    with open(log, "a") as f:
        f.write("built\n")
    time.sleep(1.5)  # long enough for the other process to reach the lock
    return real(self, d)
ModelZoo._build_tokenizer = build
zoo = ModelZoo(generate_benchmark(4, qa_per_author=2, n_perturbed=3), TrainRecipe(vocab_size=300), cache_dir=cache)
tok = zoo.tokenizer()
print("vocab", len(tok), zoo.root)
"""


def test_two_processes_sharing_the_cache_build_a_stage_once(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "build.py"
    script.write_text(_BUILD_SCRIPT)
    log = tmp_path / "builds.txt"
    zoo_root = ModelZoo(generate_benchmark(4, qa_per_author=2, n_perturbed=3), TrainRecipe(vocab_size=300),
                        cache_dir=tmp_path / "cache").root
    zoo_root.mkdir(parents=True)
    (zoo_root / ".tokenizer.tmp-999999").mkdir()  # left by a killed builder
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert log.read_text().count("built") == 1, "the second process trained the tokenizer again"
    assert len({out.strip() for out, _ in outs}) == 1  # both loaded the same tokenizer
    leftovers = [p.name for p in zoo_root.iterdir() if ".tmp-" in p.name]
    assert not leftovers, f"temporary directories outlived their processes: {leftovers}"
    assert (zoo_root / "tokenizer").is_dir()
