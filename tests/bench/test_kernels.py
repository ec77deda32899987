"""``soulkit bench kernels``: a tiny run writes its table and record; bad options are one line, exit 1."""

from __future__ import annotations

import json

import pytest
import torch

from soulkit.cli import main

ARMS = "sophia-reference,sophia-foreach,adahessian-reference,adahessian-foreach,adamw-fused,project,project-reference,randn-matmul"


def test_a_tiny_run_writes_every_family(tmp_path, capsys):
    code = main(["bench", "kernels", "--device", "cpu", "--sizes", "0.01", "--layouts", "none", "--reps", "2",
                 "--warmup", "0", "--kernels", "sophia,adahessian,projection", "--dtypes", "fp32,bf16",
                 "--impls", ARMS, "--out", str(tmp_path), "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "kernels_cpu.json").read_text())
    assert record["machine"] and record["families"] == ["sophia", "adahessian", "projection"]
    rows = record["rows"]
    got = {(r["family"], r["dtype"], r["impl"]) for r in rows}
    for dt in ("float32", "bfloat16"):
        assert {("sophia", dt, "sophia-foreach"), ("sophia", dt, "adamw-fused"), ("adahessian", dt, "adahessian-foreach"),
                ("projection", dt, "project"), ("projection", dt, "project-reference")} <= got
    for r in rows:
        assert r["median_s"] > 0
        if r["family"] != "projection":
            assert r["bandwidth_gbs"] > 0 and r["vs_adamw_fused"] > 0
    assert [r["vs_adamw_fused"] for r in rows if r["impl"] == "adamw-fused"] == [1.0, 1.0, 1.0, 1.0]
    md = (tmp_path / "kernels_cpu.md").read_text()
    assert "## Sophia step" in md and "## AdaHessian step" in md and "## Random projection" in md


@pytest.mark.parametrize("argv, needle", [
    (["--kernels", "sophia,adam"], "--kernels: unknown adam"),
    (["--layouts", "gpt3"], "--layouts: unknown gpt3"),
    (["--dtypes", "fp8"], "--dtypes: unknown fp8"),
    (["--impls", "sophia-magic"], "--impls: unknown"),
    (["--sizes", "big"], "--sizes"),
])
def test_bad_options_are_one_line(argv, needle, tmp_path, capsys):
    assert main(["bench", "kernels", "--device", "cpu", "--out", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not list(tmp_path.iterdir())  # refused before anything ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(tmp_path, capsys):
    assert main(["bench", "kernels", "--device", "cuda", "--out", str(tmp_path)]) == 1
    assert "no usable CUDA device" in capsys.readouterr().err
