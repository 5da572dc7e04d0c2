"""LiteRT's weight grids, and the compression record written into the .tflite by ai-edge-quantizer.

Grids (`weight_plan`), per matrix (rules of llmship/compress/plan.py), as LiteRT's kernels read them back:
  int8       per output channel, symmetric narrow range [-127, 127], fp32 scales (ai-edge-quantizer's 8-bit
             symmetric grid).
  int4       blocks of group_size inputs (32/64/128/256), symmetric [-8, 7]. ai-edge-quantizer stores block scales
             as fp16 after rounding them to bf16, so the record's scales are bf16 values no smaller than the
             smallest normal fp16: then the stored scale is the record's. A linear whose input width is not a
             whole number of blocks gets the int8 grid (per-block scales need whole blocks).
  fp16/fp32  not in the record; fp16 is ai-edge-quantizer's FLOAT_CASTING.
The embedding takes its rule's grid; a tied head reads the same tensor (one buffer, one record entry).
Activations: recipe.activations int8 is dynamic range, XNNPACK quantizing each quantized linear's input per row,
asymmetric (compress.activations.int8_per_token_asymmetric); fp32 with int8 weights is weight-only.

How the record gets into the file (`quantize`), the quantizer's plugin route rather than patching the flatbuffer:
litert-torch keeps every weight as a float constant, so each FULLY_CONNECTED / EMBEDDING_LOOKUP weight is identified
by its content, which is the canonical model's weight (for a recorded matrix, the record's dequantized weight; its
tensor names are fused locations such as `...Linear_q_proj;;...Linear_k_proj;`, no reliable key). ai-edge-quantizer
then gets one rule per op (its scope: the op's output tensor names) with the grid of that op's matrix, and its
MIN_MAX_UNIFORM_QUANT materializers of those two ops are registered over for the call (`record_materializers`) so
the parameters they hand on are the record's codes and scales. The quantizer writes the tensors itself (int4
packing, scale tensors, the quantization fields of every signature's subgraph, one buffer they all read, the tied
lookup and head included). Every record tensor must end up in exactly one buffer, or the export fails. Its
flatbuffer writer is replaced for the call (`compact_writer`): it writes each numeric vector once, so the per-channel
scales every signature's tensor table repeats are stored once, and names only the tensors a signature passes in or
out (the converter's names, module paths of up to 250 characters, were a quarter of a small model's file).
"""
from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass

import numpy as np
import torch

from llmship.compress.grids import Grid, symmetric
from llmship.compress.plan import EMBEDDING, HEAD, matrix_shapes, module_rules
from llmship.compress.record import QuantizedTensor, WeightRecord

DEFAULT_BLOCK = 32
FP16_NORMAL_MIN = float(torch.finfo(torch.float16).tiny)  # 2^-14: a smaller fp16 block scale would be subnormal
FP16_MAX = float(torch.finfo(torch.float16).max)
DYNAMIC, WEIGHT_ONLY = "int8_per_token_asymmetric", "none"
FULLY_CONNECTED, EMBEDDING_LOOKUP = "FULLY_CONNECTED", "EMBEDDING_LOOKUP"
MAX_SCOPE = 10000  # ai-edge-quantizer truncates op scopes to this many characters before matching rules


# ---- grids -------------------------------------------------------------------------------------------------

def int8_grid() -> Grid:
    return symmetric(8, None, full_range=False)


def grid_for(rule, in_features: int) -> Grid | None:
    """The grid LiteRT holds for one matrix of `in_features` inputs under its rule (None: stays float)."""
    if rule.weights in ("fp32", "fp16"):
        return None
    if rule.weights == "int8":
        return int8_grid()
    if rule.weights != "int4":
        raise ValueError(f"tflite has no grid for {rule.weights} weights")
    block = rule.group_size or DEFAULT_BLOCK
    if in_features % block:
        return int8_grid()
    return symmetric(4, block, scale_dtype="bf16", min_scale=FP16_NORMAL_MIN)


def weight_plan(target, spec) -> tuple[dict[str, Grid | None], dict[str, dict]]:
    """The grid of every matrix, and how LiteRT quantizes each quantized linear's input (a tied head: `lm_head`)."""
    shapes = matrix_shapes(spec)
    grids = {name: grid_for(rule, shapes[name][1]) for name, rule in module_rules(target.recipe, spec).items()}
    scheme = {"scheme": DYNAMIC if target.recipe.activations == "int8" else WEIGHT_ONLY}
    linears = [n for n in shapes if n != EMBEDDING] + ([HEAD] if spec.tie_word_embeddings else [])
    activations = {n: dict(scheme) for n in linears if grids.get(n, grids[EMBEDDING]) is not None}
    return grids, activations


def int8_fallbacks(target, spec) -> list[str]:
    """Modules whose rule says int4 but whose input width is not a whole number of blocks: int8 per channel."""
    shapes = matrix_shapes(spec)
    return [name for name, rule in module_rules(target.recipe, spec).items()
            if rule.weights == "int4" and grid_for(rule, shapes[name][1]).bits == 8]


# ---- the float model's weights -------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightOp:
    """One FULLY_CONNECTED or EMBEDDING_LOOKUP of the float model whose weight (input 1) is a float constant."""
    subgraph: int
    op: str  # FULLY_CONNECTED | EMBEDDING_LOOKUP
    scope: str  # what ai-edge-quantizer matches rules against: the output tensor names, each followed by ';'
    buffer: int
    digest: str  # sha256 of the weight's bytes


def _digest(data) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(data)).cast("B")).hexdigest()


def weight_ops(content: bytes) -> list[WeightOp]:
    """Every weight-reading op of every subgraph (signature), read without copying the flatbuffer."""
    from ai_edge_litert import schema_py_generated as fb

    names = {fb.BuiltinOperator.FULLY_CONNECTED: FULLY_CONNECTED, fb.BuiltinOperator.EMBEDDING_LOOKUP: EMBEDDING_LOOKUP}
    model = fb.Model.GetRootAsModel(content, 0)
    digests: dict[int, str] = {}
    out = []
    for s in range(model.SubgraphsLength()):
        sg = model.Subgraphs(s)
        for o in range(sg.OperatorsLength()):
            op = sg.Operators(o)
            code = model.OperatorCodes(op.OpcodeIndex())
            kind = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))  # small codes live in the deprecated field
            if kind is None or op.InputsLength() < 2 or op.Inputs(1) < 0:
                continue
            weight = sg.Tensors(op.Inputs(1))
            if weight.Type() != fb.TensorType.FLOAT32:
                continue
            buffer = weight.Buffer()
            if buffer not in digests:
                data = _buffer_bytes(model, content, buffer)
                if data is None:
                    continue  # not a constant
                digests[buffer] = _digest(data)
            outputs = [sg.Tensors(op.Outputs(i)).Name().decode() for i in range(op.OutputsLength()) if op.Outputs(i) >= 0]
            scope = (";".join(outputs) + ";")[:MAX_SCOPE]
            out.append(WeightOp(s, kind, scope, buffer, digests[buffer]))
    return out


def _buffer_bytes(model, content: bytes, index: int):
    b = model.Buffers(index)
    if b.Offset() > 1:  # a model over 2 GB keeps its buffers after the flatbuffer
        return np.frombuffer(content, np.uint8, count=b.Size(), offset=b.Offset())
    return b.DataAsNumpy() if b.DataLength() else None


def weight_modules(ops: list[WeightOp], decoder, spec, interchangeable) -> dict[str, str]:
    """Weight digest -> module, by content: the converter stores the canonical model's weights unchanged. A tied
    matrix is one buffer (read by the lookup and the head) and maps to the embedding. Modules with identical weights
    are refused unless `interchangeable(names)` (same float precision, no record tensor)."""
    by_digest: dict[str, list[str]] = {}
    for name in matrix_shapes(spec):
        by_digest.setdefault(_digest(decoder.get_submodule(name).weight.detach().float().numpy()), []).append(name)
    out = {}
    for op in ops:
        found = by_digest.get(op.digest, [])
        if len(found) > 1 and not interchangeable(found):
            raise RuntimeError(f"modules {', '.join(found)} have identical weights: their tensors in the .tflite cannot be told apart")
        if found:
            out[op.digest] = found[0]
    return out


# ---- the quantizer's recipe ------------------------------------------------------------------------------------

def _tensor_config(bits: int, block: int | None):
    from ai_edge_quantizer import qtyping

    granularity = qtyping.QuantGranularity.CHANNELWISE if block is None else getattr(qtyping.QuantGranularity, f"BLOCKWISE_{block}")
    return qtyping.TensorQuantizationConfig(num_bits=bits, symmetric=True, granularity=granularity)


def op_config(kind: str, bits: int | None = None, block: int | None = None, dynamic: bool = False):
    """(algorithm, op config), built the way litert-torch's generative recipes build theirs (quantize.translate_recipe):
    symmetric weights; dynamic range computes in integers, weight-only and fp16 dequantize explicitly."""
    from ai_edge_quantizer import algorithm_manager, qtyping

    names = algorithm_manager.AlgorithmName
    if kind == "fp32":
        return names.NO_QUANTIZE, None
    if kind == "fp16":
        tensor = qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT)
        return names.FLOAT_CASTING, qtyping.OpQuantizationConfig(weight_tensor_config=tensor, explicit_dequantize=True,
                                                                  compute_precision=qtyping.ComputePrecision.FLOAT)
    compute = qtyping.ComputePrecision.INTEGER if dynamic else qtyping.ComputePrecision.FLOAT
    return names.MIN_MAX_UNIFORM_QUANT, qtyping.OpQuantizationConfig(
        weight_tensor_config=_tensor_config(bits, block), compute_precision=compute, explicit_dequantize=not dynamic)


def _op_setting(op: WeightOp, module: str, rule, record: WeightRecord | None, recipe) -> tuple:
    """What one op gets: ("fp32" | "fp16",) or ("int", bits, block, dynamic) from its record tensor."""
    t = record.tensors.get(module) if record is not None else None
    if t is None:
        if rule.quantized:
            raise RuntimeError(f"{module} is {rule.weights} but the compression record has no tensor for it")
        return (rule.weights,)
    if op.op == EMBEDDING_LOOKUP:  # a lookup has no input to quantize; it computes like the recipe's linears
        dynamic = recipe.activations == "int8"
    else:
        linear = HEAD if module == EMBEDDING else module  # the tied head reads the embedding's tensor
        scheme = record.activations.get(linear, {}).get("scheme", WEIGHT_ONLY)
        if scheme not in (DYNAMIC, WEIGHT_ONLY):
            raise RuntimeError(f"{linear}: LiteRT has no {scheme} activation quantization")
        dynamic = scheme == DYNAMIC
    return ("int", t.grid.bits, t.grid.group_size, dynamic)


def quantization_recipe(ops: list[WeightOp], modules: dict[str, str], rules: dict, record: WeightRecord | None, recipe):
    """ai-edge-quantizer's recipe: one rule per (op type, setting), matching exactly the scopes of its ops. Rules added
    later win, so they override the fp16 default of a recipe whose weights are fp16."""
    from ai_edge_quantizer import qtyping, recipe_manager

    manager = recipe_manager.RecipeManager()
    if recipe.weights == "fp16":  # as before the record: everything the quantizer can cast, cast to fp16
        algorithm, config = op_config("fp16")
        manager.add_quantization_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                        op_config=config, algorithm_key=algorithm)
    scopes: dict[tuple, list[str]] = {}
    for op in ops:
        if op.digest in modules:
            module = modules[op.digest]
            scopes.setdefault((op.op, *_op_setting(op, module, rules[module], record, recipe)), []).append(op.scope)
    for (op_name, kind, *grid), names in scopes.items():
        algorithm, config = op_config(kind, *grid)
        regex = "^(?:" + "|".join(re.escape(s) for s in names) + ")$"
        manager.add_quantization_config(regex=regex, operation_name=getattr(qtyping.TFLOperationName, op_name),
                                        op_config=config, algorithm_key=algorithm)
    return manager.get_quantization_recipe()


# ---- the record's parameters, handed to the quantizer ----------------------------------------------------------

def quantizer_params(t: QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [N, K], scales float32 [N, G]) of a record tensor, as ai-edge-quantizer is to store them."""
    return t.codes.numpy().astype(np.int8), t.scale.numpy().astype(np.float32)


def _check_storable(t: QuantizedTensor) -> None:
    """A tensor the quantizer would store other than as given is refused (it would silently change the weights)."""
    g = t.grid
    if not g.symmetric or (g.bits, g.qmin, g.qmax) not in ((8, -127, 127), (4, -8, 7)):
        raise ValueError(f"{t.name}: LiteRT holds symmetric int8 [-127, 127] or int4 [-8, 7] grids, not {g.describe()}")
    if g.bits == 4:
        s = t.scale
        if not torch.equal(s, s.to(torch.bfloat16).float()) or s.min() < FP16_NORMAL_MIN or s.max() > FP16_MAX:
            raise ValueError(f"{t.name}: int4 block scales must be bf16 values within fp16's normal range "
                             "(ai-edge-quantizer stores them bf16-rounded as fp16)")


def _uniform_params(t: QuantizedTensor, cfg):
    """UniformQuantParams as ai-edge-quantizer's min/max algorithm builds them (channelwise: scale [N, 1] along
    dimension 0; blockwise: scale [N, K / block] along dimension 1), with the record's codes as quantized data."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor

    block = uniform_quantize_tensor.extract_block_size_from_granularity(cfg.granularity)
    if cfg.num_bits != t.grid.bits or block != (t.grid.group_size or 0) or not cfg.symmetric:
        raise RuntimeError(f"{t.name}: the quantizer asks for {cfg.num_bits}-bit block {block}, the record holds {t.grid.describe()}")
    codes, scale = quantizer_params(t)
    n, k = codes.shape
    scale = scale.reshape(n, k // block if block else 1)
    return qtyping.UniformQuantParams(num_bits=t.grid.bits, quantized_dimension=1 if block else 0, scale=scale,
                                      zero_point=np.zeros(scale.shape, np.int32), symmetric=True, quantized_data=codes,
                                      block_size=block, signed=True)


@contextlib.contextmanager
def record_materializers(by_digest: dict[str, QuantizedTensor]):
    """ai-edge-quantizer's MIN_MAX_UNIFORM_QUANT materializers of FULLY_CONNECTED and EMBEDDING_LOOKUP, registered
    over so a weight's parameters are the record tensor whose dequantized weight it is (no min/max choice); keyed by
    content, as the quantizer renumbers buffers when it reads the model. A new algorithm name is refused by the
    quantizer's recipe, hence this. Yields {record tensor: the quantizer's buffers it went to}; the stock
    registration is restored on exit (the registry is process-global)."""
    from ai_edge_quantizer import algorithm_manager as am, qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import common_quantize
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    algorithm = am.AlgorithmName.MIN_MAX_UNIFORM_QUANT
    ops = {qtyping.TFLOperationName.FULLY_CONNECTED: common_quantize.materialize_fc_conv,
           qtyping.TFLOperationName.EMBEDDING_LOOKUP: common_quantize.materialize_embedding_lookup}
    stock = {op: (am.get_init_qsv_func(algorithm, op), am.get_quantization_func(algorithm, op, qtyping.QuantizeMode.CALIBRATE),
                  am.get_quantization_func(algorithm, op, qtyping.QuantizeMode.MATERIALIZE), am.get_update_qsv_func(algorithm, op))
             for op in ops}
    handed: dict[str, set[int]] = {}
    checked: dict[int, QuantizedTensor] = {}

    def wrap(base):
        def materialize(op_info, graph_info, tensor_name_to_qsv, tensor_quant_params_cache, **kw):
            # Checked here, not in `params`: the quantizer rewraps what that raises into a message of its own.
            weight = graph_info.subgraph_tensors[op_info.op.inputs[1]]
            t = checked.get(weight.buffer)
            if t is None:  # once per buffer: every signature's op reads the same one
                content = tfl_flatbuffer_utils.get_tensor_data(weight, graph_info.buffers)
                t = None if content is None else by_digest.get(_digest(content))
                if t is None:
                    raise RuntimeError(f"{op_info.op_name} {weight.name.decode()[-80:]!r}: min/max would choose its parameters; "
                                       "only record tensors are quantized here")
                if not np.array_equal(content, t.dequantize().numpy()):
                    raise RuntimeError(f"{t.name}: the weight in the float model is not the record's dequantized weight")
                checked[weight.buffer] = t
                handed.setdefault(t.name, set()).add(weight.buffer)

            def params(op_info, cfg, content, qsv):
                if content is None:
                    raise RuntimeError(f"{op_info.op_name}: asked to quantize an activation; LiteRT's recipes quantize weights only")
                return _uniform_params(t, cfg)

            return base(params, op_info, graph_info, tensor_name_to_qsv, tensor_quant_params_cache, **kw)
        return materialize

    try:
        for op, base in ops.items():
            init, calibrate, _, update = stock[op]
            am.register_quantized_op(algorithm, op, init, calibration_func=calibrate, materialize_func=wrap(base),
                                     update_qsv_func=update)
        yield handed
    finally:
        for op, (init, calibrate, materialize, update) in stock.items():
            am.register_quantized_op(algorithm, op, init, calibration_func=calibrate, materialize_func=materialize,
                                     update_qsv_func=update)


@contextlib.contextmanager
def compact_writer():
    """The quantizer's flatbuffer writer with every numeric vector written once: each signature's subgraph has a
    tensor table of its own, whose per-channel scales and zero points (12 bytes an output channel) would otherwise
    be stored again per signature, and every matrix of one width has the same all-zero zero points. A flatbuffer
    offset may be read from several tables; the runtime only reads them. A tensor that is not a subgraph's input or
    output is named `t<index>`: the runtime finds tensors by index, and signatures map their own names to them."""
    import flatbuffers
    from ai_edge_litert.tools import flatbuffer_utils

    class Builder(flatbuffers.Builder):
        def __init__(self, size: int):
            super().__init__(size)
            self.written: dict[tuple, int] = {}

        def CreateNumpyVector(self, x):  # keyed by a digest: the weight buffers pass through here too
            key = (x.dtype.str, x.size, hashlib.blake2b(np.ascontiguousarray(x)).digest())
            if key not in self.written:
                self.written[key] = super().CreateNumpyVector(x)
            return self.written[key]

    def pack(model_object, extra_buffer=b""):
        for graph in model_object.subgraphs:
            named = {int(i) for i in (*graph.inputs, *graph.outputs)}
            for i, tensor in enumerate(graph.tensors):
                if i not in named:
                    tensor.name = f"t{i}"
        builder = Builder(1024)
        builder.Finish(model_object.Pack(builder), file_identifier=b"TFL3")
        return builder.Output() + extra_buffer

    stock = flatbuffer_utils.convert_object_to_bytearray
    flatbuffer_utils.convert_object_to_bytearray = pack
    try:
        yield
    finally:
        flatbuffer_utils.convert_object_to_bytearray = stock


def quantize(content: bytes, decoder, spec, recipe, record: WeightRecord | None) -> bytes:
    """The float model quantized: record tensors exactly as the record holds them, fp16 matrices cast. Raises unless
    every record tensor is the parameters of exactly one buffer."""
    from ai_edge_quantizer import quantizer

    ops = weight_ops(content)
    tensors = record.tensors if record is not None else {}
    rules = module_rules(recipe, spec)
    modules = weight_modules(ops, decoder, spec, lambda names: not set(names) & set(tensors) and len({rules[n].weights for n in names}) == 1)
    if tensors:
        for op in ops:
            if op.digest not in modules:
                raise RuntimeError(f"a {op.op} weight of signature {op.subgraph} ({op.scope[-120:]}) is no matrix of the model")
    for name, t in tensors.items():
        _check_storable(t)
        buffers = {op.buffer for op in ops if modules.get(op.digest) == name}
        if len(buffers) != 1:
            raise RuntimeError(f"record tensor {name} is the weight of {len(buffers)} buffers of the float model, not one")
    by_digest = {d: tensors[m] for d, m in modules.items() if m in tensors}
    plan = quantization_recipe(ops, modules, rules, record, recipe)
    with record_materializers(by_digest) as handed, compact_writer():
        result = quantizer.Quantizer(bytes(content), plan).quantize(enable_progress_bar=False, enable_progress_report=False)
    wrong = sorted(f"{name} ({len(handed.get(name, ()))} buffers)" for name in tensors if len(handed.get(name, ())) != 1)
    if wrong:
        raise RuntimeError(f"record tensors not written exactly once by the quantizer: {', '.join(wrong)}")
    return bytes(result.quantized_model)
