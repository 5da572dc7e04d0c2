"""A source's own quantization blocks (GGUF Q4_0 / Q4_1 / Q8_0) on a runtime's grid, where the grid holds them.

    Q4_1  w = d * q + m, q in 0..15   ->  asymmetric 4-bit, scale d, float zero point -m / d
    Q4_0  w = d * (q - 8)             ->  symmetric 4-bit (codes q - 8), or asymmetric with integer zero point 8
    Q8_0  w = d * q, q in -127..127   ->  symmetric 8-bit, or asymmetric 8-bit with integer zero point 128

A grid holds a block type when its bits and group size are the block's, it has the zero point the type needs,
and it stores the block scale d (fp16 in the file) exactly. A float zero point stored in fp16 (Core ML's
offset) is rounded: the weights then differ from the file's by that rounding, which the record notes.
"""
from __future__ import annotations

import torch

from llmship.compress.grids import DTYPES, Grid

EXACT_IN = {"fp32": ("fp16", "fp32"), "fp16": ("fp16",), "bf16": ()}  # d is fp16: what holds it exactly


def fits(blocks, grid: Grid) -> str | None:
    """None when `grid` holds these blocks; else why not (for the report)."""
    bits = 8 if blocks.kind == "Q8_0" else 4
    if grid.bits != bits or grid.group_size != blocks.block:
        return f"{blocks.kind} is {bits}-bit in blocks of {blocks.block}; the runtime's grid is {grid.bits}-bit in groups of {grid.group_size}"
    if blocks.kind == "Q4_1" and grid.zero_point != "float":
        return ("Q4_1 blocks have a minimum offset, which needs a float zero point; the runtime's 4-bit grid is "
                + ("symmetric" if grid.symmetric else "integer-zero-point"))
    if "fp16" not in EXACT_IN[grid.scale_dtype] and not _representable(blocks.d, grid.scale_dtype):
        return f"the runtime stores scales as {grid.scale_dtype}, which cannot hold {blocks.kind}'s fp16 block scales"
    if blocks.kind in ("Q4_0", "Q8_0") and grid.symmetric and grid.qmin > (-8 if bits == 4 else -127):
        return f"the runtime's symmetric grid [{grid.qmin}, {grid.qmax}] does not reach {blocks.kind}'s codes"
    return None


def _representable(x: torch.Tensor, dtype: str) -> bool:
    return bool(torch.equal(x.float().to(DTYPES[dtype]).float(), x.float()))


def on(blocks, grid: Grid):
    """(codes, scale, zero) of the blocks on `grid` (which `fits` accepted)."""
    q, d = blocks.codes.to(torch.int16), blocks.d.float()
    if blocks.kind == "Q4_1":  # w = d * (q - z), z = -m / d
        zero = torch.where(d != 0, -blocks.m.float() / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
        return q, d, grid.round_zero(zero)
    offset = 8 if blocks.kind == "Q4_0" else 0  # Q4_0 stores q + 8
    signed = q - offset
    if grid.symmetric:
        return signed, d, None
    middle = 2 ** (grid.bits - 1)
    return signed + middle, d, torch.full_like(d, float(middle))
