"""Small problems with known answers, shared by the influence tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from soulkit.influence import OutputLoss
from soulkit.influence._data import DataSource
from soulkit.influence.gradients import BoundLoss
from soulkit.influence.hessian import CurvatureOperator

DT = torch.float64
CE = OutputLoss(lambda m, b: m(b[0]), lambda z, b: F.cross_entropy(z, b[1], reduction="none"))


def make_op(model, loss, ds, *, l2=0.0, damping=0.0, curvature="hessian", engine="auto", batch_size=16):
    """The curvature operator of ``loss`` on ``ds`` (kept in memory), as the analyzer builds it."""
    bound = BoundLoss(model, loss)
    src = DataSource(
        ds, name="train", batch_size=batch_size, dtype=bound.dtype, device=bound.device, cache_bytes=1 << 26
    )
    return CurvatureOperator(bound, src, curvature=curvature, l2=l2, damping=damping, engine=engine)


def mlp_problem(n=40, seed=0):
    """A float64 4-6-3 tanh MLP (51 parameters) and ``n`` random 3-class examples: model, dataset, x, y."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, TensorDataset(x, y), x, y


def linear_model(theta: torch.Tensor, d: int, k: int = 1) -> nn.Linear:
    """nn.Linear(d, k) holding theta = [W (k*d, row-major), b (k)] -- the order of named_parameters()."""
    m = nn.Linear(d, k).to(DT)
    with torch.no_grad():
        m.weight.copy_(theta[: k * d].reshape(k, d))
        m.bias.copy_(theta[k * d :])
    return m


def augment(X: torch.Tensor) -> torch.Tensor:
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)


# ----------------------------------------------------------------------------- ridge


RIDGE_LOSS = OutputLoss(lambda m, b: m(b[0]).squeeze(-1), lambda z, b: 0.5 * (z - b[1]) ** 2)


def ridge_problem(n=40, d=4, m=5, l2=0.1, seed=0, feature_scale=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    if feature_scale is not None:
        X = X * torch.as_tensor(feature_scale, dtype=DT)
    y = X @ torch.randn(d, generator=g, dtype=DT) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    Xq = torch.randn(m, d, generator=g, dtype=DT)
    yq = torch.randn(m, generator=g, dtype=DT)
    Xa = augment(X)
    A = Xa.T @ Xa / n + l2 * torch.eye(d + 1, dtype=DT)
    theta = torch.linalg.solve(A, Xa.T @ y / n)
    return dict(
        X=X,
        y=y,
        Xq=Xq,
        yq=yq,
        A=A,
        theta=theta,
        l2=l2,
        n=n,
        d=d,
        model=linear_model(theta, d),
        train=TensorDataset(X, y),
        queries=TensorDataset(Xq, yq),
    )


def ridge_loo(p, j, damping=0.0):
    """Exact leave-one-out parameters of the ridge problem (objective without j's term)."""
    Xa, y, n, d = augment(p["X"]), p["y"], p["n"], p["d"]
    keep = torch.arange(n) != j
    A = Xa[keep].T @ Xa[keep] / n + p["l2"] * torch.eye(d + 1, dtype=DT)
    return torch.linalg.solve(A, Xa[keep].T @ y[keep] / n)


def ridge_grads(p, X, y, theta=None):
    theta = p["theta"] if theta is None else theta
    Xa = augment(X)
    return (Xa @ theta - y)[:, None] * Xa


# ----------------------------------------------------------------------------- logistic / softmax


def softmax_loss(k: int) -> OutputLoss:
    if k == 1:
        return OutputLoss(
            lambda m, b: m(b[0]).squeeze(-1),
            lambda z, b: F.binary_cross_entropy_with_logits(z, b[1], reduction="none"),
        )
    return OutputLoss(lambda m, b: m(b[0]), lambda z, b: F.cross_entropy(z, b[1], reduction="none"))


def _grad_hess(Xa, y, k, l2, weights, T):
    """Gradient and Hessian of the weighted objective in the augmented layout T [k, d+1] (analytic)."""
    n = Xa.shape[0]
    Z = Xa @ T.T  # [n, k]
    if k == 1:
        s = torch.sigmoid(Z)
        R = s - y[:, None]
        S = (s * (1 - s))[:, :, None]  # [n, 1, 1]
    else:
        P = torch.softmax(Z, -1)
        R = P - F.one_hot(y, k).to(DT)
        S = torch.diag_embed(P) - P[:, :, None] * P[:, None, :]
    w = weights / n
    G = torch.einsum("n,na,ni->ai", w, R, Xa) + l2 * T
    H = torch.einsum("n,nab,ni,nl->aibl", w, S, Xa, Xa).reshape(T.numel(), T.numel())
    return G.reshape(-1), H + l2 * torch.eye(T.numel(), dtype=DT)


def _fit(Xa, y, k, l2, weights, T0, iters=50, tol=1e-14):
    T = T0.clone()
    for _ in range(iters):
        g, H = _grad_hess(Xa, y, k, l2, weights, T)
        if float(g.norm()) < tol:
            break
        T = T - torch.linalg.solve(H, g).reshape(T.shape)
    return T


def _to_theta(T, d):
    return torch.cat([T[:, :d].reshape(-1), T[:, d]])


def classification_problem(n=50, d=3, k=1, m=6, l2=0.05, seed=0):
    """L2-regularised logistic (k=1) or softmax (k>1) regression trained to convergence in float64."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    Xq = torch.randn(m, d, generator=g, dtype=DT)
    W = 1.5 * torch.randn(max(k, 1), d, generator=g, dtype=DT)
    if k == 1:
        y = (torch.rand(n, generator=g, dtype=DT) < torch.sigmoid(X @ W[0])).to(DT)
        yq = (torch.rand(m, generator=g, dtype=DT) < torch.sigmoid(Xq @ W[0])).to(DT)
    else:
        y = torch.multinomial(torch.softmax(X @ W.T, -1), 1, generator=g).squeeze(-1)
        yq = torch.multinomial(torch.softmax(Xq @ W.T, -1), 1, generator=g).squeeze(-1)
    T = _fit(augment(X), y, k, l2, torch.ones(n, dtype=DT), torch.zeros(k, d + 1, dtype=DT))
    theta = _to_theta(T, d)
    return dict(
        T=T,
        X=X,
        y=y,
        Xq=Xq,
        yq=yq,
        k=k,
        d=d,
        n=n,
        l2=l2,
        theta=theta,
        model=linear_model(theta, d, k),
        loss=softmax_loss(k),
        train=TensorDataset(X, y),
        queries=TensorDataset(Xq, yq),
    )


def query_losses(p, theta):
    k, d = p["k"], p["d"]
    W, b = theta[: k * d].reshape(k, d), theta[k * d :]
    z = p["Xq"] @ W.T + b
    if k == 1:
        return F.binary_cross_entropy_with_logits(z.squeeze(-1), p["yq"], reduction="none")
    return F.cross_entropy(z, p["yq"], reduction="none")


def actual_loo(p):
    """[m, n] actual loss_i(theta without j) - loss_i(theta), retrained by Newton's method (float64)."""
    n, d = p["n"], p["d"]
    base = query_losses(p, p["theta"])
    out = torch.zeros(p["Xq"].shape[0], n, dtype=DT)
    Xa = augment(p["X"])
    for j in range(n):
        w = torch.ones(n, dtype=DT)
        w[j] = 0
        T = _fit(Xa, p["y"], p["k"], p["l2"], w, p["T"])
        out[:, j] = query_losses(p, _to_theta(T, d)) - base
    return out
