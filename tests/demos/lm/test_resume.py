"""``soulkit train`` resumes after a kill: checkpoints of every arm (weights, optimizer, LR scheduler, RNGs,
curves), a resumed run bit-identical to an uninterrupted one, an interrupted report rewritten without
retraining, and the command line's run record (the same command resumes, other options are refused,
``--overwrite`` starts over)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soulkit.cli import main
from soulkit.demos.lm import OptimizerSpec, TrainConfig, run_training_demo
from soulkit.demos.lm import loop as loop_mod
from soulkit.demos.lm import run as run_mod
from soulkit.demos.lm.loop import train_arms

from ..._kill import kill_when
from .conftest import TINY


class _Killed(Exception):
    """Stands for a kill in the middle of a run."""


def _curves(arms):
    return [(a.spec.label, a.eval_steps, a.val_loss, a.train_loss, a.refresh_steps, a.win_rate, a.diverged_at)
            for a in arms]


def _arm_states(ckpt: Path) -> dict:
    """Every file of a checkpoint: weights and trainer.json as bytes, optimizer.pt as tensors (weights_only)."""
    out = {}
    for arm in sorted(p for p in ckpt.iterdir()):
        out[arm.name] = {
            "weights": (arm / "model.safetensors").read_bytes(),
            "states": torch.load(arm / "optimizer.pt", weights_only=True),
            "info": {k: v for k, v in json.loads((arm / "trainer.json").read_text()).items() if k != "result"},
        }
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # nan == nan here


@pytest.mark.parametrize("model, dropout", [("llama", 0.0), ("gpt2", 0.1)])  # dropout draws from the torch RNG
def test_a_resumed_run_is_bit_identical(tmp_path, monkeypatch, model, dropout):
    torch.set_num_threads(1)
    config = TrainConfig(**TINY, model=model, dropout=dropout)
    whole, _, _ = train_arms(config, checkpoint_dir=tmp_path / "whole", checkpoint_every=4)

    # killed in the middle of step 6 (after the checkpoint of step 4, one arm a step ahead of the other)
    real_save, real_step = loop_mod._save_arms, loop_mod.train_step
    saved, calls = [], []

    def save(ckpt, step, *args):
        real_save(ckpt, step, *args)
        saved.append(step)

    def step(*args, **kwargs):
        if saved:
            calls.append(1)
            if len(calls) > 3:
                raise _Killed
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "_save_arms", save)
    monkeypatch.setattr(loop_mod, "train_step", step)
    with pytest.raises(_Killed):
        train_arms(config, checkpoint_dir=tmp_path / "cut", checkpoint_every=4)
    assert saved == [4]
    monkeypatch.setattr(loop_mod, "_save_arms", real_save)
    monkeypatch.setattr(loop_mod, "train_step", real_step)

    lines = []
    resumed, _, _ = train_arms(config, checkpoint_dir=tmp_path / "cut", checkpoint_every=4, notify=lines.append)
    assert lines == [f"resuming {arm} from step 4 (checkpoint in {tmp_path / 'cut' / arm})" for arm in ("adamw", "sophia")]
    assert _curves(resumed) == _curves(whole)
    assert [len(a.step_time) for a in resumed] == [config.steps] * 2
    assert [a.warmup_s for a in resumed] != [0.0, 0.0]  # kept from the first part
    # the final weights, optimizer and scheduler states and RNG states are the uninterrupted run's, bit for bit
    assert _same(_arm_states(tmp_path / "cut"), _arm_states(tmp_path / "whole"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_a_run_killed_while_writing_its_report_only_rewrites_it(tmp_path, monkeypatch):
    config = TrainConfig(**TINY)
    whole, _, _ = train_arms(config)  # uninterrupted, no report
    real_write = run_mod.write_outputs

    def write(result, out_dir):
        (Path(out_dir) / "train_lm.md").write_text("half a report")
        raise _Killed

    monkeypatch.setattr(run_mod, "write_outputs", write)
    with pytest.raises(_Killed):
        run_training_demo(config, tmp_path / "cut", checkpoint_every=5)
    assert (tmp_path / "cut" / "checkpoint").is_dir()  # the last step's checkpoint is there
    monkeypatch.setattr(run_mod, "write_outputs", real_write)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(loop_mod, "train_step", no_training)
    lines = []
    again = run_training_demo(config, tmp_path / "cut", checkpoint_every=5, notify=lines.append)
    assert [ln.split(" (")[0] for ln in lines] == [f"{arm} finished its 12 steps before the interruption; not retrained"
                                                   for arm in ("adamw", "sophia")]
    assert _curves(again.arms) == _curves(whole)
    assert not (tmp_path / "cut" / "checkpoint").exists()  # removed once the report is written
    data = json.loads((tmp_path / "cut" / "train_lm.json").read_text())
    assert [a["val_loss"] for a in data["arms"]] == [a.val_loss for a in whole]
    assert "| sophia |" in (tmp_path / "cut" / "train_lm.md").read_text()


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    config = TrainConfig(**{**TINY, "steps": 4})
    train_arms(config, checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    other = TrainConfig(**{**TINY, "steps": 4, "sophia_lr": 2e-2})
    with pytest.raises(ValueError, match=r"written by a run with another configuration \(sophia_lr\); use another out_dir"):
        train_arms(other, checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    with pytest.raises(ValueError, match=r"another configuration \(optimizers\)"):
        train_arms(TrainConfig(**{**TINY, "steps": 4, "optimizers": ("adamw",)}), checkpoint_dir=tmp_path / "ck")
    renamed = [OptimizerSpec("adamw", TINY["adamw_lr"], label="adamw-2")]
    with pytest.raises(ValueError, match="holds no checkpoint of the arm 'adamw-2'"):
        train_arms(config, renamed, checkpoint_dir=tmp_path / "ck")
    retuned = [OptimizerSpec("adamw", TINY["adamw_lr"], betas=(0.8, 0.9)), config.optimizer_specs()[1]]
    with pytest.raises(ValueError, match=r"another configuration \(the adamw optimizer's settings\)"):
        train_arms(config, retuned, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 0"):
        train_arms(config, checkpoint_dir=tmp_path / "ck", checkpoint_every=-1)


# ---------------------------------------------------------------------------------------------- command line
CLI_TINY = ["--steps", "6", "--batch-size", "2", "--seq-len", "16", "--hidden-size", "16", "--layers", "1",
            "--heads", "2", "--eval-every", "2", "--eval-batches", "1", "--max-bytes", "20000", "--no-progress",
            "--threads", "1", "--checkpoint-every", "2"]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_the_same_command_resumes_other_options_are_refused_overwrite_starts_over(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = loop_mod._save_arms

    def save_then_die(ckpt, step, *args):
        real_save(ckpt, step, *args)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_mod, "_save_arms", save_then_die)
    assert main(["train", *CLI_TINY, "--out", str(out)]) == 130
    monkeypatch.setattr(loop_mod, "_save_arms", real_save)
    assert (out / "checkpoint").is_dir() and not (out / "train_lm.json").exists()
    capsys.readouterr()

    # other options: refused, one line naming them (by their flags), nothing touched
    assert main(["train", *CLI_TINY, "--out", str(out), "--layers", "2", "--rho", "0.1"]) == 1
    assert _error(capsys) == (f"soulkit: error: {out} holds a run started with other options (--layers 1 -> 2, "
                              "--rho None -> 0.1); rerun it as it was started, pass --overwrite to start over, "
                              "or choose another --out")
    assert (out / "checkpoint").is_dir()

    # the same command: resumed
    assert main(["train", *CLI_TINY, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"resuming adamw from step 4 (checkpoint in {out / 'checkpoint' / 'adamw'})" in stdout
    assert f"resuming sophia from step 4 (checkpoint in {out / 'checkpoint' / 'sophia'})" in stdout
    assert not (out / "checkpoint").exists()
    resumed = json.loads((out / "train_lm.json").read_text())

    # and again: the results are there already
    assert main(["train", *CLI_TINY, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| sophia |" in stdout and "holds this run's results already (same options)" in stdout

    # --overwrite: started over, with no resume; the same numbers as the resumed run
    assert main(["train", *CLI_TINY, "--out", str(out), "--overwrite"]) == 0
    assert "resuming" not in capsys.readouterr().out
    again = json.loads((out / "train_lm.json").read_text())
    assert [a["val_loss"] for a in again["arms"]] == [a["val_loss"] for a in resumed["arms"]]
    assert [a["train_loss"] for a in again["arms"]] == [a["train_loss"] for a in resumed["arms"]]

    # --overwrite with other options: the old results go, the new run's are written
    assert main(["train", *CLI_TINY, "--out", str(out), "--overwrite", "--optimizers", "adamw"]) == 0
    assert [a["spec"]["kind"] for a in json.loads((out / "train_lm.json").read_text())["arms"]] == ["adamw"]
    assert json.loads((out / "run.json").read_text())["optimizers"] == "adamw"


def test_results_with_no_record_and_bad_values_are_refused(tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "train_lm.json").write_text("{}")  # e.g. written before runs were recorded
    assert main(["train", *CLI_TINY, "--out", str(out)]) == 1
    assert _error(capsys) == (f"soulkit: error: {out} already holds results (train_lm.json) with no record of how "
                              "they were made; pass --overwrite or choose another --out")
    assert main(["train", *CLI_TINY, "--out", str(tmp_path / "new"), "--checkpoint-every", "-1"]) == 1
    assert _error(capsys) == "soulkit: error: --checkpoint-every must be an int >= 0 (0: no checkpoints), got -1"
    assert main(["train", *CLI_TINY, "--out", str(tmp_path / "new"), "--data", str(tmp_path / "missing")]) == 1
    assert _error(capsys) == f"soulkit: error: TrainConfig.data_path does not exist: {tmp_path / 'missing'}"
    assert not (tmp_path / "new").exists()  # nothing written, not even run.json


@pytest.mark.slow  # two fresh interpreters (imports, the compiled Sophia step): 35-50 s on two busy cores
def test_a_killed_train_process_resumes_with_the_same_command(tmp_path, capsys):
    """A real ``python -m soulkit train`` killed with SIGKILL after its first checkpoint, run again to completion:
    the losses are an uninterrupted run's."""
    args = ["train", "--steps", "150", "--batch-size", "2", "--seq-len", "16", "--hidden-size", "16", "--layers", "1",
            "--heads", "2", "--eval-every", "10", "--eval-batches", "1", "--max-bytes", "20000", "--no-progress",
            "--threads", "1", "--checkpoint-every", "10"]
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "soulkit", *args, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    info = out / "checkpoint" / "sophia" / "trainer.json"
    kill_when(argv, info.exists, env=env, timeout=120, cwd=tmp_path, poll=0.01)
    killed_at = json.loads(info.read_text())["step"]
    assert 10 <= killed_at < 150 and not (out / "train_lm.json").exists()

    res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming sophia from step {killed_at} (checkpoint in {out / 'checkpoint' / 'sophia'})" in res.stdout
    assert not (out / "checkpoint").exists()

    assert main([*args, "--out", str(tmp_path / "whole")]) == 0  # uninterrupted, in this process
    resumed, whole = (json.loads((tmp_path / d / "train_lm.json").read_text()) for d in ("killed", "whole"))
    for key in ("eval_steps", "val_loss", "train_loss", "win_rate"):
        assert [a[key] for a in resumed["arms"]] == [a[key] for a in whole["arms"]], key
