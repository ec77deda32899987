"""`soulkit influence` end to end on a tiny saved GPT-2 and JSONL files (no download)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from soulkit.cli import main
from soulkit.influence import InfluenceAnalyzer
from soulkit.influence.lm_command import lm_loss

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "[PAD] [UNK] the cat dog sat on mat a red blue ran Q: A: is what".split()
TRAIN = ["the cat sat on the mat", "a dog ran", "the red cat ran on a blue mat", "what is a mat",
         "the dog sat on a red mat"]
QUERIES = ["the cat sat", "a blue dog ran"]
PAIRS = [("Q: what sat A:", " the cat sat"), ("Q: what ran A:", " a dog ran")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("model")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=None, eos_token_id=None, pad_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _hashes(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def files(tmp_path):
    return (_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TRAIN]),
            _jsonl(tmp_path / "queries.jsonl", [{"text": t} for t in QUERIES]))


def _run(model_dir, train, queries, out, *extra):
    return main(["influence", str(model_dir), "--train", str(train), "--queries", str(queries), "--out", str(out),
                 "--no-progress", "--batch-size", "2", *extra])


def _ids(text):
    return [WORDS.index(w) for w in text.split()]


def _batches(seqs, batch_size=2):
    """Right-padded batches built here, independently of the command: (ids, labels) per sequence."""
    def collate(ex):
        T = max(len(i) for i, _ in ex)
        ids = torch.zeros(len(ex), T, dtype=torch.long)
        labels = torch.full((len(ex), T), -100)
        mask = torch.zeros(len(ex), T, dtype=torch.long)
        for r, (i, lab) in enumerate(ex):
            ids[r, : len(i)], labels[r, : len(i)], mask[r, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return DataLoader(seqs, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _direct(model_dir, train, queries, solver="ekfac", **kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    modules = None
    if solver == "identity":
        from soulkit.influence.modules import tracked_modules

        modules = [t.name for t in tracked_modules(model)]
    an = InfluenceAnalyzer(model, lm_loss(), solver=solver, modules=modules, batch_size=2, progress=False)
    tr = _batches(train)
    return an.fit(tr).scores(tr, _batches(queries), **kw)


def _load(out):
    from safetensors.torch import load_file

    return load_file(str(out / "scores.safetensors")), [json.loads(x) for x in (out / "topk.jsonl").read_text()
                                                          .splitlines()]


def test_scores_and_topk_match_the_analyzer_and_the_model_is_untouched(model_dir, files, tmp_path, capsys):
    before = _hashes(model_dir)
    out = tmp_path / "out"
    assert _run(model_dir, *files, out, "--top-k", "2") == 0
    assert _hashes(model_dir) == before
    tensors, topk = _load(out)
    s = tensors["scores"]
    assert s.dtype == torch.float32 and s.shape == (len(QUERIES), len(TRAIN)) and "per_token" not in tensors
    seqs = lambda texts: [(_ids(t), _ids(t)) for t in texts]  # noqa: E731
    torch.testing.assert_close(s, _direct(model_dir, seqs(TRAIN), seqs(QUERIES)).float(), rtol=1e-5, atol=1e-6)
    assert len(topk) == len(QUERIES)
    for i, line in enumerate(topk):
        assert line["query"] == i and line["text"] == QUERIES[i]
        assert [e["index"] for e in line["positive"]] == s[i].argsort(descending=True)[:2].tolist()
        assert line["positive"][0]["index"] == int(s[i].argmax())
        assert line["negative"][0]["index"] == int(s[i].argmin())
        assert all(e["text"] == TRAIN[e["index"]] and e["score"] == pytest.approx(float(s[i, e["index"]]))
                   for e in line["positive"] + line["negative"])
    run = json.loads((out / "run.json").read_text())
    assert run["solver"] == "ekfac" and run["top_k"] == 2 and run["train"] == str(files[0])
    report = (out / "report.md").read_text()
    assert "ekfac" in report and f"{len(TRAIN)} from" in report and TRAIN[int(s[0].argmax())] in report
    # results present: refused without --overwrite, nothing changed; replaced with it
    mtime = (out / "scores.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert _run(model_dir, *files, out, "--solver", "kfac") == 1
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and "\n" not in err
    assert (out / "scores.safetensors").stat().st_mtime_ns == mtime
    assert _run(model_dir, *files, out, "--solver", "kfac", "--overwrite") == 0
    assert json.loads((out / "run.json").read_text())["solver"] == "kfac"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary directory left


def test_per_token_scores_sum_to_the_sequence_scores_and_name_tokens(model_dir, files, tmp_path):
    out = tmp_path / "out"
    assert _run(model_dir, *files, out, "--per-token", "--solver", "identity", "--top-k", "1",
                "--top-tokens", "3") == 0
    tensors, topk = _load(out)
    s, st = tensors["scores"], tensors["per_token"]
    T = max(len(t.split()) for t in TRAIN)
    assert st.shape == (len(QUERIES), len(TRAIN), T)
    torch.testing.assert_close(st.sum(-1), s)
    seqs = [(_ids(t), _ids(t)) for t in TRAIN]
    direct = _direct(model_dir, seqs, [(_ids(t), _ids(t)) for t in QUERIES], solver="identity")
    torch.testing.assert_close(s, direct.float(), rtol=1e-4, atol=1e-5 * direct.abs().max().item())
    for j, t in enumerate(TRAIN):
        assert torch.all(st[:, j, len(t.split()):] == 0)  # padding carries nothing
    for i, line in enumerate(topk):
        ex = line["positive"][0]
        words = TRAIN[ex["index"]].split()
        assert len(ex["tokens"]) == 3
        assert [tk["token"] for tk in ex["tokens"]] == [words[tk["position"]] for tk in ex["tokens"]]
        per = st[i, ex["index"]]
        assert [tk["position"] for tk in ex["tokens"]] == per[: len(words)].argsort(descending=True)[:3].tolist()
        neg = line["negative"][0]
        assert neg["tokens"][0]["position"] == int(st[i, neg["index"], : len(TRAIN[neg["index"]].split())].argmin())


def test_completion_only_queries_exclude_the_prompt(model_dir, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TRAIN[:3]]
                   + [{"prompt": p, "completion": c, "text": p + c} for p, c in PAIRS])
    queries = _jsonl(tmp_path / "q.jsonl", [{"prompt": p, "completion": c, "text": p + c} for p, c in PAIRS])
    flags = ["--prompt-field", "prompt", "--completion-field", "completion", "--solver", "kfac"]
    assert _run(model_dir, train, queries, tmp_path / "masked", *flags) == 0
    assert _run(model_dir, train, queries, tmp_path / "full", "--solver", "kfac") == 0
    masked, topk = _load(tmp_path / "masked")
    full, _ = _load(tmp_path / "full")
    assert topk[0]["prompt"] == PAIRS[0][0] and topk[0]["completion"] == PAIRS[0][1]

    def pair(p, c):
        return _ids(p) + _ids(c), [-100] * len(_ids(p)) + _ids(c)

    # training: the first three are scored whole, the pairs on their completion (they have the fields; their
    # text field is what the run without --prompt-field/--completion-field scores)
    tr = [(_ids(t), _ids(t)) for t in TRAIN[:3]] + [pair(p, c) for p, c in PAIRS]
    torch.testing.assert_close(masked["scores"], _direct(model_dir, tr, [pair(p, c) for p, c in PAIRS],
                                                         solver="kfac").float(), rtol=1e-5, atol=1e-6)
    # the run without the fields scored every token of queries and training pairs
    assert not torch.allclose(masked["scores"], full["scores"])
    # the query loss counts the completion's tokens only
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    p, c = PAIRS[0]
    batch = next(iter(_batches([pair(p, c)], 1)))
    with torch.no_grad():
        got = lm_loss()(model, batch)
        logp = F.log_softmax(model(input_ids=batch["input_ids"]).logits[0], -1)
    ids, n_p = batch["input_ids"][0], len(_ids(p))
    want = -sum(logp[t - 1, ids[t]] for t in range(n_p, len(ids)))
    everything = -sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))
    torch.testing.assert_close(got[0], want)
    assert float(everything) > float(want) + 1e-3


def _bad_cases(tmp_path, model_dir, train, queries):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    no_field = _jsonl(tmp_path / "nofield.jsonl", [{"text": "the cat"}, {"body": "a dog"}])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "the cat"}\n{"text": "a dog"\n')
    no_config = tmp_path / "noconfig"
    no_config.mkdir()
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    return {
        "missing train": ([tmp_path / "nope.jsonl", queries], [], "nope.jsonl"),
        "empty queries": ([train, empty], [], "empty"),
        "missing field": ([no_field, queries], [], "line 2"),
        "invalid json": ([train, broken], [], "broken.jsonl line 2"),
        "no config": ([train, queries], ["MODEL", no_config], "config.json"),
        "no safetensors": ([train, queries], ["MODEL", no_weights], "safetensors"),
        "top-k 0": ([train, queries], ["--top-k", "0"], "--top-k"),
        "chunk-batches 0": ([train, queries], ["--chunk-batches", "0"], "--chunk-batches"),
        "projection 0": ([train, queries], ["--projection", "0"], "--projection must be an int >= 1"),
        "store is a file": ([train, queries], ["--store", str(train)], "--store"),
        "unknown solver": ([train, queries], ["--solver", "cg"], "--solver"),
        "prompt without completion": ([train, queries], ["--prompt-field", "prompt"], "--completion-field"),
        "pair fields missing in a query": ([train, queries], ["--prompt-field", "p", "--completion-field", "c"],
                                           "line 1"),
    }


def test_bad_input_is_one_line_exit_1_and_nothing_written(model_dir, files, tmp_path, capsys):
    cases = _bad_cases(tmp_path, model_dir, *files)
    for name, (paths, extra, needle) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        mdir = model_dir
        if extra[:1] == ["MODEL"]:
            mdir, extra = extra[1], []
        capsys.readouterr()
        rc = _run(mdir, *paths, out, *extra)
        err = capsys.readouterr().err.strip()
        assert rc == 1, (name, err)
        assert err.startswith("soulkit: error:") and "\n" not in err, (name, err)
        assert needle in err, (name, err)
        assert not out.exists(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_tokenizer_that_does_not_match_the_model_is_refused(model_dir, files, tmp_path, capsys):
    small = tmp_path / "small"
    cfg = transformers.GPT2Config(vocab_size=4, n_positions=32, n_embd=8, n_layer=1, n_head=2, bos_token_id=None,
                                  eos_token_id=None)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(small)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(small)
    capsys.readouterr()
    assert _run(small, *files, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert "does not match the model" in err and "\n" not in err and not (tmp_path / "out").exists()


def test_help_lists_the_solvers(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["influence", "--help"]) == 0
    out = capsys.readouterr().out
    assert "ekfac (default), kfac, identity" in out and "--per-token" in out and "--prompt-field" in out


def _interrupting(monkeypatch, after):
    """Make the command's forward raise KeyboardInterrupt (Ctrl-C) once it has run ``after`` batches."""
    from soulkit.influence import lm_command

    real, calls = lm_command._logits, []

    def logits(model, batch):
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(1)
        return real(model, batch)

    monkeypatch.setattr(lm_command, "_logits", logits)
    return calls


def test_an_interrupted_run_resumes_from_its_store_with_the_same_results(model_dir, files, tmp_path, capsys,
                                                                         monkeypatch):
    ref = tmp_path / "ref"
    assert _run(model_dir, *files, ref, "--per-token", "--chunk-batches", "1") == 0
    out = tmp_path / "out"
    # 5 training sequences in batches of 2: 3 covariance + 3 EK-FAC batches, 1 query batch, 3 scored batches
    _interrupting(monkeypatch, 8)
    assert _run(model_dir, *files, out, "--per-token", "--chunk-batches", "1") == 130
    monkeypatch.undo()
    assert (out / "store" / "eigenvalue_corrections.safetensors").is_file()
    assert not any((out / name).exists() for name in ("scores.safetensors", "topk.jsonl", "run.json"))
    capsys.readouterr()
    # another solver or other training data is refused, one line, the store untouched
    before = _hashes(out)
    other_train = _jsonl(tmp_path / "other.jsonl", [{"text": t} for t in TRAIN[::-1]])
    for args, needle in (((files[0], files[1]), "method"), ((other_train, files[1]), "other training data")):
        extra = ("--solver", "kfac") if needle == "method" else ()
        assert _run(model_dir, *args, out, "--per-token", "--chunk-batches", "1", *extra) == 1
        err = capsys.readouterr().err.strip()
        assert needle in err and "--overwrite" in err and "\n" not in err
    assert _hashes(out) == before
    calls = _interrupting(monkeypatch, 100)
    assert _run(model_dir, *files, out, "--per-token", "--chunk-batches", "1") == 0
    assert "(resumed)" in capsys.readouterr().out
    assert len(calls) == 1 + 3 - 1  # the query batch and the two unscored chunks
    got, want = _load(out)[0], _load(ref)[0]
    assert torch.equal(got["scores"], want["scores"]) and torch.equal(got["per_token"], want["per_token"])
    assert (out / "topk.jsonl").read_text() == (ref / "topk.jsonl").read_text()
    # --overwrite starts the store over for another solver
    assert _run(model_dir, *files, out, "--solver", "kfac", "--overwrite") == 0
    assert json.loads((out / "store" / "store.json").read_text())["factors"]["method"] == "kfac"


@pytest.mark.slow  # two fresh interpreters importing transformers, one killed: ~15 s on two busy cores
def test_a_killed_command_rerun_gives_the_uninterrupted_results(model_dir, files, tmp_path):
    import os
    import sys
    from pathlib import Path

    from .._kill import kill_when

    root = Path(__file__).resolve().parents[2]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _run(model_dir, *files, ref, "--chunk-batches", "1") == 0
    args = ["influence", str(model_dir), "--train", str(files[0]), "--queries", str(files[1]), "--out", str(out),
            "--no-progress", "--batch-size", "2", "--chunk-batches", "1"]
    slow = ("import sys, time; from soulkit.influence import lm_command as c; f = c._logits; "
            "c._logits = lambda m, b: (time.sleep(0.2), f(m, b))[1]; from soulkit.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    kill_when([sys.executable, "-c", slow, *args], lambda: any((out / "store" / "scores").glob("chunk-*")),
              env=env, timeout=120, cwd=tmp_path)
    assert not (out / "scores.safetensors").exists()
    assert main(args) == 0
    assert torch.equal(_load(out)[0]["scores"], _load(ref)[0]["scores"])


@pytest.mark.slow  # torchrun starts two ranks importing transformers: ~16 s on two busy cores
@pytest.mark.distributed
def test_under_torchrun_two_ranks_write_the_single_process_results(model_dir, files, tmp_path):
    """K-FAC: EK-FAC on 5 sequences has rank-deficient covariances whose null-space eigenvectors (and so the
    refitted eigenvalues there) are arbitrary, so a change of summation order moves its scores by percents."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None or not torch.distributed.is_gloo_available():
        pytest.skip("needs torchrun and gloo")
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(model_dir, *files, one, "--solver", "kfac", "--chunk-batches", "1") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "soulkit", "influence",
                           str(model_dir), "--train", str(files[0]), "--queries", str(files[1]), "--out", str(two),
                           "--no-progress", "--batch-size", "2", "--chunk-batches", "1", "--solver", "kfac"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote") == 1 and "on 2 processes" in proc.stdout  # rank 0 reports and writes
    got, want = _load(two)[0]["scores"], _load(one)[0]["scores"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert [e["positive"][0]["index"] for e in _load(two)[1]] == [e["positive"][0]["index"] for e in _load(one)[1]]


def test_projection_keeps_training_gradients_that_new_queries_reuse(model_dir, files, tmp_path):
    train_path, queries_path = files
    store = tmp_path / "shared-store"
    seqs = lambda texts: [(_ids(t), _ids(t)) for t in texts]  # noqa: E731
    first = tmp_path / "first"
    assert _run(model_dir, train_path, queries_path, first, "--projection", "3", "--store", str(store)) == 0
    assert (store / "train_gradients.safetensors").is_file() and not (first / "store").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    an = InfluenceAnalyzer(model, lm_loss(), solver="ekfac", projection=3, batch_size=2, progress=False)
    tr = _batches(seqs(TRAIN))
    expected = an.fit(tr).scores(tr, _batches(seqs(QUERIES)))
    torch.testing.assert_close(_load(first)[0]["scores"], expected.float(), rtol=1e-5, atol=1e-6)
    # other queries against the same store: the factors and training gradients are read, not recomputed
    other = _jsonl(tmp_path / "other.jsonl", [{"text": t} for t in reversed(QUERIES)])
    before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    second = tmp_path / "second"
    assert _run(model_dir, train_path, other, second, "--projection", "3", "--store", str(store)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == before
    torch.testing.assert_close(_load(second)[0]["scores"], _load(first)[0]["scores"].flip(0))
    assert "projected to 3 x 3" in (second / "report.md").read_text()
