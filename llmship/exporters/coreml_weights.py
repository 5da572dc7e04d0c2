"""Core ML's weight grids, and the compression record written into the ML program as compile-time
decompression ops.

Grids (`weight_plan`), per matrix (rules of llmship/compress/plan.py), iOS 18 opsets:
  int8   symmetric [-127, 127] per output channel or per block of g inputs, scale in the compute dtype
         (constexpr_blockwise_shift_scale, no offset)
  int4   uint4 per block of g inputs (default 32), scale and offset in the compute dtype, w = scale * (q - offset):
         an asymmetric grid with a float zero point, which holds a GGUF's Q4_1 blocks (min + d * q) as they are
         (constexpr_blockwise_shift_scale)
  pal4   a 16-entry table per g output channels (default 16), fitted by coremltools' k-means
         (constexpr_lut_to_dense)
A matrix whose width is not a whole number of blocks (or whose height is not a whole number of palette
groups), or of at most 2,048 weights (coremltools' own threshold), stays in the compute dtype; so does the
embedding (and a head tied to it) with recipe.embedding fp16.
Core ML runs the program in its compute precision: there is no activation quantization to simulate.

Every record tensor is written by name: the const a linear reads is named after its PyTorch parameter
(`p_model_layers_0_self_attn_q_proj_weight[_to_fp16]`), and every const the record does not cover keeps the
compute dtype. A palette is handed to coremltools' palettizer as tables it only has to read back: the weights
it is given already lie on the record's table, so its "clustering" returns that table.
"""
from __future__ import annotations

import re

import numpy as np

from llmship.compress.grids import Grid, asymmetric, palette, symmetric
from llmship.compress.plan import EMBEDDING, HEAD, matrix_shapes, module_rules

# `_inner`: a linear with a separate adapter's branch beside it (adapters/branch.py) keeps its weight one level down
PARAM_CONST = re.compile(r"^p_(.+?)(?:_inner)?_weight(?:_to_fp16)?$")
# coremltools.optimize leaves consts of at most this many elements uncompressed (its weight_threshold): small
# matrices save nothing worth their error. The same rule for every recipe here.
MIN_ELEMENTS = 2048


def grid_for(rule, shape: tuple[int, int], compute: str) -> Grid | None:
    n, k = shape
    if n * k <= MIN_ELEMENTS:
        return None
    if rule.weights == "int8":
        g = rule.group_size
        return None if g and k % g else symmetric(8, g, scale_dtype=compute, full_range=False)
    if rule.weights == "int4":
        g = rule.group_size or 32
        return None if k % g else asymmetric(4, g, scale_dtype=compute, zero_point="float", zero_dtype=compute)
    if rule.weights == "pal4":
        g = rule.group_size or 16
        return None if n % g else palette(4, g, table_dtype=compute)
    return None


def weight_plan(target, spec) -> tuple[dict[str, Grid | None], dict[str, dict]]:
    recipe = target.recipe
    shapes = matrix_shapes(spec)
    grids = {}
    for name, rule in module_rules(recipe, spec).items():
        if name == EMBEDDING and recipe.embedding == "fp16":
            grids[name] = None
        else:
            grids[name] = grid_for(rule, shapes[name], recipe.compute)
    return grids, {}


def const_module(op_name: str, tied: bool) -> str | None:
    """The module a weight const belongs to, from its name (None for consts that are not parameters)."""
    m = PARAM_CONST.match(op_name)
    if not m:
        return None
    module = m.group(1)
    return EMBEDDING.replace(".", "_") if tied and module == HEAD else module


def record_consts(record, spec, palette: bool = False) -> dict:
    """Const module name (dots as underscores) -> record tensor (affine ones, or palettes), under every path that
    runs it: a shared block's const carries whichever of its layers' names torch.export kept."""
    from llmship.compress.plan import module_uses

    if record is None:
        return {}
    return {use.replace(".", "_"): t for name, t in record.tensors.items() if t.grid.palette == palette
            for use in module_uses(spec, name)}


def register_record_pass() -> str:
    """Register (once) the graph pass that replaces each recorded weight const by its blocks; returns its name."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    name = "llmship::record_weights"
    if name in PASS_REGISTRY:
        return name

    @register_pass(namespace="llmship")
    class record_weights(AbstractGraphPass):  # noqa: N801 (coremltools names passes in snake case)
        def __init__(self):
            self.consts, self.tied, self.used = {}, False, set()

        def apply(self, prog):
            by_const = self.consts
            for func in prog.functions.values():
                with func:
                    for op in list(func.find_ops(op_type="const")):
                        t = by_const.get(const_module(op.name, self.tied))
                        if t is None:
                            continue
                        w = op.outputs[0].val
                        if tuple(w.shape) != t.shape:
                            raise ValueError(f"const {op.name} is {w.shape}, the record's {t.name} is {t.shape}")
                        data, scale, offset = blockwise_arrays(t, w.dtype)
                        data = data.astype(types.np_uint4_dtype) if t.grid.bits == 4 else data
                        new = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset, before_op=op,
                                                                 name=op.name + f"_q{t.grid.bits}")
                        func.replace_uses_of_var_after_op(anchor_op=new.op, old_var=op.outputs[0], new_var=new)
                        func.remove_ops([op])
                        self.used.add(t.name)

    PASS_REGISTRY.add("llmship", record_weights, True, "record_weights")
    return name


def blockwise_arrays(t, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """constexpr_blockwise_shift_scale's operands for a record tensor: output = scale * (data - offset)."""
    scale = t.scale.numpy().astype(dtype)
    if t.grid.symmetric:
        return t.codes.numpy().astype(np.int8), scale, None
    return t.codes.numpy().astype(np.uint8), scale, t.zero.numpy().astype(dtype)


def table_lut(group: np.ndarray, bits: int = 4):
    """coremltools' custom LUT function for weights already on a palette: the group's distinct values are its
    table (fewer than 2^bits are padded with the largest), the indices point into it; dequantizing gives the
    group back exactly.

    The work is done in float32 (exact for fp16): numpy 2.4's float16 sort, which np.unique uses, returns
    unsorted runs on some x86 CPUs for arrays of a few thousand elements with many repeats (this machine's
    EPYC, 16 x 576 weights), and would make 16 values look like 20."""
    wide = group.astype(np.float32)
    values = np.unique(wide)
    if len(values) > 2 ** bits:
        raise ValueError(f"a palette group holds {len(values)} distinct values, more than a {bits}-bit table")
    table = np.concatenate([values, np.full(2 ** bits - len(values), values[-1], dtype=values.dtype)])
    indices = np.searchsorted(values, wide).astype(np.uint8)
    return table.astype(group.dtype), indices
