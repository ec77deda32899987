"""The ``soulkit`` command line: one-line errors with a non-zero exit, and a tiny ``soulkit train``."""

import json
import os
import subprocess
import sys

import pytest

from soulkit.cli import DEMO_STAGES, main

TINY = [
    "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--hidden-size", "16", "--layers", "1",
    "--heads", "2", "--eval-every", "2", "--eval-batches", "1", "--max-bytes", "20000", "--no-progress",
]


def _one_line_error(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (["train", "--steps", "-3"], 1, "TrainConfig.steps must be an int >= 1, got -3"),
        (["train", "--steps", "x"], 2, "invalid int value: 'x'"),
        (["train", "--optimizers", "adamw,sgd"], 1, "unknown optimizer 'sgd'"),
        (["train", "--model", "bert"], 1, "TrainConfig.model must be one of"),
        (["train", "--sophia-lr", "0"], 1, "TrainConfig.sophia_lr"),
        (["train", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["train", "--data", "/nonexistent/soulkit-data", "--steps", "1"], 1, "data_path does not exist"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        ([], 2, "required: COMMAND"),
        (["demo", "--only", "nope"], 1, "unknown demo stage nope"),
    ],
)
def test_errors_are_one_line(argv, code, needle, capsys):
    assert main(argv) == code
    line = _one_line_error(capsys)
    assert line.startswith("soulkit")
    assert needle in line


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert "soulkit" in capsys.readouterr().out


def test_train_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out), "--seed", "3"]) == 0
    stdout = capsys.readouterr().out
    assert "| adamw |" in stdout and "| sophia |" in stdout
    data = json.loads((out / "train_lm.json").read_text())
    assert data["config"]["seed"] == 3 and data["config"]["steps"] == 4
    assert (out / "train_lm.png").is_file() and (out / "train_lm.md").is_file()


def test_train_single_optimizer_gpt2(tmp_path, capsys):
    assert main(["train", *TINY, "--optimizers", "sophia", "--model", "gpt2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "train_lm.json").read_text())
    assert [a["spec"]["kind"] for a in data["arms"]] == ["sophia"]
    assert data["config"]["model"] == "gpt2"


def test_demo_stages_are_registered():
    assert [s.name for s in DEMO_STAGES][0] == "train"


def test_python_dash_m(tmp_path):
    # an argument error needs no torch import, so this stays fast in a fresh interpreter
    proc = subprocess.run(
        [sys.executable, "-m", "soulkit", "train", "--steps", "x"],
        capture_output=True, text=True, env=dict(os.environ), cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "soulkit train: error: argument --steps: invalid int value: 'x' (see 'soulkit train --help')"
    )
    assert proc.stdout == ""


# ------------------------------------------------------------------------------ choices from registries
def _help(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option: names are never wrapped
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_unlearn_help_lists_the_registries(capsys, monkeypatch):
    import soulkit.unlearn.unlearner as unlearner
    from soulkit.unlearn.data import AuthorBenchmark
    from soulkit.unlearn.objectives import OBJECTIVES
    from soulkit.unlearn.suite import SCALES

    def listed(names, default=None):
        return ", ".join(f"{n} (default)" if n == default else n for n in names)

    out = _help(["unlearn"], capsys, monkeypatch)
    assert f"unlearning objective: {listed(OBJECTIVES)}\n" in out
    assert f"optimizer: {listed(unlearner.OPTIMIZERS, 'sophia')}\n" in out
    assert f"Sophia's Hessian estimator: {listed(unlearner.ESTIMATORS, 'gnb')}\n" in out
    assert f"benchmark scale when no --data is given: {listed(SCALES, 'small')}\n" in out
    assert f"forget split: {listed(AuthorBenchmark.SPLITS, 'forget05')} (or" in out
    # a new registry entry shows up without touching the CLI
    monkeypatch.setitem(OBJECTIVES, "brand_new_objective", next(iter(OBJECTIVES.values())))
    monkeypatch.setattr(unlearner, "OPTIMIZERS", (*unlearner.OPTIMIZERS, "brand_new_optimizer"))
    monkeypatch.setattr(unlearner, "ESTIMATORS", (*unlearner.ESTIMATORS, "brand_new_estimator"))
    out = _help(["unlearn"], capsys, monkeypatch)
    assert "brand_new_objective" in out and "brand_new_optimizer" in out and "brand_new_estimator" in out
    assert all(name in _help(["data"], capsys, monkeypatch) for name in SCALES)


def test_train_help_lists_the_registries(capsys, monkeypatch):
    import soulkit.demos.lm.config as config

    out = _help(["train"], capsys, monkeypatch)
    assert "llama (default), gpt2" in out and "adamw, sophia, sophia-hbc" in out
    monkeypatch.setattr(config, "MODEL_KINDS", (*config.MODEL_KINDS, "brand_new_arch"))
    monkeypatch.setattr(config, "ARMS", (*config.ARMS, "brand_new_opt"))
    out = _help(["train"], capsys, monkeypatch)
    assert "brand_new_arch" in out and "brand_new_opt" in out


def _run(code: str, tmp_path, timeout=120):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          cwd=tmp_path, timeout=timeout)


def test_building_the_parser_imports_nothing_heavy(tmp_path):
    proc = _run("import sys; from soulkit.cli import build_parser; build_parser(); "
                "print([m for m in ('torch', 'soulkit.unlearn', 'soulkit.demos.lm') if m in sys.modules])", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ missing optional dependency
def _cli_without(modules, argv, tmp_path):
    """``soulkit ARGV`` in a fresh interpreter where ``modules`` cannot be imported (as if not installed)."""
    code = ("import sys\n"
            f"for m in {list(modules)!r}: sys.modules[m] = None\n"
            "from soulkit.cli import main\n"
            f"raise SystemExit(main({list(argv)!r}))\n")
    return _run(code, tmp_path)


@pytest.mark.parametrize(
    "blocked, argv, what",
    [
        (["rouge_score"], ["unlearn", "--method", "npo", "--out", "out"], "soulkit unlearn"),
        (["faker"], ["data", "--out", "out"], "soulkit data"),
        (["tokenizers"], ["evaluate", "model"], "soulkit evaluate"),
        (["rouge_score"], ["demo", "--only", "unlearn"], "the 'unlearn' stage of soulkit demo"),
    ],
)
def test_missing_extra_is_one_line_naming_it(blocked, argv, what, tmp_path):
    proc = _cli_without(blocked, argv, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"soulkit: error: '{blocked[0]}' is not installed; {what} needs the 'unlearn' extra: "
        "pip install 'soulkit[unlearn]'"
    )
    assert proc.stdout == "" and not (tmp_path / "out").exists()  # refused before any work


def test_demo_checks_every_stage_before_the_first_runs(tmp_path):
    proc = _cli_without(["faker"], ["demo", "--out", "demo-out"], tmp_path)
    assert proc.returncode == 1 and "the 'unlearn' stage of soulkit demo needs the 'unlearn' extra" in proc.stderr
    assert "==" not in proc.stdout and not (tmp_path / "demo-out").exists()  # the train stage did not start


def test_a_missing_module_raised_deep_in_a_command_names_its_extra(capsys, monkeypatch):
    import soulkit.cli as cli

    def deep(args):
        try:
            import sklearn.metrics  # noqa: F401
        except ImportError as e:
            raise RuntimeError("scoring failed") from e
        return 0

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setattr(cli, "_cmd_train", deep)
    assert main(["train"]) == 1
    assert _one_line_error(capsys) == (
        "soulkit: error: 'sklearn' is not installed; soulkit train needs the 'influence' extra: "
        "pip install 'soulkit[influence]'"
    )

    def required(args):
        import soulkit_no_such_module  # noqa: F401

    monkeypatch.setattr(cli, "_cmd_train", required)
    assert main(["train"]) == 1  # not an optional module: the plain message, as before
    assert _one_line_error(capsys) == "soulkit: error: No module named 'soulkit_no_such_module'"


def test_train_needs_no_unlearn_extra(tmp_path):
    proc = _run("import sys\n"
                "for m in ('faker', 'rouge_score', 'sklearn'): sys.modules[m] = None\n"
                "from soulkit.demos.lm import TrainConfig, build_model\n"
                "build_model(TrainConfig(hidden_size=16, num_layers=1, num_heads=2))\n"
                "print('soulkit.unlearn' in sys.modules)\n", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
