"""GPTQ: rounding a linear's weights onto a runtime's fixed grid using second-order information of its inputs.

Frantar et al. 2022 ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
Algorithm 1). Columns of W [N, K] are quantized one at a time; the rounding error of column j, weighted by the
Cholesky factor of the inverse Hessian H = 2/n X^T X of the layer's inputs, is pushed onto the columns not yet
quantized, so that X W^T rather than W itself stays close to the original.

Grid parameters are *static*: every group's scale / zero point is fitted once, before the loop, from the
weights as they come in (`Grid.fit`), and column k always uses the parameters of group k // group_size of the
original column order, also when `act_order` visits columns in another order. So the result lies exactly on
the per-group grid a runtime stores: `grid.dequantize(codes, scale, zero)` is the weight it computes with.

Precision: the Hessian, its damping and both Cholesky factorizations are float64 -- H of a transformer linear
is badly conditioned (outlier input channels make diag(H) span many decades) and forming its inverse in
float32 loses the small pivots that weight the error feedback. The column loop and the error propagation are
float32: they only move rounding errors of a few grid steps, and float32 halves the cost of the big matmuls.
The codes themselves are chosen in float32 exactly as `Grid.quantize` chooses them.

Failure: if the damped Hessian is not positive definite, damping is retried at 10x, 100x and 1000x; if that
still fails (NaN / inf activations) `gptq` raises `GptqFailed`, which carries the reason and the
round-to-nearest result as `.fallback` so a caller can keep going deliberately rather than silently.
"""
from __future__ import annotations

import torch

from llmship.compress.grids import Grid
from llmship.errors import ModelError

DAMP_STEPS = (1.0, 10.0, 100.0, 1000.0)  # multiples of `damp` tried before giving up

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # codes int16 [N, K], scale [N, G], zero


class GptqFailed(ModelError):
    """GPTQ could not factor the Hessian; `fallback` is the round-to-nearest (codes, scale, zero) on the same grid."""

    def __init__(self, reason: str, fallback: Quantized):
        super().__init__(f"GPTQ failed: {reason} (the round-to-nearest result is attached as .fallback)")
        self.reason = reason
        self.fallback = fallback


class HessianAccumulator:
    """H = 2/n sum x x^T over the n input vectors x [..., K] a linear saw, kept as a running mean in float64
    so that any number of batches of any size can be fed without the sum growing or losing precision."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self._h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self._n = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs have {x.shape[-1]} features, the accumulator expects {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(torch.float64)
        m = x.shape[0]
        if m == 0:
            return
        total = self._n + m
        self._h.mul_(self._n / total).addmm_(x.T, x, alpha=2.0 / total)
        self._n = total

    @property
    def count(self) -> int:
        return self._n

    @property
    def hessian(self) -> torch.Tensor:
        return self._h.clone()


# ---- shared steps ------------------------------------------------------------------------------------------

def _prepare(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, act_order: bool):
    """Dead inputs fixed, column order chosen. Returns (W float64 [N, K], H float64 [K, K], perm)."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian is {tuple(hessian.shape)}, weight {tuple(weight.shape)} needs ({k}, {k})")
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    # An input that never fired has no curvature: its weight cannot change the output, so it is zeroed (and
    # H gets a unit pivot so the factorization exists); its weight then widens no group's range either.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if act_order:  # the columns with the most curvature first, while the others can still absorb their error
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    else:
        perm = torch.arange(k)
    return w, h, perm


def _column_params(grid: Grid, scale: torch.Tensor, zero: torch.Tensor | None, perm: torch.Tensor):
    """Per-column scale / zero [N, K] in the visiting order; column k keeps its original group k // group_size."""
    k = perm.numel()
    width = grid.group_width(k)
    s = scale.repeat_interleave(width, dim=1)[:, :k][:, perm]
    z = None if zero is None else zero.repeat_interleave(width, dim=1)[:, :k][:, perm]
    return s, z


def _round(grid: Grid, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized value) of w on scale s / zero z, with the same float32 arithmetic as Grid.quantize
    and Grid.dequantize, so the error fed back is exactly the error the runtime will make."""
    x = w.float() / s
    if z is not None:
        x = x + z
    codes = torch.clamp(torch.round(x), grid.qmin, grid.qmax)
    deq = codes - z if z is not None else codes
    return codes.to(torch.int16), deq * s


def _inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, str]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 in float64, retrying with more damping."""
    k = h.shape[0]
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(k, dtype=h.dtype)
    reason = "the Hessian is not finite"
    if not torch.isfinite(h).all():
        return None, reason
    for step in DAMP_STEPS:
        lower, info = torch.linalg.cholesky_ex(h + (damp * step) * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper, ""
        reason = f"the Hessian is not positive definite even with damping {damp * step:g} x mean(diag H)"
    return None, reason


# ---- GPTQ ----------------------------------------------------------------------------------------------------

def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float = 0.01, act_order: bool = True,
         block_size: int = 128, search: str = "mse") -> Quantized:
    """GPTQ with lazy batch updates: (codes int16 [N, K], scale [N, G], zero [N, G] | None) like Grid.rtn.

    Columns are processed `block_size` at a time; inside a block the error feedback is applied column by
    column, and the block's accumulated errors reach the remaining columns in one matmul. Raises GptqFailed
    (with the RTN result attached) when the Hessian cannot be factored."""
    w64, h, perm = _prepare(weight, hessian, grid, act_order)
    scale, zero = grid.fit(w64.float(), search)
    upper, reason = _inverse_factor(h[perm][:, perm], damp)
    if upper is None:
        raise GptqFailed(reason, (grid.quantize(w64.float(), scale, zero), scale, zero))
    s, z = _column_params(grid, scale, zero, perm)
    # Transposed ([K, N], one visited column per row) so each column's update touches contiguous memory.
    wt = w64.float()[:, perm].T.contiguous()
    st, zt = s.T.contiguous(), None if z is None else z.T.contiguous()
    u = upper.float()
    k = wt.shape[0]
    codes = torch.empty_like(wt, dtype=torch.int16)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        block = wt[b0:b1]  # a view: updates land in wt
        err = torch.empty_like(block)
        for i in range(b1 - b0):
            j = b0 + i
            codes[j], deq = _round(grid, block[i], st[j], None if zt is None else zt[j])
            err[i] = (block[i] - deq) / u[j, j]
            block[i + 1:].addr_(u[j, j + 1:b1], err[i], alpha=-1.0)
        if b1 < k:  # the lazy batch update: the whole block's error reaches every later column at once
            wt[b1:].addmm_(u[b0:b1, b1:].T, err, alpha=-1.0)
    inverse = torch.argsort(perm)
    return codes.T[:, inverse].contiguous(), scale, zero


def gptq_reference(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float = 0.01,
                   act_order: bool = True, search: str = "mse") -> Quantized:
    """Algorithm 1 without lazy batching, in float64, as plainly as it can be written (a test oracle and the
    documentation of what `gptq` computes). No damping retries: it fails where the Hessian cannot be factored."""
    w, h, perm = _prepare(weight, hessian, grid, act_order)
    scale, zero = grid.fit(w.float(), search)
    s, z = _column_params(grid, scale, zero, perm)
    w, h = w[:, perm], h[perm][:, perm]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.empty(w.shape, dtype=torch.int16)
    for j in range(w.shape[1]):
        codes[:, j], q = _round(grid, w[:, j], s[:, j], None if z is None else z[:, j])
        err = (w[:, j] - q.double()) / hinv[j, j]
        w[:, j + 1:] -= torch.outer(err, hinv[j, j + 1:])
    return codes[:, torch.argsort(perm)], scale, zero
