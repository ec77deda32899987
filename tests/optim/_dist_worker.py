"""Rank body and single-process references for ``tests/optim/test_distributed.py``.

Each scenario trains the same small float64 MLP with :class:`soulkit.optim.Sophia` on the same
global batches, once on 2 CPU ranks (gloo) that each get half of every global batch, and once in
one process on the whole global batch. The test compares the two trajectories.

The GNB refresh samples labels from the model's softmax, so the two runs only agree if they draw
the *same* labels:

* ``ddp_gnb`` (DDP + :meth:`Sophia.accumulate_gnb`, 2 micro-batches per rank): the ranks record
  the labels Sophia drew (by wrapping the cross-entropy inside ``soulkit.optim.estimators``); the
  reference computes the GNB estimate from those labels on the whole batch and feeds it through
  ``update_hessian(estimate=...)``. This checks that Sophia sums the buffers and term counts over
  ranks and micro-batches at fold time.
* ``ddp_paper`` / ``fsdp2_paper`` (DDP / FSDP2 ``fully_shard`` + paper-style refresh): the labels
  are drawn by inverse-CDF sampling with uniforms shared by all runs (:func:`sample_labels`), the
  sampled-loss gradient is averaged over ranks by DDP / FSDP2, then ``update_hessian(batch_size=B)``
  with B the *global* batch.

Results are written with ``torch.save`` (plain tensors and lists only; the test loads them with
``weights_only=True``).
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from .. import _dist

IN_FEATURES, HIDDEN, CLASSES = 6, 12, 5
GLOBAL_BATCH = 16
MICRO_BATCHES = 2  # per rank, ddp_gnb only
STEPS = 10
HYPER = dict(lr=0.05, betas=(0.9, 0.95), rho=0.05, weight_decay=0.1, hessian_update_interval=3)
WORLD_SIZE = _dist.WORLD_SIZE
SCENARIOS = ("ddp_gnb", "ddp_paper", "ddp_hutchinson", "fsdp2_paper", "fsdp2_paper_fused")


# ---------------------------------------------------------------- shared by ranks and reference
def build_model() -> torch.nn.Sequential:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and the sampling uniforms of global step ``step``."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=gen)
    u = torch.rand(GLOBAL_BATCH, generator=gen, dtype=torch.float64)
    return x, y, u


def sample_labels(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw ``y ~ softmax(logits)`` row-wise by inverse CDF with the given uniforms (deterministic)."""
    with torch.no_grad():
        cdf = torch.softmax(logits.detach(), dim=-1).cumsum(-1)
        return torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def _sophia(params, **extra):
    from soulkit.optim import Sophia

    return Sophia(params, **HYPER, **extra)


def _rows(rank: int, world: int) -> slice:
    n = GLOBAL_BATCH // world
    return slice(rank * n, (rank + 1) * n)


def train_paper_style(rank: int = 0, world: int = 1, wrap=None, **extra) -> tuple[torch.nn.Module, object]:
    """Paper-style refresh: separate forward, sampled-label loss backward, update_hessian(batch_size=B_global)."""
    model = build_model()
    net = wrap(model) if wrap is not None else model
    opt = _sophia(net.parameters(), **extra)
    rows = _rows(rank, world)
    for step in range(STEPS):
        x, y, u = global_batch(step)
        x, y, u = x[rows], y[rows], u[rows]
        if opt.hessian_due():
            logits = net(x)
            F.cross_entropy(logits, sample_labels(logits, u)).backward()  # local mean; DDP/FSDP average ranks
            opt.update_hessian(batch_size=GLOBAL_BATCH)
            opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def train_hutchinson(rank: int = 0, world: int = 1, wrap=None) -> tuple[torch.nn.Module, object]:
    """Hutchinson refresh: each rank estimates the Hessian of its own mean loss with the same probes;
    Sophia averages the estimates over ranks, the Hessian of the global batch's mean loss."""
    model = build_model()
    net = wrap(model) if wrap is not None else model
    opt = _sophia(net.parameters())
    rows = _rows(rank, world)
    for step in range(STEPS):
        x, y, _ = global_batch(step)
        x, y = x[rows], y[rows]
        if opt.hessian_due():
            opt.accumulate_hutchinson(lambda x=x, y=y: F.cross_entropy(model(x), y))  # the module: no DDP hooks
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def gnb_reference(sampled: dict[int, torch.Tensor]) -> tuple[torch.nn.Module, object]:
    """One process, whole global batch; at refresh step t the GNB estimate is computed from the labels
    the ranks drew (``sampled[t]``, rows in global order) and folded with ``update_hessian(estimate=...)``."""
    model = build_model()
    opt = _sophia(model.parameters())
    params = list(model.parameters())
    for step in range(STEPS):
        x, y, _ = global_batch(step)
        logits = model(x)
        if opt.hessian_due():
            yhat = sampled[step]
            # float64 logits: the estimators keep float64 for the sampled-label loss, as here
            loss_sum = F.cross_entropy(logits, yhat, reduction="sum")
            grads = torch.autograd.grad(loss_sum, params, retain_graph=True)
            opt.update_hessian([g.square() / yhat.numel() for g in grads])
        F.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


# ---------------------------------------------------------------- rank side
@contextlib.contextmanager
def _record_sampled_labels():
    """Make soulkit.optim.estimators record the labels it draws (this process only)."""
    import types

    import soulkit.optim.estimators as sampling

    drawn: list[torch.Tensor] = []

    def cross_entropy(inp, target, *args, **kwargs):
        drawn.append(target.detach().clone())
        return F.cross_entropy(inp, target, *args, **kwargs)

    real = sampling.F
    sampling.F = types.SimpleNamespace(cross_entropy=cross_entropy)
    try:
        yield drawn
    finally:
        sampling.F = real


def _ddp_gnb(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    with _record_sampled_labels() as drawn:
        return _ddp_gnb_body(rank, world, drawn, DDP(build_model()))


def _ddp_gnb_body(rank: int, world: int, drawn: list[torch.Tensor], net) -> dict:
    opt = _sophia(net.parameters())
    rows = _rows(rank, world)
    sampled: dict[int, torch.Tensor] = {}
    terms_added: dict[int, int] = {}
    for step in range(STEPS):
        x, y, _ = global_batch(step)
        xs, ys = x[rows].chunk(MICRO_BATCHES), y[rows].chunk(MICRO_BATCHES)
        due = opt.hessian_due()
        added = 0
        for i, (xm, ym) in enumerate(zip(xs, ys)):
            last = i == MICRO_BATCHES - 1
            with contextlib.nullcontext() if last else net.no_sync():
                logits = net(xm)
                if due:
                    added += opt.accumulate_gnb(logits)
                (F.cross_entropy(logits, ym) / MICRO_BATCHES).backward()
        if due:
            sampled[step] = torch.cat(drawn[-MICRO_BATCHES:])
            terms_added[step] = added
        opt.step()
        opt.zero_grad()
    if len(drawn) != MICRO_BATCHES * len(sampled):
        raise AssertionError(f"recorded {len(drawn)} label draws, expected {MICRO_BATCHES * len(sampled)}")
    return {
        "params": [p.detach().clone() for p in net.module.parameters()],
        "hessian": [opt.state[p]["hessian"].clone() for p in net.parameters()],
        "sampled": sampled,
        "terms_added": terms_added,
        "num_hessian_updates": opt.num_hessian_updates,
        "pending_terms_after": opt._pending_terms,
        "win_rate": opt.win_rate(),
    }


def _ddp_paper(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    net, opt = train_paper_style(rank, world, wrap=DDP)
    return {
        "params": [p.detach().clone() for p in net.module.parameters()],
        "num_hessian_updates": opt.num_hessian_updates,
        "win_rate": opt.win_rate(),
    }


def _ddp_hutchinson(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    net, opt = train_hutchinson(rank, world, wrap=DDP)
    return {
        "params": [p.detach().clone() for p in net.module.parameters()],
        "hessian": [opt.state[p]["hessian"].clone() for p in net.parameters()],
        "num_hessian_updates": opt.num_hessian_updates,
    }


def _fsdp2_paper_fused(rank: int, world: int) -> dict:
    """FSDP2 with Sophia(fused=True): DTensor parameters must not reach the Triton kernel (it reads raw
    data pointers) but fall back to the foreach path. Runs the kernel under TRITON_INTERPRET on the CPU."""
    from soulkit.kernels.sophia_triton import HAS_TRITON, triton_usable

    if not (HAS_TRITON and triton_usable(torch.device("cpu"))):
        return {"skipped": "needs triton with TRITON_INTERPRET=1"}
    return _fsdp2_paper(rank, world, fused=True)


def _fsdp2_paper(rank: int, world: int, **extra) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))

    def wrap(model):
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    net, opt = train_paper_style(rank, world, wrap=wrap, **extra)
    params = list(net.parameters())
    if not all(isinstance(p, DTensor) for p in params):
        raise AssertionError("fully_shard did not turn the parameters into DTensors")
    out = {
        "params": [p.full_tensor().detach().clone() for p in params],  # collective: every rank calls it
        "hessian": [opt.state[p]["hessian"].full_tensor().clone() for p in params],
        "state_is_dtensor": all(isinstance(opt.state[p]["hessian"], DTensor) for p in params),
        "num_hessian_updates": opt.num_hessian_updates,
        "win_rate": opt.win_rate(),
    }
    # accumulate_gnb cannot see sharded parameters: it must say so, not fold an empty estimate
    x, _, _ = global_batch(0)
    try:
        opt.accumulate_gnb(net(x[_rows(rank, world)]))
        out["accumulate_gnb_error"] = ""
    except RuntimeError as exc:
        out["accumulate_gnb_error"] = str(exc)
    try:  # nor can accumulate_hutchinson
        opt.accumulate_hutchinson(lambda: net(x[_rows(rank, world)]).sum())
        out["accumulate_hutchinson_error"] = ""
    except RuntimeError as exc:
        out["accumulate_hutchinson_error"] = str(exc)
    return out


_BODIES = {
    "ddp_gnb": _ddp_gnb,
    "ddp_paper": _ddp_paper,
    "ddp_hutchinson": _ddp_hutchinson,
    "fsdp2_paper": _fsdp2_paper,
    "fsdp2_paper_fused": _fsdp2_paper_fused,
}


def main(rank: int, world: int, scenarios: list[str], out_dir: str) -> None:
    """Entry point of one rank (``torch.multiprocessing.start_processes`` passes ``rank`` first): the
    scenarios in one process group, as ``tests/_dist.py`` runs them."""
    _dist.run_rank(rank, world, scenarios, out_dir, _BODIES)


if __name__ == "__main__":  # manual run: python -m tests.optim._dist_worker OUT_DIR [SCENARIO ...]
    import torch.multiprocessing as mp

    chosen = sys.argv[2:] or list(SCENARIOS)
    mp.start_processes(main, args=(WORLD_SIZE, chosen, sys.argv[1]), nprocs=WORLD_SIZE, start_method="spawn")
