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

Separate LoRA adapters (`adapters: {mode: separate}`) ship as ONNX Runtime adapter files beside one base graph
(onnx_adapters).

Weights come from the compression stage's record (llmship/compress/), written into the traced FP32 graph as
ONNX Runtime's own quantized ops by `onnx_weights` (which also says which grids ONNX Runtime holds):
  int4 / int8 with group_size g   MatMulNBits, blocks of g along K; activations int8 -> accuracy_level 4.
  int8 without group_size         DynamicQuantizeLinear + MatMulInteger (int8 per output channel).
recipe.embedding sets the embedding's precision and a tied head's. A tied matrix is stored once, as the
head's weight, and the embedding reads it: columns of the fp32 / MatMulInteger weight, or rows of the
MatMulNBits blocks through GatherBlockQuantized. An untied embedding is quantized on its own (int8 rows,
int4 GatherBlockQuantized).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from llmship.adapters.branch import storage_dtype
from llmship.compress.plan import EMBEDDING as EMBEDDING_MODULE
from llmship.errors import ConfigError
from llmship.exporters import ExportJob, ExportResult, tensor_spec
from llmship.exporters import onnx_adapters as oa
from llmship.exporters import onnx_weights as ow
from llmship.exporters.onnx_weights import weight_plan  # noqa: F401  (the registry's entry point)

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

    spec = decoder.spec
    past = [torch.zeros(shape) for shape in decoder.cache_shapes for _ in ("k", "v")]
    args = (torch.zeros((1, 2), dtype=torch.int64), torch.arange(2, dtype=torch.int64)[None], *past)
    seq = Dim("sequence_length", min=1, max=decoder.max_chunk)
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


# ---- quantization (onnxruntime.quantization) --------------------------------------------------------------

def check(target, spec=None) -> None:
    """What ONNX Runtime's CPU provider holds here: fp32; MatMulNBits 4/8-bit blocks of 16..256 (power of two),
    symmetric or asymmetric; per-channel int8 with dynamic int8 activations (MatMulInteger, symmetric);
    fp32 compute and cache. Every per-module rule is held to the same."""
    from llmship.compress.plan import module_rules, rule_variants

    r, name = target.recipe, target.name
    if r.compute != "fp32":
        raise ConfigError(f"{name}: recipe.compute must be fp32: onnx targets ONNX Runtime's CPU provider in fp32")
    if target.kv_cache_dtype != "fp32":
        raise ConfigError(f"{name}: kv_cache_dtype must be fp32 on onnx (the graph's past/present are fp32)")
    if r.activations not in ("fp32", "int8") or (r.weights == "fp32" and r.activations != "fp32"):
        raise ConfigError(f"{name}: recipe.activations {r.activations} is not available with {r.weights} weights on onnx")
    for role, rule, where in rule_variants(r):
        if rule.weights not in ("fp32", "int8", "int4"):
            raise ConfigError(f"{name}: {where}.weights {rule.weights} is not available for onnx (fp32, int8, int4)")
        if rule.weights == "int8" and rule.group_size is None and role == "linear":
            if r.activations != "int8":
                raise ConfigError(f"{name}: recipe.activations: onnx per-channel int8 is dynamic quantization (MatMulInteger): set "
                                  "recipe.activations: int8, or recipe.group_size for block-wise int8 weights (MatMulNBits)")
            if rule.symmetric is False:
                raise ConfigError(f"{name}: {where}.symmetric false: per-channel int8 weights (MatMulInteger) are symmetric "
                                  "here; set a group_size for asymmetric block-wise int8 (MatMulNBits)")
        if rule.group_size is not None and rule.group_size not in MATMUL_NBITS_BLOCKS:
            raise ConfigError(f"{name}: {where}.group_size {rule.group_size} must be one of "
                              f"{', '.join(map(str, MATMUL_NBITS_BLOCKS))} for MatMulNBits")
    if spec is not None:
        module_rules(r, spec)  # every rule must match a module of this model


def apply_record(model, record, target, spec, tied: bool) -> None:
    """The record's weights into the graph, as MatMulNBits / MatMulInteger / GatherBlockQuantized (onnx_weights);
    a shared block's matrices at every depth that runs them (`share_identical_initializers` then stores them once)."""
    from llmship.compress.plan import module_uses

    level = 4 if target.recipe.activations == "int8" else 0  # 4: int8 compute on CPU, inputs quantized per block
    for name, t in record.tensors.items():
        if name == EMBEDDING_MODULE:
            continue
        for path in module_uses(spec, name):
            node = _find(model, f"{path}/MatMul")
            if node is None:
                raise RuntimeError(f"the traced graph has no MatMul for {path}")
            (ow.matmul_integer(model, node, t) if t.grid.group_size is None else ow.matmul_nbits(model, node, t, level))
    embedding = record.tensors.get(EMBEDDING_MODULE)
    if embedding is not None and tied:
        head = _find(model, HEAD)
        (ow.matmul_integer(model, head, embedding) if embedding.grid.group_size is None else ow.matmul_nbits(model, head, embedding, level))
    elif embedding is not None:
        embed = _find(model, EMBEDDING)
        if embedding.grid.group_size is None:
            ow.embedding_rows(model, embed, embedding, _adder, _dequantize_rows)
        else:
            ow.embedding_blocks(model, embed, embedding, _adder)
    ow.integer_zero_points(model, _adder)


def share_identical_initializers(model) -> int:
    """Store each constant tensor once: torch.onnx folds a transposed copy of a weight for every MatMul that reads
    it, and the record is applied at every depth, so a block that runs at two depths (layer sharing) would be stored
    twice. Initializers that are graph inputs (a separate adapter's tensors, bound by name) and small ones are left
    alone. Returns the copies removed."""
    import hashlib

    inputs = {v.name for v in model.graph.inputs}
    first: dict[tuple, ir.Value] = {}
    removed = 0
    for node in model.graph:
        for value in node.inputs:
            if value is None or not value.is_initializer() or value.name in inputs or value.const_value is None:
                continue
            array = value.const_value.numpy()
            if array.nbytes < 1024:
                continue
            key = (str(array.dtype), array.shape, hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest())
            kept = first.setdefault(key, value)
            if kept is not value:
                value.replace_all_uses_with(kept)
                model.graph.initializers.pop(value.name)
                removed += 1
    return removed


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
    # genai requires a number for bos_token_id (a prompt's ids come from the caller, so it only labels the
    # vocabulary). Configs without one (Qwen2/Qwen3) use their end-of-text token for both roles; with no EOS
    # either, 0. An empty eos list is valid: generation then runs to max_length.
    bos = spec.bos_token_id if spec.bos_token_id is not None else (eos[0] if eos else 0)
    return {
        "model": {
            "bos_token_id": bos,
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
    spec, c = job.loaded.spec, job.target.max_context
    model = trace(job.decoder)
    attend_to_cache_directly(model)
    name_weights(model)
    tied = untie_head(model)
    lora_dtype = storage_dtype(job.loaded.adapters["dtype"], job.target) if job.loaded.lora else None
    if job.loaded.lora:
        oa.add_branches(model, job.loaded.lora, _find, lora_dtype)
    if job.record is not None:
        apply_record(model, job.record, job.target, spec, tied)
    if tied:
        share_tied_embedding(model)
    if spec.shared_layers is not None:  # a block run at two depths: its (folded, quantized) constants once
        share_identical_initializers(model)
    model.graph.name = "llmship_decoder"
    data_file = save(model, job.out_dir)
    # onnxruntime-genai gives every layer's cache the same length (its max_length): a model with ring-buffer layers
    # runs on onnxruntime (the manifest's I/O) but is no genai folder
    genai = all(n == c for n in job.decoder.cache_lengths)
    if genai:
        (job.out_dir / "genai_config.json").write_text(json.dumps(genai_config(job), indent=2) + "\n")
        (job.out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(job), indent=2) + "\n")
    adapters = {"files": oa.write_adapters(job.out_dir, job.loaded.lora, lora_dtype), "select": oa.SELECT,
                "dtype": lora_dtype} if job.loaded.lora else {}

    shapes = [list(shape) for shape in job.decoder.cache_shapes]  # a sliding-window layer's ring buffer: fewer rows
    past = [tensor_spec(p % i, "float32", shapes[i], "cache") for i in range(spec.num_layers) for p in PAST]
    present = [tensor_spec(p % i, "float32", shapes[i], "cache") for i in range(spec.num_layers) for p in PRESENT]

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
            "position_ids": "input_pos + arange(T): position_ids[0, 0] is the first position written; T <= kv_cache.max_tokens_per_call",
            "tied_embedding": "stored once as the lm_head weight; the embedding gathers from it" if tied else None,
            "quantized_ops": ops,
            "execution_provider": "CPUExecutionProvider",
            "genai_config": "genai_config.json" if genai else None,
            **({} if genai else {"genai": "not a genai model folder: onnxruntime-genai gives every layer's cache one length, "
                                          "and this model's sliding-window layers hold ring buffers (kv_cache.length_per_layer)"}),
        }},
        adapters=adapters,
    )
