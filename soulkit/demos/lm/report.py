"""What a run reports: per-arm summary rows (:func:`summarize`), a markdown table
(:func:`format_table`), loss curves (:func:`plot_curves`) and the md/json/png files (:func:`write_outputs`)."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._io import atomic_write_bytes, atomic_write_text, to_json
from .config import TrainConfig
from .loop import ArmResult

__all__ = [
    "TrainResult",
    "format_table",
    "median_window_time",
    "plot_curves",
    "steps_to_reach",
    "summarize",
    "write_outputs",
]


@dataclass
class TrainResult:
    config: TrainConfig
    arms: list[ArmResult]
    data_info: dict[str, Any]
    n_params: int
    summary: list[dict[str, Any]]
    table: str
    paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "data": self.data_info,
            "n_params": self.n_params,
            "summary": self.summary,
            "arms": [a.to_dict() for a in self.arms],
        }


def median_window_time(step_time: Sequence[float], k: int) -> float:
    """Median over consecutive k-step windows of the mean step time: includes one refresh per window."""
    n = len(step_time) // k
    if n == 0:
        return statistics.median(step_time) if step_time else math.nan
    return statistics.median(sum(step_time[i * k : (i + 1) * k]) / k for i in range(n))


def steps_to_reach(arm: ArmResult, target: float) -> int | None:
    """First evaluated step whose validation loss is <= target (None: not reached)."""
    for s, v in zip(arm.eval_steps, arm.val_loss):
        if v <= target:
            return s
    return None


def _loss_at(arm: ArmResult, step: int) -> float:
    for s, v in zip(arm.eval_steps, arm.val_loss):
        if s == step:
            return v
    return math.nan


def summarize(arms: Sequence[ArmResult], config: TrainConfig, reference: str | None = None) -> list[dict[str, Any]]:
    """Per arm: validation loss at equal steps, steps/wall time to the reference's final loss, timings.

    The reference is the first AdamW arm (or ``reference``, a label); its final validation loss is the
    target. Step-time ratios compare arms timed in the same run (lockstep).
    """
    ref = None
    if reference is not None:
        ref = next((a for a in arms if a.spec.label == reference), None)
        if ref is None:
            raise ValueError(f"reference {reference!r} is not one of {[a.spec.label for a in arms]}")
    else:
        ref = next((a for a in arms if a.spec.kind == "adamw"), arms[0])
    target = ref.val_loss[-1] if ref.val_loss and ref.diverged_at is None else math.nan
    k = config.hessian_update_interval
    ref_window = median_window_time(ref.step_time, k)
    ref_median = statistics.median(ref.step_time) if ref.step_time else math.nan
    ref_total = sum(ref.step_time)
    ref_steps = ref.eval_steps[-1] if ref.eval_steps else 0
    half = (config.steps // 2) // config.eval_every * config.eval_every
    rows = []
    for a in arms:
        reached = steps_to_reach(a, target)
        wall_to = sum(a.step_time[:reached]) if reached is not None else None
        median_step = statistics.median(a.step_time) if a.step_time else math.nan
        window = median_window_time(a.step_time, k)
        refresh_times = [a.step_time[s] for s in a.refresh_steps if s < len(a.step_time)]
        rows.append(
            {
                "label": a.spec.label,
                "kind": a.spec.kind,
                "lr": a.spec.lr,
                "rho": a.spec.rho if a.spec.kind == "sophia" else None,
                "val_loss_half": _loss_at(a, half) if half > 0 else math.nan,
                "half_step": half,
                "val_loss_final": a.val_loss[-1] if a.val_loss and a.diverged_at is None else math.nan,
                "final_step": a.eval_steps[-1] if a.eval_steps else 0,
                "target": target,
                "steps_to_target": reached,
                "steps_ratio": (reached / ref_steps) if reached is not None and ref_steps else None,
                "wall_to_target_s": wall_to,
                "wall_ratio": (wall_to / ref_total) if wall_to is not None and ref_total > 0 else None,
                "train_time_s": sum(a.step_time),
                "median_step_s": median_step,
                "median_window_step_s": window,
                "median_refresh_step_s": statistics.median(refresh_times) if refresh_times else None,
                "step_overhead": window / ref_window - 1 if ref_window > 0 else math.nan,
                "median_step_overhead": median_step / ref_median - 1 if ref_median > 0 else math.nan,
                "win_rate_mean": _finite_mean(a.win_rate),
                "win_rate_last": a.win_rate[-1] if a.win_rate else None,
                "warmup_s": a.warmup_s,
                "diverged_at": a.diverged_at,
                "reference": a is ref,
            }
        )
    return rows


def _finite_mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(xs) if xs else None


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return format(x, spec)


def format_table(summary: Sequence[dict[str, Any]], k: int = 10) -> str:
    """A markdown table of :func:`summarize`'s rows."""
    half = summary[0]["half_step"] if summary else 0
    final = summary[0]["final_step"] if summary else 0
    target = summary[0]["target"] if summary else math.nan
    lines = [
        f"| optimizer | lr | val loss @{half} | val loss @{final} | steps to {target:.4f} (ratio) | "
        f"wall to target (ratio) | train time (+ warm-up) | median step | step, {k}-step windows (overhead) | win rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        if r["steps_to_target"] is None:
            steps = "not reached" + (f" (diverged @{r['diverged_at']})" if r["diverged_at"] is not None else "")
            wall = "-"
        else:
            steps = f"{r['steps_to_target']} ({r['steps_ratio']:.2f}x)"
            wall = f"{r['wall_to_target_s']:.1f} s ({r['wall_ratio']:.2f}x)"
        overhead = "ref" if r["reference"] else f"{r['step_overhead'] * 100:+.1f}%"
        lr = f"{r['lr']:.2g}" + (f", rho {r['rho']:g}" if r["rho"] is not None else "")
        final_cell = f"diverged @{r['diverged_at']}" if r["diverged_at"] is not None else _fmt(r["val_loss_final"])
        lines.append(
            f"| {r['label']} | {lr} | {_fmt(r['val_loss_half'])} | {final_cell} | {steps} | {wall} | "
            f"{r['train_time_s']:.1f} s (+{r['warmup_s']:.1f} s) | {r['median_step_s'] * 1e3:.0f} ms | "
            f"{r['median_window_step_s'] * 1e3:.0f} ms ({overhead}) | {_fmt(r['win_rate_mean'], '.3f')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- outputs
def plot_curves(arms: Sequence[ArmResult], path: str | os.PathLike, title: str = "", target: float | None = None) -> None:
    """Validation loss against steps and against training wall time; written atomically as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    for a in arms:
        cum = [0.0]
        for t in a.step_time:
            cum.append(cum[-1] + t)
        times = [cum[min(s, len(cum) - 1)] for s in a.eval_steps]
        ax1.plot(a.eval_steps, a.val_loss, marker=".", label=a.spec.label)
        ax2.plot(times, a.val_loss, marker=".", label=a.spec.label)
    for ax, xl in ((ax1, "step"), (ax2, "training wall time (s)")):
        if target is not None and math.isfinite(target):
            ax.axhline(target, color="gray", ls="--", lw=0.8, label="AdamW final")
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        finite = [v for a in arms for v in a.val_loss[1:] if math.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax1.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def write_outputs(result: TrainResult, out_dir: str | os.PathLike, stem: str = "train_lm") -> dict[str, str]:
    """``<stem>.md`` (table), ``<stem>.json`` (config, summary, curves), ``<stem>.png`` (loss curves)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: str(out / f"{stem}.{k}") for k in ("md", "json", "png")}
    c = result.config
    md = (
        f"# AdamW vs Sophia: byte-level {c.model} LM ({result.n_params / 1e6:.2f} M parameters)\n\n"
        f"Data: {result.data_info['source']}; {result.data_info['train_bytes']:,} train / "
        f"{result.data_info['val_bytes']:,} validation bytes. {c.steps} steps x {c.batch_size} x {c.seq_len} "
        f"tokens, seed {c.seed}. Validation loss every {c.eval_every} steps on "
        f"{c.eval_batches * c.batch_size} fixed windows (nats/byte).\n\n"
        f"{result.table}\n\n"
        "Steps to target: first evaluated step whose validation loss is at or below the reference's final "
        "validation loss. Times: training work only, arms run in lockstep on the same batches; "
        f"overhead = median over {c.hessian_update_interval}-step windows (one Hessian refresh each) vs the "
        "reference in the same run. Warm-up: untimed steps on a throwaway copy before the run (one-off "
        "costs such as compiling Sophia's CPU step). Win rate: fraction of Sophia's coordinates not clipped, "
        "averaged over the refresh steps.\n"
    )
    atomic_write_text(paths["md"], md)
    atomic_write_text(paths["json"], to_json(result.to_dict()))
    target = next((r["target"] for r in result.summary), None)
    plot_curves(result.arms, paths["png"], title=f"byte-level {c.model}, {result.n_params / 1e6:.2f} M params", target=target)
    return paths

