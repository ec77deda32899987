"""Golden trajectories: 50 optimizer steps with Hessian refreshes, parameters hashed bit for bit.

Refactorings of the optimizers, their estimators and the kernels must leave every bit of these
trajectories unchanged. The models compute their linear maps and convolutions as broadcast products
and sums, never through BLAS/oneDNN, whose blocking (and so rounding) depends on the CPU model; the
cases run on one thread, since a reduction split across threads rounds differently. What is left
depends on torch's vectorised kernels, i.e. on the vector ISA. Losses that are differentiated twice
avoid ``exp`` (torch sends it to MKL's vector math library, which picks its code path by CPU model
and vendor). AdaHessian's step needs ``sqrt``, which torch also sends to MKL and whose last bit
differs between MKL's AVX-512, AVX2 and SSE4.2 paths, so its cases are keyed by a fingerprint of
``torch.sqrt`` as well.

On a platform without a recorded entry the test skips and says how to record one
(``SOULKIT_GOLDEN_RECORD=1 pytest tests/optim/test_golden.py -s`` prints the keys and digests).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from soulkit.optim import AdaHessian, Sophia

STEPS = 50


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias`` as a broadcast product and a sum over the last axis (no GEMM)."""
    return (x.unsqueeze(-2) * weight).sum(-1) + bias


class _Net(nn.Module):
    """Embedding -> conv1d -> LayerNorm -> linear head: 2-D, 3-D, 1-D and bias tensors, softmax output."""

    def __init__(self, vocab: int = 11, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.conv = nn.Conv1d(width, width, 3, padding=1)  # parameters only; applied by _linear over windows
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pad(self.emb(x).transpose(1, 2), (1, 1))  # [batch, width, seq + 2]
        windows = h.unfold(2, 3, 1).transpose(1, 2).flatten(2)  # [batch, seq, width * 3]
        h = F.softsign(_linear(windows, self.conv.weight.flatten(1), self.conv.bias))
        return _linear(self.norm(h), self.head.weight, self.head.bias)  # [batch, seq, classes]


class _ConvNet(nn.Module):
    """A 4-D conv kernel for AdaHessian's spatial averaging."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(x, 3, padding=1).transpose(1, 2)  # [batch, 16 positions, 2 * 9]
        h = F.softsign(_linear(cols, self.conv.weight.flatten(1), self.conv.bias))  # [batch, 16, 3]
        return _linear(h.transpose(1, 2).flatten(1), self.head.weight, self.head.bias)


def _digest(model: nn.Module, extra: list[float] | None = None) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for v in extra or []:
        h.update(repr(v).encode())
    return h.hexdigest()[:24]


def _seq_data(dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (STEPS, 4, 6), generator=gen)
    y = torch.randint(0, 5, (STEPS, 4, 6), generator=gen)
    y[:, 0, :2] = -100  # ignored positions
    return x, y


def _square_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error against one-hot labels (``-100`` ignored), for the cases that take HVPs.

    Cross-entropy's second derivative calls ``torch.exp``, which torch routes to MKL's vector math
    library; MKL picks its code path by CPU model, so the rounding would not carry across machines.
    """
    keep = labels != -100
    target = F.one_hot(labels.clamp(min=0), logits.shape[-1]).to(logits.dtype)
    return ((logits - target).square().sum(-1) * keep).sum() / keep.sum()


def _run_sophia(kind: str, *, foreach: bool | None = None, dtype=torch.float32, lr: float = 0.02,
                **opt_kwargs) -> str:
    torch.manual_seed(0)
    model = _Net().to(dtype)
    opt = Sophia(model.parameters(), lr=lr, rho=0.05, weight_decay=0.1, hessian_update_interval=5,
                 foreach=foreach, seed=3, **opt_kwargs)
    xs, ys = _seq_data()
    rates: list[float] = []
    for t in range(STEPS):
        logits = model(xs[t])
        if kind == "hutchinson":  # an HVP differentiates the loss twice: keep exp out of it (see _square_loss)
            loss = _square_loss(logits, ys[t])
        else:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ys[t].flatten(), ignore_index=-100)
        if opt.hessian_due():
            if kind == "gnb":
                opt.accumulate_gnb(logits, labels=ys[t])
            elif kind == "hutchinson":
                opt.accumulate_hutchinson(loss, n_samples=2)
            elif kind == "explicit":
                gen = torch.Generator().manual_seed(100 + t)
                opt.update_hessian([torch.rand(p.shape, generator=gen).to(p.dtype) for p in model.parameters()])
        loss.backward()
        if kind == "paper" and opt.hessian_due():
            grads = [p.grad.clone() for p in model.parameters()]
            opt.zero_grad()
            logits2 = model(xs[t])
            loss_s, n = _paper_sampled_loss(logits2, t)
            (loss_s / n).backward()
            opt.update_hessian(batch_size=n)
            for p, g in zip(model.parameters(), grads):
                p.grad = g
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if t % 5 == 0:
            rates.extend(round(r, 12) for r in opt.win_rate())
    return _digest(model, rates + [opt.num_hessian_updates, opt.skipped_steps])


def _paper_sampled_loss(logits: torch.Tensor, t: int):
    gen = torch.Generator().manual_seed(1000 + t)
    probs = torch.softmax(logits.detach().flatten(0, 1).float(), -1)
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels, reduction="sum"), labels.numel()


def _run_adahessian(*, foreach: bool | None = None, **opt_kwargs) -> str:
    torch.manual_seed(0)
    model = _ConvNet()
    opt = AdaHessian(model.parameters(), lr=0.05, weight_decay=0.01, update_each=5, n_samples=2,
                     foreach=foreach, seed=7, **opt_kwargs)
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(STEPS, 6, 2, 4, 4, generator=gen)
    ys = torch.randint(0, 4, (STEPS, 6), generator=gen)
    for t in range(STEPS):
        loss = _square_loss(model(xs[t]), ys[t])
        loss.backward(create_graph=opt.hessian_due())
        opt.step()
        opt.zero_grad()
    return _digest(model)


def _run_sophia_kernel(implementation: str) -> str:
    """The kernel on its own: small tensors and ones above the compiled path's size threshold."""
    from soulkit.kernels import sophia_step

    gen = torch.Generator().manual_seed(5)
    shapes = [(3,), (40, 7), (1 << 15, 3), (257, 129)]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    ms = [torch.zeros(s) for s in shapes]
    hs = [torch.zeros(s) for s in shapes]
    win = torch.zeros((), dtype=torch.int64)
    for t in range(12):
        gs = [torch.randn(s, generator=gen) for s in shapes]
        est = [torch.rand(s, generator=gen) for s in shapes] if t % 4 == 0 else None
        sophia_step(ps, gs, ms, hs, lr=0.01, beta1=0.9, rho=0.05, weight_decay=0.1, eps=1e-12,
                    bias_correction1=1 - 0.9 ** (t + 1) if t % 2 else 1.0, maximize=t == 5,
                    hessian_estimates=est, beta2=0.99, win_count=win if est is not None else None,
                    implementation=implementation)
    h = hashlib.sha256()
    for t in ps + ms + hs:
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr(int(win)).encode())
    return h.hexdigest()[:24]


CASES = {
    "kernel-sophia-foreach": lambda: _run_sophia_kernel("foreach"),
    "kernel-sophia-compiled": lambda: _run_sophia_kernel("compiled"),
    "kernel-sophia-reference": lambda: _run_sophia_kernel("reference"),
    "sophia-gnb": lambda: _run_sophia("gnb"),
    "sophia-gnb-reference": lambda: _run_sophia("gnb", foreach=False),
    "sophia-hutchinson": lambda: _run_sophia("hutchinson"),
    "sophia-explicit-bc": lambda: _run_sophia("explicit", bias_correction=True, hessian_bias_correction=True),
    "sophia-explicit-maximize": lambda: _run_sophia("explicit", maximize=True),
    "sophia-paper": lambda: _run_sophia("paper"),
    "sophia-gnb-bf16": lambda: _run_sophia("gnb", dtype=torch.bfloat16),
    "adahessian": lambda: _run_adahessian(),
    "adahessian-reference": lambda: _run_adahessian(foreach=False),
    "adahessian-block-power": lambda: _run_adahessian(block_size=3, hessian_power=0.5),
}

# Sophia's model and kernel digests are the same under AVX-512 and AVX2 (ATEN_CPU_CAPABILITY=avx2) except
# for the compiled kernel's.
_SOPHIA_2_13 = {
    'kernel-sophia-foreach': 'dbae89db40ca96d917c61de5',
    'kernel-sophia-reference': '87ddf655cc4771db0d8a83fa',
    'sophia-explicit-bc': '7455d3fa2d98795500934967',
    'sophia-explicit-maximize': '40d28691f9a15a6ef5aa8d61',
    'sophia-gnb': '77e5c7a2d52dc8198d0446e4',
    'sophia-gnb-bf16': '785d6ac2ff52a17dfaf1bfd5',
    'sophia-gnb-reference': '0358309486040de1d25557a4',
    'sophia-hutchinson': '206dbc20486c07351f9da8f7',
    'sophia-paper': '29d92e090d4e84dd1e384e1a',
}
# (torch version without local suffix, CPU capability) -> case -> digest
GOLDEN: dict[tuple[str, ...], dict[str, str]] = {
    ("2.13.0", "AVX512"): {**_SOPHIA_2_13, 'kernel-sophia-compiled': 'adbc9a8e3f9953aa46adee56'},
    ("2.13.0", "AVX2"): {**_SOPHIA_2_13, 'kernel-sophia-compiled': '5f41d8661b945357c3cf48eb'},
}
# _sqrt_fingerprint() of MKL's AVX-512, AVX2 and SSE4.2 paths (recorded with MKL_ENABLE_INSTRUCTIONS=...;
# MKL takes a non-AVX-512 path on other vendors' CPUs) -> AdaHessian case -> digest, the same under both
# capabilities.
_ADAHESSIAN_2_13 = {
    "75378120": {'adahessian': '87e792672658b1eb22e1ab85', 'adahessian-block-power': '32da1a89b4d0ce443afb71a9',
                 'adahessian-reference': '73c9e67928b54c894edc0e21'},
    "409fd67f": {'adahessian': 'd595069b9a525475115d58f9', 'adahessian-block-power': '8cf43408303036ec1f376f82',
                 'adahessian-reference': '87846efc18fcb3a34bacfbe3'},
    "7e3074a3": {'adahessian': 'c60b550c01b322c41e415d3b', 'adahessian-block-power': '7e1568d9ed62c21c7bfef818',
                 'adahessian-reference': '21235e2708358632fb9b5352'},
    # MKL's path on an AMD EPYC (AVX-512 capability), recorded there: none of the three above
    "511cc0dc": {'adahessian': '5e32d36d634fa843d00d5dd9', 'adahessian-block-power': 'f6077060caf4d92e3c367cbe',
                 'adahessian-reference': 'b602d844948f34e191ce01e8'},
}
# (torch version, CPU capability, _sqrt_fingerprint()) -> case -> digest, for the cases that take a sqrt
GOLDEN_SQRT: dict[tuple[str, ...], dict[str, str]] = {
    ("2.13.0", cap, fp): table for cap in ("AVX512", "AVX2") for fp, table in _ADAHESSIAN_2_13.items()
}
_SQRT_CASES = ("adahessian", "adahessian-block-power", "adahessian-reference")


def _sqrt_fingerprint() -> str:
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    h = hashlib.sha256()
    for n in (54, 192, 1000, 4096):
        h.update(torch.sqrt(x[:n]).numpy().tobytes())
    return h.hexdigest()[:8]


def _platform(case: str) -> tuple[str, ...]:
    key = (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability())
    return key + (_sqrt_fingerprint(),) if case in _SQRT_CASES else key


@pytest.fixture
def one_thread():
    """Reductions split across threads round differently: the digests are recorded on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_trajectory(case, one_thread):
    digest = CASES[case]()
    key = _platform(case)
    if os.environ.get("SOULKIT_GOLDEN_RECORD") == "1":
        print(f"\nGOLDEN {key!r} {case!r}: {digest!r},")
        return
    table = (GOLDEN_SQRT if case in _SQRT_CASES else GOLDEN).get(key)
    if table is None:
        pytest.skip(f"no golden digests recorded for {key}; record them with SOULKIT_GOLDEN_RECORD=1")
    assert digest == table[case], f"the {case} trajectory changed: {digest} != {table[case]}"


def test_golden_digest_sees_one_ulp():
    """A learning rate one float32 ulp away gives another digest: the comparison can fail."""
    assert _run_sophia("explicit") != _run_sophia("explicit", lr=0.02 * (1 + 2**-22))
