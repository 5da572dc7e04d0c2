"""The `onnx` format: one decoder graph for ONNX Runtime, the KV cache as inputs and outputs (past -> present).

`model.onnx` serves prefill (T tokens) and decode (T = 1). Its I/O follows onnxruntime-genai's decoder
convention, so the artifact directory is also a genai model folder (genai_config.json, tokenizer files):

    inputs   input_ids [1, T] int64, position_ids [1, T] int64,
             past_key_values.{i}.key / .value [1, n_kv_heads, max_context, head_dim] float32
    outputs  logits [1, T, vocab] float32, present.{i}.key / .value (same shape as past)

position_ids[0, 0] is the canonical model's `input_pos` (the first cache row written); genai feeds
`total_length - T + arange(T)`, which is exactly that. The cache's sequence axis is static, which genai
detects and then runs in `past_present_share_buffer` mode: past and present are one buffer. The cache
write is a ScatterElements (not torch.onnx's Transpose-ScatterND-Transpose lowering of index_copy), which
ONNX Runtime runs in place when its output buffer is its input buffer, so a caller that binds present to
the past buffer (genai, OnnxRunner) moves T rows per step instead of copying the whole cache. At opset 23
attention is one Attention node per layer, fed the [1, n_kv_heads, C, head_dim] cache directly (it does
grouped-query attention itself), so the cache is not repeated per query head every step either.

Recipes, applied with onnxruntime.quantization on the FP32 graph (MatMul weights; activations int8 means
int8 compute inside the kernel, inputs quantized at run time):
  fp32                        as traced.
  int4  (group_size g=32)     MatMulNBits, 4-bit blocks of g along K, HQQ scales and float zero points;
                              activations int8 -> accuracy_level 4.
  int8  with group_size g     MatMulNBits, 8-bit blocks of g, round-to-nearest; activations int8 -> level 4.
  int8  without group_size    quantize_dynamic: int8 per output channel, activations int8 per tensor
                              (DynamicQuantizeLinear + MatMulInteger).
recipe.embedding sets the embedding's precision and a tied head's. A tied matrix is stored once, as the
head's weight, and the embedding reads it: columns of the fp32 / MatMulInteger weight, or rows of the
MatMulNBits blocks through GatherBlockQuantized. An untied embedding is quantized on its own (int8 per
row, int4 GatherBlockQuantized).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from llmship.errors import ConfigError
from llmship.exporters import ExportJob, ExportResult, tensor_spec

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 23
# Above this many bytes of weights the tensors go to model.onnx.data (the protobuf itself must stay under
# 2 GB); tensors of 1 MiB and more start on 64 KiB boundaries there, so a runtime can mmap them.
EXTERNAL_DATA_BYTES = 100_000_000
HEAD = "lm_head/MatMul"
EMBEDDING = "model.embed_tokens/Gather"
PAST = ("past_key_values.%d.key", "past_key_values.%d.value")
PRESENT = ("present.%d.key", "present.%d.value")
MATMUL_NBITS_BLOCKS = (16, 32, 64, 128, 256)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    pairs = range(num_layers)
    return (["input_ids", "position_ids", *[p % i for i in pairs for p in PAST]],
            ["logits", *[p % i for i in pairs for p in PRESENT]])


def _index_copy(self, dim: int, index, source):
    """aten.index_copy on the rank-4 cache as ScatterElements, which ORT may run in place."""
    from onnxscript import opset21 as op

    axes = [a for a in range(4) if a != dim]
    indices = op.Expand(op.Unsqueeze(index, op.Constant(value_ints=axes)), op.Shape(source))
    return op.ScatterElements(self, indices, source, axis=dim)


def trace(decoder):
    """torch.export + torch.onnx of the cache-I/O decoder under genai's names (input_ids, position_ids [1, T] whose
    first entry is the first cache row written, past/present); returns an onnx_ir Model."""
    from torch.export import Dim

    from llmship.models.decoder import CacheIODecoder

    spec, c = decoder.spec, decoder.max_context
    past = [torch.zeros(decoder.cache_shape) for _ in range(2 * spec.num_layers)]
    args = (torch.zeros((1, 2), dtype=torch.int64), torch.arange(2, dtype=torch.int64)[None], *past)
    seq = Dim("sequence_length", min=1, max=c)
    with torch.no_grad():
        program = torch.export.export(CacheIODecoder(decoder), args, strict=False,
                                      dynamic_shapes=({1: seq}, {1: seq}, tuple([None] * len(past))))
    inputs, outputs = io_names(spec.num_layers)
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=inputs, output_names=outputs, opset_version=OPSET,
                                     optimize=True, verbose=False,
                                     custom_translation_table={torch.ops.aten.index_copy.default: _index_copy})
    return onnx_program.model


# ---- graph tidying (onnx_ir) ----------------------------------------------------------------------------

def _module_path(node) -> str | None:
    """The torch module a node came from, e.g. 'model.layers.0.self_attn.q_proj' (torch.onnx records it)."""
    import ast

    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    names = [s for s in ast.literal_eval(scopes) if s.startswith("decoder.")] if scopes else []
    return names[-1].removeprefix("decoder.") if names else None


def name_weights(model) -> None:
    """Name each linear weight '<module>.MatMul.weight' (stored [in, out]) and its node '<module>/MatMul', the
    embedding Gather EMBEDDING, and drop torch.onnx's 'decoder.' prefix, so quantized tensors stay readable."""
    for node in model.graph:
        if node.op_type == "MatMul" and (path := _module_path(node)) and path.endswith(("_proj", "lm_head")):
            node.name = f"{path}/MatMul"
            if node.inputs[1].is_initializer():
                node.inputs[1].name = f"{path}.MatMul.weight"
        elif node.op_type == "Gather" and node.inputs[0].is_initializer() and node.inputs[0].name.startswith("decoder."):
            node.name = EMBEDDING
    for name, value in list(model.graph.initializers.items()):
        if name.startswith("decoder."):
            value.name = name.removeprefix("decoder.")


def attend_to_cache_directly(model) -> int:
    """Feed each Attention node the [1, n_kv_heads, C, head_dim] cache itself. The canonical model repeats
    K and V per query head before attention (Unsqueeze -> Expand -> Reshape), which ONNX Runtime would
    materialize every step: two extra copies of the whole cache per layer. Attention (opset 23) does
    grouped-query attention itself when K/V have fewer heads than Q. Returns the inputs rewired."""
    rewired = 0
    for node in model.graph:
        if node.op_type != "Attention":
            continue
        for index in (1, 2):
            value = node.inputs[index]
            for op in ("Reshape", "Expand", "Unsqueeze"):
                producer = value.producer()
                if producer is None or producer.op_type != op:
                    break
                value = producer.inputs[0]
            else:  # the whole repeat chain: attend to its source
                node.replace_input_with(index, value)
                rewired += 1
    return rewired


def _find(model, prefix: str):
    """The node named `prefix`, or what a quantizer made of it (MatMul -> MatMulInteger `<name>_quant`,
    MatMulNBits `<name>_Q4` / `_Q8`; Gather -> GatherBlockQuantized `<name>_Q4`)."""
    ops = ("MatMul", "MatMulInteger", "MatMulNBits", "Gather", "GatherBlockQuantized")
    names = (prefix, prefix + "_quant", prefix + "_Q4", prefix + "_Q8")
    return next((n for n in model.graph if n.op_type in ops and n.name in names), None)


def _adder(nodes: list, prefix: str):
    """A node factory that appends to `nodes` (named under `prefix`) and returns each node's output."""
    def add(op, inputs, domain="", **attrs):
        nodes.append(ir.node(op, inputs, attrs or None, domain=domain, name=f"{prefix}/{op}_{len(nodes)}"))
        return nodes[-1].outputs[0]
    return add


def _initializer(model, name: str, array: np.ndarray):
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    model.graph.register_initializer(value)
    return value


def untie_head(model) -> bool:
    """torch.onnx leaves a tied matrix W as Gather(W) + MatMul(x, Transpose(W)). Give the head its own
    constant W^T [hidden, vocab] so the quantizers see a MatMul with a constant weight (and ORT folds no
    Transpose into a second copy at load); `share_tied_embedding` later points the embedding at it."""
    head, embed = _find(model, HEAD), _find(model, EMBEDDING)
    if head is None or embed is None:
        raise RuntimeError("the traced graph has no recognisable lm_head MatMul / embedding Gather")
    transpose = head.inputs[1].producer()
    if transpose is None or transpose.op_type != "Transpose" or transpose.inputs[0] is not embed.inputs[0]:
        return False
    weight_t = np.ascontiguousarray(embed.inputs[0].const_value.numpy().T)
    head.replace_input_with(1, _initializer(model, "lm_head.MatMul.weight", weight_t))
    model.graph.remove(transpose, safe=True)
    return True


def share_tied_embedding(model) -> None:
    """Store a tied matrix once, in the head's form: the embedding reads the head's weight, fp32 or quantized.

    fp32 MatMul      W^T [hidden, vocab]: gather columns (axis 1).
    MatMulInteger    int8 W^T per output column: gather columns, then (q - zero_point[id]) * scale[id].
    MatMulNBits      4/8-bit [vocab, blocks, bytes] = embedding rows quantized along hidden: GatherBlockQuantized
                     (integer zero points only, hence round-to-nearest for a tied head).
    """
    head, embed = _find(model, HEAD), _find(model, EMBEDDING)
    ids, nodes = embed.inputs[1], []
    add = _adder(nodes, EMBEDDING)

    def const(values):
        return add("Constant", [], value_ints=list(values))

    if head.op_type == "MatMulNBits":
        packed, rest = head.inputs[1], list(head.inputs[2:4])  # scales [, zero points]: same layout for both ops
        vocab, blocks, nbytes = packed.shape
        bits, block, hidden = (head.attributes[a].as_int() for a in ("bits", "block_size", "K"))
        out = add("GatherBlockQuantized", [add("Reshape", [packed, const([vocab, blocks * nbytes])]), ids, *rest],
                  domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
        if hidden != blocks * block:  # MatMulNBits pads hidden to whole blocks
            out = add("Slice", [out, const([0]), const([hidden]), const([-1])])
    else:
        table = head.inputs[1]
        out = add("Transpose", [add("Gather", [table, ids], axis=1)], perm=[1, 2, 0])  # [H, 1, T] -> [1, T, H]
        if head.op_type == "MatMulInteger":
            scale = model.graph.initializers[table.name.replace("_quantized", "_scale")]
            out = _dequantize_rows(add, const, out, ids, scale, head.inputs[3])
    model.graph.insert_before(embed, nodes)
    embed.outputs[0].replace_all_uses_with(out)
    model.graph.remove(embed, safe=True)


def _dequantize_rows(add, const, q, ids, scale, zero_point=None):
    """(q - zero_point[id]) * scale[id] for gathered int8 rows [1, T, H]."""
    x = add("Cast", [q], to=ir.DataType.FLOAT)
    if zero_point is not None and np.any(zero_point.const_value.numpy()):
        x = add("Sub", [x, add("Unsqueeze", [add("Cast", [add("Gather", [zero_point, ids])], to=ir.DataType.FLOAT), const([-1])])])
    return add("Mul", [x, add("Unsqueeze", [add("Gather", [scale, ids]), const([-1])])])


def int8_embedding_rows(model) -> None:
    """An untied embedding in int8: symmetric per-row scales (quantize_dynamic would use one scale for all)."""
    embed = _find(model, EMBEDDING)
    table, ids, nodes = embed.inputs[0], embed.inputs[1], []
    add = _adder(nodes, EMBEDDING)

    w = table.const_value.numpy()
    scale = (np.maximum(np.abs(w).max(axis=1), 1e-30) / 127.0).astype(np.float32)
    q = _initializer(model, f"{table.name}_quantized", np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8))
    out = _dequantize_rows(add, lambda v: add("Constant", [], value_ints=list(v)), add("Gather", [q, ids]), ids,
                           _initializer(model, f"{table.name}_scale", scale))
    model.graph.insert_before(embed, nodes)
    embed.outputs[0].replace_all_uses_with(out)
    model.graph.remove(embed, safe=True)


# ---- quantization (onnxruntime.quantization) --------------------------------------------------------------

def check(target, spec=None) -> None:
    """What ONNX Runtime's CPU provider holds here: fp32; MatMulNBits 4/8-bit blocks of 16..256 (power of two),
    symmetric or asymmetric; per-channel int8 with dynamic int8 activations (MatMulInteger, symmetric);
    fp32 compute and cache."""
    r, name = target.recipe, target.name
    if r.weights not in ("fp32", "int8", "int4"):
        raise ConfigError(f"{name}: recipe.weights {r.weights} is not available for onnx (fp32, int8, int4)")
    if r.compute != "fp32":
        raise ConfigError(f"{name}: recipe.compute must be fp32: onnx targets ONNX Runtime's CPU provider in fp32")
    if target.kv_cache_dtype != "fp32":
        raise ConfigError(f"{name}: kv_cache_dtype must be fp32 on onnx (the graph's past/present are fp32)")
    if r.activations not in ("fp32", "int8") or (r.weights == "fp32" and r.activations != "fp32"):
        raise ConfigError(f"{name}: recipe.activations {r.activations} is not available with {r.weights} weights on onnx")
    if r.weights == "int8" and r.group_size is None:
        if r.activations != "int8":
            raise ConfigError(f"{name}: recipe.activations: onnx per-channel int8 is dynamic quantization (MatMulInteger): set "
                              "recipe.activations: int8, or recipe.group_size for block-wise int8 weights (MatMulNBits)")
        if r.symmetric is False:
            raise ConfigError(f"{name}: recipe.symmetric false: per-channel int8 weights (MatMulInteger) are symmetric here; "
                              "set recipe.group_size for asymmetric block-wise int8 (MatMulNBits)")
    if r.group_size is not None and r.group_size not in MATMUL_NBITS_BLOCKS:
        raise ConfigError(f"{name}: recipe.group_size {r.group_size} must be one of {', '.join(map(str, MATMUL_NBITS_BLOCKS))} "
                          "for MatMulNBits")
    allowed = {"fp32": ("fp32",), "int8": ("fp32", "int8"), "int4": ("fp32", "int8", "int4")}[r.weights]
    if embedding_precision(r) not in allowed:
        raise ConfigError(f"{name}: recipe.embedding {r.embedding} is not available with {r.weights} weights on onnx "
                          f"({', '.join(('same',) + allowed)})")


def embedding_precision(recipe) -> str:
    return recipe.weights if recipe.embedding == "same" else recipe.embedding


def _nbits(proto, include: set[str], bits: int, block: int, hqq: bool = False):
    """MatMulNBitsQuantizer on exactly the named MatMul / Gather nodes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    others = [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gather") and n.name not in include]
    quantizer = MatMulNBitsQuantizer(
        proto, bits=bits, block_size=block, is_symmetric=False, nodes_to_exclude=others,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
        algo_config=HQQWeightOnlyQuantConfig(block_size=block, bits=bits) if hqq else None)
    quantizer.process()
    return quantizer.model.model


def quantize(model, job: ExportJob, embedding: str, tied: bool, workdir: Path):
    """Apply the recipe with onnxruntime.quantization; returns the quantized onnx_ir Model.

    Block-wise linears use HQQ (scales and float zero points fitted without calibration data): on SmolLM2,
    whose weights lie on a Q4_1 grid, it represents them exactly where round-to-nearest with integer zero
    points does not (4-bit KL 0.0002 vs 0.5 on the same text, fp32 activations). A tied head keeps the
    embedding's precision and uses round-to-nearest with integer zero points, the form GatherBlockQuantized
    can share with the embedding.
    """
    r = job.target.recipe
    block = r.group_size or 32
    linears = {n.name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer() and not (tied and n.name == HEAD)}
    head = {HEAD} if tied and embedding != "fp32" else set()
    proto = ir.to_proto(model)
    if r.weights == "int8" and r.group_size is None:  # per output channel, activations per tensor at run time
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = workdir / "int8.onnx"
        quantize_dynamic(proto, out, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=sorted(linears | head), use_external_data_format=True)
        model = ir.external_data.load_to_model(ir.load(out))  # into memory: `out` is temporary
    else:
        proto = _nbits(proto, linears, 4 if r.weights == "int4" else 8, block, hqq=True)
        if head:
            proto = _nbits(proto, head, 4 if embedding == "int4" else 8, block)
        model = ir.from_proto(proto)
        integer_zero_points(model)
        for node in model.graph:
            if node.op_type == "MatMulNBits" and r.activations == "int8":
                node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 4)  # int8 compute on CPU
    if not tied and embedding == "int8":
        int8_embedding_rows(model)
    elif not tied and embedding == "int4":
        model = ir.from_proto(_nbits(ir.to_proto(model), {EMBEDDING}, 4, block))
    return model


def integer_zero_points(model) -> int:
    """Split HQQ's float zero points into the integer part MatMulNBits' fast CPU kernels take and a
    per-block fp32 remainder applied as a correction: with z = zi + zr,

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
        node.replace_input_with(3, _initializer(model, name, stored))
        remainder = _initializer(model, f"{name}_remainder", np.ascontiguousarray(((zero - whole) * scale).T.astype(np.float32)))
        x, nodes = node.inputs[0], []
        add = _adder(nodes, node.name)

        if x not in sums:  # q/k/v and gate/up share their input: one block sum each
            padded = add("Pad", [x, add("Constant", [], value_ints=[0, 0, 0, 0, 0, blocks * block - k])]) if k % block else x
            reshaped = add("Reshape", [padded, add("Constant", [], value_ints=[0, 0, blocks, block])])
            sums[x] = add("ReduceSum", [reshaped, add("Constant", [], value_ints=[-1])], keepdims=0)
        correction = add("MatMul", [sums[x], remainder])
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


# ---- emit ---------------------------------------------------------------------------------------------------

def save(model, out_dir: Path) -> str | None:
    """Write model.onnx (+ model.onnx.data when the weights are large); returns the data file's name or None."""
    from onnx_ir.passes.common import ClearMetadataAndDocStringPass, RemoveUnusedNodesPass, TopologicalSortPass

    ClearMetadataAndDocStringPass()(model)  # torch.onnx's per-node stack traces: a third of a small model's bytes
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes <= EXTERNAL_DATA_BYTES:
        ir.save(model, out_dir / MODEL_FILE)
        return None
    ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE, size_threshold_bytes=1024, alignment=65536,
            align_threshold=1 << 20)
    return DATA_FILE


def genai_config(job: ExportJob) -> dict:
    """onnxruntime-genai's decoder description (the schema its model builder writes)."""
    spec, c = job.loaded.spec, job.target.max_context
    eos = list(spec.eos_token_ids)
    return {
        "model": {
            "bos_token_id": spec.bos_token_id,
            "context_length": c,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "intra_op_num_threads": job.target.threads,
                                    "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {"input_ids": "input_ids", "position_ids": "position_ids",
                           "past_key_names": PAST[0], "past_value_names": PAST[1]},
                "outputs": {"logits": "logits", "present_key_names": PRESENT[0], "present_value_names": PRESENT[1]},
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": eos[0] if eos else 0,
            # genai picks its runtime model class by type; every decoder-only type drives this graph the same way
            "type": "llama",
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "do_sample": False, "early_stopping": True, "length_penalty": 1.0, "max_length": c, "min_length": 0,
            "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": True,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def tokenizer_config(job: ExportJob) -> dict:
    """tokenizer_config.json for genai's tokenizer (onnxruntime-extensions reads it beside tokenizer.json):
    the source's own when it has one, else the class and special tokens the tokenizer implies."""
    source = Path(job.loaded.source)
    if (source / "tokenizer_config.json").is_file():
        return json.loads((source / "tokenizer_config.json").read_text())
    spec, tok = job.loaded.spec, job.loaded.tokenizer
    model_type = json.loads(tok.to_str())["model"]["type"]
    config = {"tokenizer_class": "LlamaTokenizer" if model_type == "BPE" and _sentencepiece_style(tok) else "GPT2Tokenizer",
              "model_max_length": job.target.max_context, "clean_up_tokenization_spaces": False}
    for key, tid in (("bos_token", spec.bos_token_id), ("eos_token", (spec.eos_token_ids or [None])[0])):
        if tid is not None and tok.id_to_token(tid) is not None:
            config[key] = tok.id_to_token(tid)
    config["add_bos_token"] = False  # llmship's prompts carry BOS explicitly
    return config


def _sentencepiece_style(tok) -> bool:
    return "▁" in "".join(tok.id_to_token(i) or "" for i in range(min(tok.get_vocab_size(), 512)))


def export(job: ExportJob) -> ExportResult:
    embedding = embedding_precision(job.target.recipe)
    spec, c, recipe = job.loaded.spec, job.target.max_context, job.target.recipe
    model = trace(job.decoder)
    attend_to_cache_directly(model)
    name_weights(model)
    tied = untie_head(model)
    with tempfile.TemporaryDirectory(dir=job.out_dir.parent) as tmp:  # quantize_dynamic works through files
        if recipe.weights != "fp32":
            model = quantize(model, job, embedding, tied, Path(tmp))
        if tied:
            share_tied_embedding(model)
        model.graph.name = "llmship_decoder"
        data_file = save(model, job.out_dir)
    (job.out_dir / "genai_config.json").write_text(json.dumps(genai_config(job), indent=2) + "\n")
    (job.out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(job), indent=2) + "\n")

    cache = [spec.num_kv_heads, c, spec.head_dim]
    past = [tensor_spec(p % i, "float32", [1, *cache], "cache") for i in range(spec.num_layers) for p in PAST]
    present = [tensor_spec(p % i, "float32", [1, *cache], "cache") for i in range(spec.num_layers) for p in PRESENT]

    def entry(t):
        return {"file": MODEL_FILE, "method": "InferenceSession.run",
                "inputs": [tensor_spec("input_ids", "int64", [1, t], "tokens"), tensor_spec("position_ids", "int64", [1, t], "positions"),
                           *past],
                "outputs": [tensor_spec("logits", "float32", [1, t, spec.vocab_size], "logits"), *present]}

    ops = sorted({n.op_type for n in model.graph if n.domain == "com.microsoft" or n.op_type in ("MatMulInteger", "DynamicQuantizeLinear")})
    return ExportResult(
        entry_points={"prefill": entry("T"), "decode": entry(1)},
        kv_cache={"held_as": "inputs", "dtype": "float32", "inputs": list(PAST), "outputs": list(PRESENT),
                  "share_buffer": "present.%d.* may be bound to the same buffer as past_key_values.%d.* (written in place)"},
        extra={"onnx": {
            "opset": OPSET,
            "external_data": data_file,
            "position_ids": "input_pos + arange(T): position_ids[0, 0] is the first cache row written; T <= max_context",
            "tied_embedding": "stored once as the lm_head weight; the embedding gathers from it" if tied else None,
            "quantized_ops": ops,
            "execution_provider": "CPUExecutionProvider",
            "genai_config": "genai_config.json",
        }},
    )
