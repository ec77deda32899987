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
