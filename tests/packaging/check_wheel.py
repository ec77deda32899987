"""Install the built wheel into fresh virtual environments, one per extra, and run each extra's commands.

``make test-package`` (which ``.ci/run`` calls after ``make test``) runs this. What ``pip install
soulkit[...]`` installs must be what that extra's commands import; the checkout's ``make`` installs
``.[dev]`` (every extra), which hides a missing one, so this check starts from nothing:

1. build the wheel of this checkout (``pip wheel --no-deps``);
2. make a directory of links to the distributions soulkit's *base* requirements need (torch and its
   requirements, numpy, transformers, ...), taken from the running environment and found by walking
   their metadata, so no multi-GB torch is downloaded or copied again;
3. per case (``base``, ``unlearn``, ``influence``): a fresh venv that sees that directory through a
   ``.pth`` file, ``pip install 'soulkit-*.whl[extra]'`` (pip resolves the extra's own packages from
   the registry), then the case's commands, run from a directory outside the source tree so that the
   installed package, not the checkout, is imported.

The ``triton`` extra is not installed here (a ~150 MB download for kernels that run on CUDA).
Exits non-zero, saying which case and command failed.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]

# case -> (extra, [(command, expected exit code, text the output must contain)])
CASES = {
    "base": ("", [
        (["python", "-c", "import soulkit, soulkit.optim, soulkit.kernels; print(soulkit.__file__)"], 0, "site-packages"),
        (["soulkit", "--help"], 0, "usage"),
        (["soulkit", "data", "--out", "d", "--scale", "demo"], 1, "pip install 'soulkit[unlearn]'"),
        (["soulkit", "attack", "--attack", "quantize", "--bits", "4", "--out", "a"], 1, "pip install 'soulkit[unlearn]'"),
        (["soulkit", "influence", "no-model", "--train", "t.jsonl", "--queries", "q.jsonl", "--out", "i"], 1,
         "model directory no-model does not exist"),
        (["soulkit", "bench", "kernels", "--device", "cpu", "--sizes", "0.01", "--layouts", "none", "--reps", "1",
          "--impls", "sophia-foreach,adamw-fused", "--families", "sophia", "--out", "b"], 0, "wrote"),
        (["python", "-c", "import torch; from soulkit.optim import Sophia; p = torch.nn.Parameter(torch.ones(3)); "
          "p.grad = torch.ones(3); Sophia([p]).step(); print('stepped')"], 0, "stepped"),
    ]),
    "unlearn": ("unlearn", [
        (["soulkit", "data", "--out", "d", "--scale", "demo"], 0, ""),
        (["soulkit", "attack", "--attack", "quantize", "--bits", "3", "--out", "a"], 1, "--bits must be 4 or 8"),
        (["python", "-c", "import soulkit.unlearn; from soulkit.unlearn.metrics import mia_auc, rouge_l_recall; "
          "print(rouge_l_recall(['a b c'], ['a b c'])[0], mia_auc([1.0, 2.0], [0.0]))"], 0, "1.0 1.0"),
    ]),
    "influence": ("influence", [
        (["python", "-c", "import torch, torch.nn.functional as F; from sklearn.datasets import load_iris; "
          "from torch.utils.data import TensorDataset; from soulkit.influence import InfluenceAnalyzer; "
          "X, y = load_iris(return_X_y=True); d = TensorDataset(torch.tensor(X), torch.tensor(y)); "
          "m = torch.nn.Linear(4, 3).double(); "
          "an = InfluenceAnalyzer(m, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction='none'), "
          "solver='exact', l2=0.1).fit(d); print('scores', tuple(an.scores(d, d).shape))"], 0, "scores (150, 150)"),
    ]),
}


def _base_requirements() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    if block is None:
        raise SystemExit("pyproject.toml has no [project] dependencies list")
    return re.findall(r'"([^"]+)"', block.group(1))


def _closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions these requirements need, transitively (extras and markers evaluated)."""
    seen: dict[str, md.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{req.name} (needed by soulkit's base install) is not installed here") from None
        seen[name] = dist
        todo.extend(Requirement(r) for r in dist.requires or [])
    return seen


def _link_site(dists: dict[str, md.Distribution], site: Path) -> None:
    """Link every top-level file or directory of these distributions (code and .dist-info) into ``site``."""
    site.mkdir(parents=True)
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or []}
        for top in tops:
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            src = root / top
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="soulkit-wheel-"))
    try:
        wheels = work / "wheels"
        out = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], work, dict(os.environ))
        if out.returncode != 0:
            print(out.stdout, out.stderr)
            raise SystemExit("building the wheel failed")
        wheel = next(wheels.glob("soulkit-*.whl"))
        site = work / "base-site"
        _link_site(_closure(_base_requirements()), site)
        failures = []
        for case, (extra, commands) in CASES.items():
            venv = work / f"venv-{case}"
            _run([sys.executable, "-m", "venv", str(venv)], work, dict(os.environ))
            pth = next((venv / "lib").glob("python*/site-packages"))
            (pth / "_soulkit_base_site.pth").write_text(str(site) + "\n")
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
            env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
            spec = f"{wheel}[{extra}]" if extra else str(wheel)
            inst = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", spec], work, env)
            if inst.returncode != 0:
                failures.append(f"[{case}] pip install {spec}: {inst.stderr.strip()[-800:]}")
                continue
            run_dir = work / f"run-{case}"
            run_dir.mkdir()
            for cmd, code, needle in commands:
                res = _run(cmd, run_dir, env)
                text = res.stdout + res.stderr
                ok = res.returncode == code and needle in text
                print(f"[{case}] {'ok  ' if ok else 'FAIL'} exit {res.returncode} (want {code}): {' '.join(cmd)[:90]}")
                if not ok:
                    failures.append(f"[{case}] {' '.join(cmd)}: exit {res.returncode}, want {code} and "
                                    f"{needle!r} in the output:\n{text.strip()[-1500:]}")
        if failures:
            print("\n\n".join(failures))
            return 1
        print(f"wheel {wheel.name}: {len(CASES)} installs, every command as expected")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
