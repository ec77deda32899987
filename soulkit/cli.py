"""The ``soulkit`` command line.

    soulkit train [--steps N] [--optimizers adamw,sophia] [--model llama|gpt2] [--out DIR] [--seed S] ...
    soulkit demo  [--out DIR] [--only STAGE[,STAGE]]

``demo`` runs the stages of :data:`DEMO_STAGES` in order, each into ``<out>/<stage>``; a new story
(e.g. unlearning) is one more :class:`DemoStage` appended there.

Errors raised by the library (bad values, missing files, ...) are printed as one line on stderr
with a non-zero exit status; ``soulkit --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "build_parser", "DemoStage", "DEMO_STAGES"]

PROG = "soulkit"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Exceptions that mean "the input was wrong" (or the environment was), not "soulkit has a bug".
_USER_ERRORS = (ValueError, TypeError, KeyError, OSError, RuntimeError, FloatingPointError, ImportError)


class _UsageError(Exception):
    """argparse found bad arguments; carries the one-line message."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one line (no usage dump), raised instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------- train
def _add_train_args(p: argparse.ArgumentParser, *, full: bool = True) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="output directory for the md/json/png (default: ./soulkit-train, ./soulkit-demo)")
    p.add_argument("--seed", type=int, default=0, help="model init and Sophia sampling seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")
    if not full:
        return
    p.add_argument("--steps", type=int, default=None, help="training steps per optimizer (default 250)")
    p.add_argument("--optimizers", default=None, help="comma-separated: adamw,sophia (default both)")
    p.add_argument("--model", default=None, help="llama (default) or gpt2")
    p.add_argument("--data-seed", type=int, default=None, help="batch order seed (default: --seed)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, dest="num_layers")
    p.add_argument("--heads", type=int, default=None, dest="num_heads")
    p.add_argument("--adamw-lr", type=float, default=None)
    p.add_argument("--sophia-lr", type=float, default=None)
    p.add_argument("--rho", type=float, default=None, dest="sophia_rho", help="Sophia's clipping scale")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--hessian-interval", type=int, default=None, dest="hessian_update_interval",
                   help="Sophia Hessian refresh interval k (default 10)")
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-batches", type=int, default=None)
    p.add_argument("--max-bytes", type=int, default=None, help="cap on the bytes of text read")
    p.add_argument("--data", default=None, dest="data_path",
                   help="a local text file or directory to train on instead of the standard library")


_CONFIG_FIELDS = (
    "steps", "optimizers", "model", "data_seed", "batch_size", "seq_len", "hidden_size", "num_layers",
    "num_heads", "adamw_lr", "sophia_lr", "sophia_rho", "weight_decay", "hessian_update_interval",
    "grad_clip", "eval_every", "eval_batches", "max_bytes", "data_path",
)


def _train_config(args: argparse.Namespace):
    from .demos.train_lm import TrainConfig

    kwargs = {f: getattr(args, f) for f in _CONFIG_FIELDS if getattr(args, f, None) is not None}
    return TrainConfig(seed=args.seed, progress=not args.no_progress, **kwargs)


def _run_train(config, out: Path | None) -> str:
    from .demos.train_lm import train_lm

    result = train_lm(config, out_dir=out)
    lines = [
        f"byte-level {config.model} LM, {result.n_params / 1e6:.2f} M parameters, {config.steps} steps, "
        f"{result.data_info['train_bytes']:,} train bytes",
        result.table,
    ]
    if result.paths:
        lines.append("wrote " + ", ".join(result.paths[k] for k in ("md", "json", "png")))
    return "\n".join(lines)


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is None:
        return
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def _cmd_train(args: argparse.Namespace) -> int:
    config = _train_config(args)  # validates before anything slow happens
    _set_threads(args)
    print(_run_train(config, args.out if args.out is not None else Path("soulkit-train")))
    return 0


# ---------------------------------------------------------------------------------------------- demo
@dataclass(frozen=True)
class DemoStage:
    """One part of ``soulkit demo``: ``run(args, out_dir)`` does the work and returns text to print."""

    name: str
    description: str
    run: Callable[[argparse.Namespace, Path], str]


def _demo_train(args: argparse.Namespace, out: Path) -> str:
    from .demos.train_lm import TrainConfig

    return _run_train(TrainConfig(seed=args.seed, progress=not args.no_progress), out)


DEMO_STAGES: tuple[DemoStage, ...] = (
    DemoStage("train", "AdamW vs Sophia on a byte-level LM (the default `soulkit train`)", _demo_train),
)


def _cmd_demo(args: argparse.Namespace) -> int:
    names = [s.name for s in DEMO_STAGES]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown or not wanted:
            raise ValueError(f"--only: unknown demo stage {', '.join(unknown) or repr(args.only)}; choose from {names}")
        stages = [s for s in DEMO_STAGES if s.name in wanted]
    else:
        stages = list(DEMO_STAGES)
    out = args.out if args.out is not None else Path("soulkit-demo")
    _set_threads(args)
    for i, stage in enumerate(stages, 1):
        print(f"== [{i}/{len(stages)}] {stage.name}: {stage.description}", flush=True)
        print(stage.run(args, out / stage.name), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Second-order optimization for PyTorch: Sophia, influence, unlearning.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p_train = sub.add_parser("train", help="train a byte-level LM with AdamW and Sophia side by side")
    _add_train_args(p_train)
    p_train.set_defaults(func=_cmd_train)

    p_demo = sub.add_parser("demo", help="run the end-to-end demo (default sizes)")
    _add_train_args(p_demo, full=False)
    p_demo.add_argument("--only", default=None,
                        help="comma-separated stages to run: " + ", ".join(s.name for s in DEMO_STAGES))
    p_demo.set_defaults(func=_cmd_demo, out=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soulkit`` console script and of ``python -m soulkit``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args))
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _USER_ERRORS as e:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: still one line, but say how to see more
        if debug:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


def _one_line(e: BaseException) -> str:
    msg = str(e) if str(e) else type(e).__name__
    if isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    return " ".join(msg.split())


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
