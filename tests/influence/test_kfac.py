"""K-FAC / EK-FAC factors against dense float64 references: covariances, preconditioning, the refit."""

from __future__ import annotations

import pytest
import torch

from soulkit.influence.kfac import (
    CovarianceAccumulator,
    KFACFactors,
    ModuleFactors,
    add_correction,
    correction_sums,
    default_damping,
    low_rank,
    with_corrections,
)
from soulkit.influence.modules import per_example_gradients


def _batch(seed=0, b=6, t=4, d_in=5, d_out=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, d_in, generator=g, dtype=torch.float64),
            torch.randn(b, t, d_out, generator=g, dtype=torch.float64))


def _vec(G):  # row-major vec of [out, in]: index o * in + i, matching kron(S, A)
    return G.reshape(*G.shape[:-2], -1)


def _fit(a, s, mask=None):
    acc = CovarianceAccumulator({"m": (s.shape[-1], a.shape[-1])}, torch.device("cpu"))
    acc.a["m"], acc.s["m"] = acc.a["m"].double(), acc.s["m"].double()
    acc.add_inputs("m", a, mask)
    acc.add_output_grads("m", s)
    acc.tokens = int(mask.sum()) if mask is not None else a.shape[0] * a.shape[1]
    acc.sequences = a.shape[0]
    return acc.factors()["m"]


def test_covariances_are_token_and_sequence_averages_and_respect_the_mask():
    a, s = _batch()
    mask = torch.ones(a.shape[:2], dtype=torch.bool)
    mask[0, 2:] = False
    f = _fit(a, s, mask)
    A = (f.a_vecs * f.a_vals) @ f.a_vecs.T
    S = (f.s_vecs * f.s_vals) @ f.s_vecs.T
    flat = a[mask]
    torch.testing.assert_close(A, flat.T @ flat / mask.sum())
    torch.testing.assert_close(S, torch.einsum("bto,btp->op", s, s) / a.shape[0])


def test_kfac_preconditioning_is_the_dense_kronecker_inverse():
    a, s = _batch(1)
    f = _fit(a, s)
    A = (f.a_vecs * f.a_vals) @ f.a_vecs.T
    S = (f.s_vecs * f.s_vals) @ f.s_vecs.T
    lam = 0.3
    dense = torch.kron(S, A) + lam * torch.eye(A.shape[0] * S.shape[0], dtype=torch.float64)
    G = torch.randn(2, 3, 5, dtype=torch.float64)
    want = torch.linalg.solve(dense, _vec(G).T).T.reshape(2, 3, 5)
    torch.testing.assert_close(f.precondition(G, "kfac", lam), want)


def test_ekfac_eigenvalues_are_the_fisher_diagonal_in_the_kronecker_basis():
    a, s = _batch(2)
    f = _fit(a, s)
    sums = correction_sums({"m": (3, 5)}, torch.device("cpu"))
    add_correction(sums["m"], f, a[:4], s[:4])
    add_correction(sums["m"], f, a[4:], s[4:])  # two batches add up
    ek = with_corrections({"m": f}, sums, a.shape[0])["m"]
    G = per_example_gradients(a, s)  # [n, out, in]
    F = torch.einsum("np,nq->pq", _vec(G), _vec(G)) / a.shape[0]  # the Fisher block, dense
    Q = torch.kron(f.s_vecs, f.a_vecs)
    torch.testing.assert_close(ek.corrected.reshape(-1), torch.diagonal(Q.T @ F @ Q))
    # preconditioning with the corrected eigenvalues = the dense inverse of Q diag(corrected) Q^T + lambda
    dense = Q @ torch.diag(ek.corrected.reshape(-1)) @ Q.T + 0.1 * torch.eye(15, dtype=torch.float64)
    Gq = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(ek.precondition(Gq, "ekfac", 0.1).reshape(-1), torch.linalg.solve(dense, Gq.reshape(-1)))
    with pytest.raises(RuntimeError, match="no EK-FAC"):
        f.precondition(Gq, "ekfac", 0.1)


def test_default_damping_and_low_rank():
    a, s = _batch(3)
    f = _fit(a, s)
    assert default_damping(f, "kfac") == pytest.approx(0.1 * float(torch.outer(f.s_vals, f.a_vals).mean()))
    Q = torch.randn(2, 6, 4, dtype=torch.float64)
    U, V = low_rank(Q, 4)
    torch.testing.assert_close(U @ V.transpose(1, 2), Q)
    U1, V1 = low_rank(Q, 1)
    best = torch.linalg.svdvals(Q)[:, 1:].square().sum(-1).sqrt()  # Eckart-Young error of rank 1
    err = (U1 @ V1.transpose(1, 2) - Q).norm(dim=(1, 2))
    assert torch.all(err <= best * 1.05)


def test_empty_and_nonfinite_fits_are_refused():
    acc = CovarianceAccumulator({"m": (2, 2)}, torch.device("cpu"))
    with pytest.raises(ValueError, match="no training tokens"):
        acc.factors()
    a, s = _batch(4, d_in=2, d_out=2)
    a[0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="input \\(m\\) covariance"):
        _fit(a, s)


def test_saved_factors_round_trip_and_incomplete_files_are_refused(tmp_path):
    a, s = _batch(5)
    f = _fit(a, s)
    kf = KFACFactors({"layer.0": f}, "kfac", {"sequences": 6})
    kf.save(tmp_path)
    back = KFACFactors.load(tmp_path)
    assert back.method == "kfac" and back.meta == {"sequences": 6}
    torch.testing.assert_close(back.modules["layer.0"].a_vecs, f.a_vecs)
    back.check_matches({"layer.0": (3, 5)})
    with pytest.raises(ValueError, match="another model"):
        back.check_matches({"layer.0": (3, 6)})
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "factors.safetensors"))
    del tensors["layer.0/s_vals"]
    save_file(tensors, str(tmp_path / "factors.safetensors"))
    with pytest.raises(ValueError, match="incomplete"):
        KFACFactors.load(tmp_path)
    (tmp_path / "factors.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a soulkit factor file"):
        KFACFactors.load(tmp_path)
    with pytest.raises(ValueError, match="method"):
        KFACFactors({"x": f}, "diag")
    assert ModuleFactors(f.a_vecs, f.a_vals, f.s_vecs, f.s_vals).shape == (3, 5)


def test_saving_replaces_factors_whole_and_never_a_foreign_directory(tmp_path, monkeypatch):
    a, s = _batch(6)
    f = _fit(a, s)
    KFACFactors({"m": f}, "kfac", {"sequences": 1}).save(tmp_path / "f")
    before = (tmp_path / "f" / "factors.safetensors").read_bytes()
    import soulkit.influence.kfac as K

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(K, "atomic_write_text", boom)  # dies after the tensors, before the description
    with pytest.raises(OSError, match="disk full"):
        KFACFactors({"m": f}, "kfac", {"sequences": 2}).save(tmp_path / "f")
    monkeypatch.undo()
    assert (tmp_path / "f" / "factors.safetensors").read_bytes() == before
    assert KFACFactors.load(tmp_path / "f").meta == {"sequences": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"], "a temporary directory was left behind"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files"):
        KFACFactors({"m": f}, "kfac").save(tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
