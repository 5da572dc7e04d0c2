"""Integer grids a runtime can hold, and round-to-nearest on them.

A grid is what one runtime's kernel reads back for one weight matrix [N, K] (N output channels, K inputs):
integer codes in [qmin, qmax], one scale per group of `group_size` inputs of a row (or per row), and for an
asymmetric grid a zero point per group, so that

    w[n, k] ~= scale[n, g] * (code[n, k] - zero[n, g])          g = k // group_size

Scales are rounded to the dtype the runtime stores (`scale_dtype`) *before* codes are chosen, so the weights
the record holds are exactly the weights the runtime computes with. `zero_point` says what the runtime
stores: None (symmetric, no zero point), "int" (an integer in [qmin, qmax]) or "float" (a real offset,
stored in `zero_dtype`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Ratios of the group's range tried by the "mse" fit (1.0 = plain min/max).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int | None  # None: one group per row (per output channel)
    symmetric: bool
    qmin: int
    qmax: int
    scale_dtype: str = "fp32"
    zero_point: str | None = None  # None (symmetric) | "int" | "float"
    zero_dtype: str = "fp32"  # storage of a float zero point
    min_scale: float = 0.0  # smallest scale the runtime accepts (e.g. the smallest normal fp16)
    # A palette (k-means lookup table) instead of an affine grid: codes index a 2^bits-entry table shared by
    # `group_size` consecutive output channels; the record keeps the tables where affine grids keep scales.
    palette: bool = False

    def __post_init__(self):
        if self.symmetric != (self.zero_point is None):
            raise ValueError("a symmetric grid has no zero point; an asymmetric one needs one")

    def groups(self, k: int) -> int:
        """Groups of a row of k inputs; the last may be partial (a runtime that pads K to whole blocks)."""
        return 1 if self.group_size is None else -(-k // self.group_size)

    def group_width(self, k: int) -> int:
        return k if self.group_size is None else self.group_size

    def describe(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "qmin": self.qmin,
                "qmax": self.qmax, "scale_dtype": self.scale_dtype, "zero_point": self.zero_point}

    # ---- storage rounding -------------------------------------------------------------------------------

    def round_scale(self, scale: torch.Tensor) -> torch.Tensor:
        s = torch.clamp(scale.float(), min=max(self.min_scale, torch.finfo(torch.float32).tiny))
        return s.to(DTYPES[self.scale_dtype]).float()

    def round_zero(self, zero: torch.Tensor) -> torch.Tensor:
        if self.zero_point == "int":
            return torch.clamp(torch.round(zero), self.qmin, self.qmax)
        return zero.float().to(DTYPES[self.zero_dtype]).float()

    # ---- round-to-nearest ---------------------------------------------------------------------------------

    def _params(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (rounded to storage) and zero point for groups whose values span [lo, hi]."""
        if self.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            return self.round_scale(amax / self.qmax), None
        if self.zero_point == "int":  # an integer zero point must represent 0 exactly inside the range
            lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = self.round_scale(torch.where(hi > lo, (hi - lo) / (self.qmax - self.qmin), torch.ones_like(hi)))
        return scale, self.round_zero(self.qmin - lo / scale)

    def fit(self, w: torch.Tensor, search: str = "minmax") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scales [N, G] (and zero points) for matrix w [N, K] by each group's min/max, or ("mse") the clip of the
        group's range among CLIP_RATIOS that minimises the group's weight error."""
        n, k = w.shape
        groups = self._padded(w.float()).reshape(n, self.groups(k), self.group_width(k))
        lo, hi = groups.amin(-1), groups.amax(-1)
        if search == "minmax":
            return self._params(lo, hi)
        best = None
        for ratio in CLIP_RATIOS:
            scale, zero = self._params(lo * ratio, hi * ratio)
            err = self._padded(self.dequantize(self.quantize(w, scale, zero), scale, zero) - w.float()).reshape(groups.shape).pow(2).sum(-1)
            if best is None:
                best = (err, scale, zero)
            else:
                better = err < best[0]
                best = (torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                        None if zero is None else torch.where(better, zero, best[2]))
        return best[1], best[2]

    def _padded(self, w: torch.Tensor) -> torch.Tensor:
        """w with zero columns up to whole groups (how a runtime pads K; zeros widen no symmetric range)."""
        k = w.shape[-1]
        pad = self.groups(k) * self.group_width(k) - k
        return torch.nn.functional.pad(w, (0, pad)) if pad else w

    def _expand(self, t: torch.Tensor, k: int) -> torch.Tensor:
        return t.repeat_interleave(self.group_width(k), dim=-1)[..., :k]

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Integer codes (int16) of w [N, K] on this grid's given scales/zero points: nearest, ties to even."""
        k = w.shape[-1]
        x = w.float() / self._expand(scale, k)
        if zero is not None:
            x = x + self._expand(zero, k)
        return torch.clamp(torch.round(x), self.qmin, self.qmax).to(torch.int16)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        if self.palette:  # scale holds the tables [N / group_size, 2^bits]
            rows = torch.arange(codes.shape[0]) // self.group_size
            return scale.float()[rows[:, None], codes.long()]
        k = codes.shape[-1]
        x = codes.float()
        if zero is not None:
            x = x - self._expand(zero, k)
        return x * self._expand(scale, k)

    def rtn(self, w: torch.Tensor, search: str = "minmax"):
        """(codes, scale, zero) of w by round-to-nearest (for a palette: k-means tables and nearest entries)."""
        if self.palette:
            from llmship.compress.palette import kmeans

            return kmeans(w, self)
        scale, zero = self.fit(w, search)
        return self.quantize(w, scale, zero), scale, zero


def symmetric(bits: int, group_size: int | None, scale_dtype: str = "fp32", full_range: bool = True, min_scale: float = 0.0) -> Grid:
    """A signed grid without zero points: codes -2^(b-1)..2^(b-1)-1 (full range) or symmetric about 0."""
    top = 2 ** (bits - 1) - 1
    return Grid(bits, group_size, True, -top - 1 if full_range else -top, top, scale_dtype, None, min_scale=min_scale)


def asymmetric(bits: int, group_size: int | None, scale_dtype: str = "fp32", zero_point: str = "int", zero_dtype: str = "fp32") -> Grid:
    """An unsigned grid with a zero point per group: codes 0..2^b-1."""
    return Grid(bits, group_size, False, 0, 2 ** bits - 1, scale_dtype, zero_point, zero_dtype)


def palette(bits: int, rows_per_table: int, table_dtype: str = "fp16") -> Grid:
    """A 2^bits-entry lookup table per `rows_per_table` output channels (Core ML's per-grouped-channel palettes)."""
    return Grid(bits, rows_per_table, True, 0, 2 ** bits - 1, table_dtype, None, palette=True)
