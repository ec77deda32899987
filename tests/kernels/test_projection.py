"""Seeded random projection: torch and Triton agree bit for bit on R; JL properties; chunking; bad input."""

from __future__ import annotations

import math

import pytest
import torch

from soulkit.kernels import project, project_chunks
from soulkit.kernels.projection import project_reference, rademacher_matrix
from soulkit.kernels.projection_triton import HAS_TRITON, project_triton, triton_usable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not (HAS_TRITON and triton_usable(DEVICE)), reason="triton not usable here")


def test_matrix_is_rademacher_and_deterministic():
    r = rademacher_matrix(2000, 64, seed=5)
    assert set(r.unique().tolist()) == {-1 / 8, 1 / 8}
    assert abs(r.mean().item()) < 0.01  # 128k signs: mean within ~8 standard errors of 0
    assert torch.equal(r, rademacher_matrix(2000, 64, seed=5))
    assert not torch.equal(r, rademacher_matrix(2000, 64, seed=6))
    # rows and columns are not copies of each other (a broken hash repeats patterns)
    s = r * 8
    assert (s[:, :-1] * s[:, 1:]).mean().abs() < 0.02
    assert (s[:-1] * s[1:]).mean().abs() < 0.02
    # offsets index the same global matrix
    torch.testing.assert_close(rademacher_matrix(10, 64, seed=5, row_offset=100), r[100:110])


def test_reference_equals_materialised_product_in_float64():
    g = torch.randn(7, 1031, dtype=torch.float64)
    out = project_reference(g, 33, seed=1, chunk_rows=100)
    torch.testing.assert_close(out, g @ rademacher_matrix(1031, 33, seed=1, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_chunks_sum_to_the_whole():
    g = torch.randn(4, 500, dtype=torch.float64)
    whole = project(g, 16, seed=9)
    parts = project_chunks([g[:, :123], g[:, 123:124], g[:, 124:]], 16, seed=9)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


def test_inner_products_are_preserved_in_expectation():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(6, 400, dtype=torch.float64, generator=gen)
    exact = g @ g.T
    k = 4096
    p = project(g, k, seed=11)
    approx = p @ p.T
    # JL: each inner product has standard deviation <= sqrt(2 / k) * |g_i| |g_j|
    norms = g.norm(dim=1)
    bound = 5 * math.sqrt(2 / k) * norms[:, None] * norms[None, :]
    assert ((approx - exact).abs() <= bound).all()


@needs_triton
@pytest.mark.parametrize("b, d, k", [(1, 1, 1), (3, 13, 5), (17, 129, 65), (33, 64, 64)])
def test_triton_matches_torch(b, d, k):
    gen = torch.Generator().manual_seed(b + d + k)
    g = torch.randn(b, d, generator=gen).to(DEVICE)
    ref = project_reference(g, k, seed=123, row_offset=7)
    out = project_triton(g, k, seed=123, row_offset=7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_generates_the_same_signs_bit_for_bit():
    d, k = 70, 130
    eye = torch.eye(d, device=DEVICE)
    out = project_triton(eye, k, seed=2**31 + 5, row_offset=2**20)
    assert torch.equal(out, rademacher_matrix(d, k, seed=2**31 + 5, row_offset=2**20, device=DEVICE))


@needs_triton
def test_triton_output_is_fully_written_and_low_precision_inputs_work():
    g = torch.randn(5, 77).to(DEVICE)
    for dt in (torch.bfloat16, torch.float16):
        out = project_triton(g.to(dt), 9, seed=0)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, project_reference(g.to(dt), 9, seed=0), rtol=1e-3, atol=1e-3)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="2-D"):
        project(torch.zeros(3), 4, seed=0)
    with pytest.raises(TypeError, match="floating"):
        project(torch.zeros(2, 3, dtype=torch.int64), 4, seed=0)
    with pytest.raises(ValueError, match="k must"):
        project(torch.zeros(2, 3), 0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        project(torch.zeros(2, 3), 4, seed=-1)
    with pytest.raises(ValueError, match="row_offset"):
        project(torch.zeros(2, 3), 4, seed=0, row_offset=-2)
    with pytest.raises(ValueError, match="implementation"):
        project(torch.zeros(2, 3), 4, seed=0, implementation="magic")
    with pytest.raises(ValueError, match="empty"):
        project_chunks([], 4, seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("d, k, offset, seed", [(1, 1, 0, 0), (4097, 7, 13, 2**32 - 1), (300, 64, 2**31, 12345)])
def test_compiled_equals_eager_reference_bit_for_bit(dtype, d, k, offset, seed):
    from soulkit.kernels.projection import project_compiled
    from soulkit.kernels.sophia_compiled import compile_available

    if not compile_available():
        pytest.skip("no C++ compiler for inductor")
    g = torch.randn(3, d).to(dtype)
    ref = project_reference(g, k, seed, row_offset=offset)
    out = project_compiled(g, k, seed, row_offset=offset)
    assert out.dtype == ref.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(out, ref)
    assert torch.equal(project(g, k, seed, row_offset=offset, implementation="compiled"), ref)
    assert torch.equal(project(g, k, seed, row_offset=offset), ref)  # "auto" on the CPU
