"""ONNX Runtime's weight grids, and the compression record written into the graph as ONNX Runtime's own ops.

Grids (`weight_plan`), per matrix (rules of llmship/compress/plan.py):
  int4 / int8 with a group size   MatMulNBits blocks of g along K (K padded to whole blocks): asymmetric with a
                                  float zero point by default (what HQQ fits; stored as an integer zero point
                                  plus an fp32 correction, see `integer_zero_points`), or symmetric (codes
                                  +2^(b-1), MatMulNBits' default zero point) with recipe.symmetric true.
  int8 without a group size       per output channel, symmetric [-127, 127]: DynamicQuantizeLinear + MatMulInteger
                                  (activations quantized per tensor, uint8, at run time).
  the embedding                   tied: the head's MatMulNBits blocks, read by GatherBlockQuantized, which takes
                                  integer zero points only; untied int8: symmetric rows; untied int4: asymmetric
                                  blocks with integer zero points (GatherBlockQuantized).
Activations: recipe.activations int8 sets MatMulNBits' accuracy_level 4 (inputs quantized per block of g to
int8, symmetric); fp32 leaves it at 0 (weights dequantized, fp32 compute).

The codes, scales and zero points come from the record as they are: nothing here chooses a quantization
parameter, so the runtime's dequantized weights are the record's.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llmship.compress.grids import Grid, asymmetric, symmetric
from llmship.compress.plan import EMBEDDING, HEAD, matrix_shapes, module_rules

DEFAULT_BLOCK = 32


def grid_for(rule, name: str, tied: bool) -> Grid | None:
    if not rule.quantized:
        return None
    bits = 4 if rule.weights == "int4" else 8
    if name == EMBEDDING:
        if not tied and bits == 8 and rule.group_size is None:
            return symmetric(8, None, full_range=False)
        g = rule.group_size or DEFAULT_BLOCK
        return symmetric(bits, g) if rule.symmetric else asymmetric(bits, g, zero_point="int")
    if bits == 8 and rule.group_size is None:
        return symmetric(8, None, full_range=False)  # MatMulInteger
    g = rule.group_size or DEFAULT_BLOCK
    if rule.symmetric:
        return symmetric(bits, g)
    return asymmetric(bits, g, zero_point="float" if bits == 4 else "int")


def weight_plan(target, spec) -> tuple[dict[str, Grid | None], dict[str, dict]]:
    """The grid of every matrix, and how ONNX Runtime quantizes each quantized linear's input."""
    tied = spec.tie_word_embeddings
    grids = {name: grid_for(rule, name, tied) for name, rule in module_rules(target.recipe, spec).items()}
    activations = {}
    int8_compute = target.recipe.activations == "int8"
    linears = [n for n in matrix_shapes(spec) if n != EMBEDDING] + ([HEAD] if tied else [])
    for name in linears:
        grid = grids.get(name) if name in grids else grids[EMBEDDING]
        if grid is None:
            continue
        if grid.group_size is None:
            activations[name] = {"scheme": "uint8_per_tensor_asymmetric"}
        elif int8_compute:
            # float zero points run as an integer kernel plus an fp32 correction that sees the unquantized input
            activations[name] = {"scheme": "int8_per_block_symmetric", "block": "group", "split_float_zero": grid.zero_point == "float"}
        else:
            activations[name] = {"scheme": "none"}
    return grids, activations


# ---- writing the record into the graph ------------------------------------------------------------------------

def _initializer(model, name: str, array: np.ndarray):
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    model.graph.register_initializer(value)
    return value


def _unsigned(t) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes as stored unsigned (a symmetric grid's codes shifted by 2^(b-1), MatMulNBits' default zero point)."""
    codes = t.codes.numpy().astype(np.int32)
    if t.grid.symmetric:
        return (codes + 2 ** (t.grid.bits - 1)).astype(np.uint8), None
    return codes.astype(np.uint8), t.zero.numpy()


def nbits_arrays(t) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B [N, blocks, bytes] uint8, scales [N, blocks] fp32, zero points) in MatMulNBits' layout: K padded to whole
    blocks, 4-bit codes two a byte with the first in the low nibble; float zero points as they are, integer ones
    packed like the codes ([N, ceil(blocks * bits / 8)])."""
    n, k = t.shape
    bits, block = t.grid.bits, t.grid.group_size
    blocks = -(-k // block)
    q, zero = _unsigned(t)
    q = np.pad(q, ((0, 0), (0, blocks * block - k)), constant_values=0 if zero is not None else 2 ** (bits - 1))
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    packed = np.ascontiguousarray(q.reshape(n, blocks, -1))
    scales = np.ascontiguousarray(t.scale.numpy().astype(np.float32).reshape(n, blocks))
    if zero is None or t.grid.zero_point == "float":
        return packed, scales, None if zero is None else np.ascontiguousarray(zero.astype(np.float32).reshape(n, blocks))
    z = zero.astype(np.uint8).reshape(n, blocks)
    if bits == 4:
        z = np.pad(z, ((0, 0), (0, blocks % 2)))
        z = z[:, 0::2] | (z[:, 1::2] << 4)
    return packed, scales, np.ascontiguousarray(z)


def matmul_nbits(model, node, t, accuracy_level: int):
    """Replace MatMul(x, W^T) by MatMulNBits(x; the record's blocks)."""
    packed, scales, zero = nbits_arrays(t)
    n, k = t.shape
    base = node.name.removesuffix("/MatMul")
    inputs = [node.inputs[0], _initializer(model, f"{base}.weight_Q{t.grid.bits}", packed), _initializer(model, f"{base}.weight_scales", scales)]
    if zero is not None:
        inputs.append(_initializer(model, f"{base}.weight_zero_points", zero))
    new = ir.node("MatMulNBits", inputs, {"K": k, "N": n, "bits": t.grid.bits, "block_size": t.grid.group_size,
                                          "accuracy_level": accuracy_level},
                  domain="com.microsoft", name=f"{node.name}_Q{t.grid.bits}")
    _swap(model, node, [new])


def matmul_integer(model, node, t):
    """Replace MatMul(x, W^T) by dynamic int8: DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq^T) * (x_scale * w_scale)."""
    base = node.name.removesuffix("/MatMul")
    wq = _initializer(model, f"{base}.MatMul.weight_quantized", np.ascontiguousarray(t.codes.numpy().astype(np.int8).T))
    ws = _initializer(model, f"{base}.MatMul.weight_scale", t.scale.numpy().astype(np.float32).reshape(-1))
    wz = _initializer(model, f"{base}.MatMul.weight_zero_point", np.zeros(t.shape[0], dtype=np.int8))
    quant = ir.node("DynamicQuantizeLinear", [node.inputs[0]], num_outputs=3, name=f"{base}/DynamicQuantizeLinear")
    xq, xs, xz = quant.outputs
    mm = ir.node("MatMulInteger", [xq, wq, xz, wz], name=f"{node.name}_quant")
    cast = ir.node("Cast", [mm.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}/Cast")
    scale = ir.node("Mul", [xs, ws], name=f"{base}/ScaleMul")
    out = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{base}/Mul")
    _swap(model, node, [quant, mm, cast, scale, out])


def _swap(model, node, nodes) -> None:
    """Put `nodes` where `node` was; the last one's output takes over the old output (and its name)."""
    old_out, weight = node.outputs[0], node.inputs[1]
    model.graph.insert_before(node, nodes)
    name = old_out.name
    old_out.replace_all_uses_with(nodes[-1].outputs[0], replace_graph_outputs=True)
    model.graph.remove(node, safe=True)
    nodes[-1].outputs[0].name = name
    if weight is not None and weight.is_initializer() and not weight.uses():
        model.graph.initializers.pop(weight.name, None)


def embedding_rows(model, embed, t, adder, dequantize_rows) -> None:
    """An untied embedding on a per-row symmetric int8 grid: Gather the codes, times the row's scale."""
    table, ids, nodes = embed.inputs[0], embed.inputs[1], []
    add = adder(nodes, embed.name)
    q = _initializer(model, f"{table.name}_quantized", t.codes.numpy().astype(np.int8))
    out = dequantize_rows(add, lambda v: add("Constant", [], value_ints=list(v)), add("Gather", [q, ids]), ids,
                          _initializer(model, f"{table.name}_scale", t.scale.numpy().astype(np.float32).reshape(-1)))
    model.graph.insert_before(embed, nodes)
    embed.outputs[0].replace_all_uses_with(out)
    model.graph.remove(embed, safe=True)
    if not table.uses():
        model.graph.initializers.pop(table.name, None)


def embedding_blocks(model, embed, t, adder) -> None:
    """An untied embedding on a block grid: GatherBlockQuantized over the record's rows."""
    packed, scales, zero = nbits_arrays(t)
    n, blocks, nbytes = packed.shape
    table, ids, nodes = embed.inputs[0], embed.inputs[1], []
    add = adder(nodes, embed.name)
    data = _initializer(model, f"{table.name}_Q{t.grid.bits}", packed.reshape(n, blocks * nbytes))
    rest = [_initializer(model, f"{table.name}_scales", scales)]
    if zero is not None:
        rest.append(_initializer(model, f"{table.name}_zero_points", zero))
    out = add("GatherBlockQuantized", [data, ids, *rest], domain="com.microsoft", bits=t.grid.bits,
              block_size=t.grid.group_size, gather_axis=0, quantize_axis=1)
    if t.shape[1] != blocks * t.grid.group_size:
        c = [add("Constant", [], value_ints=[v]) for v in (0, t.shape[1], -1)]
        out = add("Slice", [out, *c])
    model.graph.insert_before(embed, nodes)
    embed.outputs[0].replace_all_uses_with(out)
    model.graph.remove(embed, safe=True)
    if not table.uses():
        model.graph.initializers.pop(table.name, None)


def integer_zero_points(model, adder) -> int:
    """Split float zero points into the integer part MatMulNBits' fast CPU kernels take and a per-block fp32
    remainder applied as a correction: with z = zi + zr,

        x @ ((q - z) * s)  =  MatMulNBits(x; q, s, zi)  -  blocksum(x) @ (zr * s)

    where blocksum(x) sums x over each block of K. ORT runs MatMulNBits with float zero points through a
    dequantize-everything path, ten times slower than fp32 MatMul here; the split keeps the exact weights
    at the cost of a [K/block, N] fp32 MatMul per linear. Returns the nodes rewritten."""
    sums, count = {}, 0
    for node in list(model.graph):
        if node.op_type != "MatMulNBits" or len(node.inputs) < 4 or node.inputs[3].dtype != ir.DataType.FLOAT:
            continue
        n, k, block, bits = (node.attributes[a].as_int() for a in ("N", "K", "block_size", "bits"))
        blocks = -(-k // block)
        scale = node.inputs[2].const_value.numpy().reshape(n, blocks)
        zero = node.inputs[3].const_value.numpy().reshape(n, blocks)
        whole = np.clip(np.round(zero), 0, 2**bits - 1).astype(np.uint8)
        stored = whole
        if bits == 4:  # two blocks a byte, the first in the low nibble
            pairs = np.pad(whole, ((0, 0), (0, blocks % 2))).reshape(n, -1, 2)
            stored = pairs[..., 0] | (pairs[..., 1] << 4)
        name = model.graph.initializers.pop(node.inputs[3].name).name
        node.replace_input_with(3, _initializer(model, name, np.ascontiguousarray(stored)))
        remainder = _initializer(model, f"{name}_remainder", np.ascontiguousarray(((zero - whole) * scale).T.astype(np.float32)))
        x, nodes = node.inputs[0], []
        add = adder(nodes, node.name)

        if (x, block) not in sums:  # q/k/v and gate/up share their input: one block sum per input and block size
            padded = add("Pad", [x, add("Constant", [], value_ints=[0, 0, 0, 0, 0, blocks * block - k])]) if k % block else x
            reshaped = add("Reshape", [padded, add("Constant", [], value_ints=[0, 0, blocks, block])])
            sums[x, block] = add("ReduceSum", [reshaped, add("Constant", [], value_ints=[-1])], keepdims=0)
        correction = add("MatMul", [sums[x, block], remainder])
        model.graph.insert_after(node, nodes)
        out = node.outputs[0]
        fixed = ir.node("Sub", [out, correction], name=f"{node.name}/Sub")
        model.graph.insert_after(nodes[-1], fixed)
        name, out.name = out.name, f"{out.name}/uncorrected"
        out.replace_all_uses_with(fixed.outputs[0], replace_graph_outputs=True)
        fixed.replace_input_with(0, out)
        fixed.outputs[0].name = name  # e.g. `logits` when the head is one of them
        count += 1
    return count
