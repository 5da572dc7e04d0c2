"""GPTQ (llmship.compress.gptq): the blocked algorithm against the per-column textbook one, its gain over
round-to-nearest on correlated inputs, the grid it must land on, and the Hessian it is fed."""
from __future__ import annotations

import pytest
import torch

from llmship.compress.grids import DTYPES, asymmetric, symmetric
from llmship.compress.gptq import GptqFailed, HessianAccumulator, gptq, gptq_reference

GRIDS = {
    "int4-sym-bf16": symmetric(4, 32, "bf16"),
    "uint4-int-zero": asymmetric(4, 32, "fp16", "int"),
    "uint4-float-zero": asymmetric(4, 32, "fp16", "float", "fp16"),
    "int8-per-channel": symmetric(8, None, "fp32", full_range=False),
}


def correlated(samples: int, k: int, seed: int) -> torch.Tensor:
    """Inputs X = Z A: every feature mixes all of Z's, so H = 2/n X^T X is far from diagonal."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, k, generator=gen) @ torch.randn(k, k, generator=gen) / k ** 0.5


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian


def weight(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("act_order", [False, True])
def test_blocked_gptq_gives_the_codes_of_the_per_column_algorithm(name, act_order):
    grid = GRIDS[name]
    h, w = hessian_of(correlated(300, 96, seed=1)), weight(24, 96, seed=2)
    ref_codes, ref_scale, ref_zero = gptq_reference(w, h, grid, damp=0.01, act_order=act_order, search="mse")
    for block_size in (16, 128):
        codes, scale, zero = gptq(w, h, grid, damp=0.01, act_order=act_order, block_size=block_size, search="mse")
        assert torch.equal(scale, ref_scale)
        assert (zero is None) == (ref_zero is None) and (zero is None or torch.equal(zero, ref_zero))
        # The blocked form accumulates in float32 and in another order than the float64 oracle; a value that
        # falls within an ulp of a rounding boundary (x.5) may then round the other way (and move the row's
        # later codes by a step). That is all that may differ.
        differ = codes != ref_codes
        assert differ.float().mean() <= 0.01, f"block {block_size}: {int(differ.sum())} codes differ"
        assert (codes.int() - ref_codes.int()).abs().max() <= 1


@pytest.mark.parametrize("act_order", [False, True])
def test_with_a_diagonal_hessian_gptq_is_round_to_nearest_on_the_original_groups(act_order):
    # No correlation, no error feedback: every column rounds on its own, with its ORIGINAL group's scale even
    # when act_order visits the columns in another order.
    grid = GRIDS["uint4-float-zero"]
    w = weight(16, 64, seed=3)
    diag = torch.rand(64, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 10 + 0.1
    codes, scale, zero = gptq(w, torch.diag(diag), grid, act_order=act_order, block_size=16)
    rtn_codes, rtn_scale, rtn_zero = grid.rtn(w, "mse")
    assert torch.equal(scale, rtn_scale) and torch.equal(zero, rtn_zero)
    assert torch.equal(codes, rtn_codes)


@pytest.mark.parametrize("name", ["int4-sym-bf16", "uint4-int-zero"])
def test_gptq_cuts_the_output_error_of_round_to_nearest_on_correlated_inputs(name):
    grid = GRIDS[name]
    x, w = correlated(400, 128, seed=5), weight(32, 128, seed=6)
    codes, scale, zero = gptq(w, hessian_of(x), grid, act_order=True, block_size=32)
    rtn = grid.quantize(w, scale, zero)  # same grid, same scales: only the rounding differs

    def output_error(c):
        return (x @ w.T - x @ grid.dequantize(c, scale, zero).T).pow(2).sum().item()

    assert output_error(codes) <= 0.8 * output_error(rtn)


@pytest.mark.parametrize("name", list(GRIDS))
def test_codes_lie_on_the_grid_and_scales_are_stored_exactly(name):
    grid = GRIDS[name]
    w = weight(24, 96, seed=7)
    w[3, 5] = 4.0  # an outlier, so that clipped groups must clamp codes at the ends of the range
    codes, scale, zero = gptq(w, hessian_of(correlated(200, 96, seed=8)), grid)
    assert codes.dtype == torch.int16 and codes.shape == (24, 96)
    assert scale.dtype == torch.float32 and scale.shape == (24, grid.groups(96))
    assert int(codes.min()) >= grid.qmin and int(codes.max()) <= grid.qmax
    assert torch.equal(scale.to(DTYPES[grid.scale_dtype]).float(), scale)
    if grid.zero_point == "int":
        assert torch.equal(zero, zero.round()) and zero.min() >= grid.qmin and zero.max() <= grid.qmax
    if grid.zero_point == "float":
        assert torch.equal(zero.to(DTYPES[grid.zero_dtype]).float(), zero)


@pytest.mark.parametrize("name", ["int4-sym-bf16", "uint4-int-zero", "int8-per-channel"])
def test_a_dead_input_gets_a_zero_weight_column(name):
    # (With a float zero point 0 is generally not on the grid, so only grids that hold 0 exactly are checked.)
    grid = GRIDS[name]
    x = correlated(200, 64, seed=9)
    x[:, 10] = 0.0
    codes, scale, zero = gptq(weight(8, 64, seed=10) + 1.0, hessian_of(x), grid)
    deq = grid.dequantize(codes, scale, zero)
    assert torch.equal(deq[:, 10], torch.zeros(8))
    assert deq[:, 11].abs().min() > 0.5  # live columns keep their weights


def test_an_indefinite_hessian_is_retried_with_ten_times_the_damping():
    gen = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    eig = torch.rand(64, generator=gen, dtype=torch.float64) + 0.5
    eig[0] = -0.05  # mean(diag) ~ 1: damping 0.01 leaves it indefinite, 0.1 makes it positive definite
    h = q @ torch.diag(eig) @ q.T
    grid, w = GRIDS["int4-sym-bf16"], weight(8, 64, seed=12)
    with pytest.raises(torch.linalg.LinAlgError):
        gptq_reference(w, h, grid, damp=0.01, act_order=False, search="mse")
    codes, _, _ = gptq(w, h, grid, damp=0.01, act_order=False)
    ref_codes, _, _ = gptq_reference(w, h, grid, damp=0.1, act_order=False, search="mse")
    assert torch.equal(codes, ref_codes)


def test_a_hessian_that_cannot_be_factored_raises_with_the_rtn_result_attached():
    grid, w = GRIDS["uint4-int-zero"], weight(8, 64, seed=13)
    h = hessian_of(correlated(100, 64, seed=14))
    h[3, 7] = h[7, 3] = float("nan")
    with pytest.raises(GptqFailed, match="not finite") as failed:
        gptq(w, h, grid)
    codes, scale, zero = failed.value.fallback
    rtn_codes, rtn_scale, rtn_zero = grid.rtn(w, "mse")
    assert torch.equal(codes, rtn_codes) and torch.equal(scale, rtn_scale) and torch.equal(zero, rtn_zero)


def test_the_hessian_accumulator_is_two_over_n_x_transpose_x_over_uneven_batches():
    gen = torch.Generator().manual_seed(15)
    batches = [torch.randn(2, 5, 24, generator=gen), torch.randn(1, 24, generator=gen), torch.randn(37, 24, generator=gen),
               torch.randn(3, 1, 24, generator=gen)]
    acc = HessianAccumulator(24)
    for b in batches:
        acc.add(b)
    x = torch.cat([b.reshape(-1, 24) for b in batches]).double()
    assert acc.count == x.shape[0] == 51
    assert acc.hessian.dtype == torch.float64
    torch.testing.assert_close(acc.hessian, 2.0 / x.shape[0] * x.T @ x, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.randn(4, 23))
