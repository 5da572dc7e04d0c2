"""The `coreml` format: a stateful ML program `model.mlpackage` for Core ML (minimum deployment iOS 18).

How it is built:
1. The canonical model with an fp16 KV cache (Core ML states must be fp16) is torch.export'ed
   (llmship.models.export.export_stateful); coremltools 9 converts an ExportedProgram whose mutated
   buffers become Core ML states (`read_state` at entry, `coreml_update_state` after each write).
   The canonical cache write, `index_copy_`, has no coremltools translation; this module registers one
   that lowers it to MIL `scatter` along the position axis: exactly index_copy's meaning, so the canonical
   model stays untouched (no data-dependent slicing, any positions).
2. Each entry point is converted separately and its weights compressed: int8 per channel and 4-bit
   palettization per channel group with coremltools.optimize.coreml; int4 per block by a graph pass of
   this module run inside the conversion (see `int4_block_minmax` for why). The two functions are then
   merged with `save_multifunction`, which stores every weight once.

Why two functions of one multifunction model rather than one flexible-length function: `decode`, the
hot path an app calls once per token, gets fully static shapes ([1, 1] tokens), which Core ML can plan
once and place on the GPU/Neural Engine; `prefill` keeps a flexible length (RangeDim 1..max prefill
length), so an app passes any prompt chunk without padding and no padded positions ever reach the
cache. Both read and write the same states, so one `model.makeState()` serves both functions (Core ML
shares a state between functions whose state descriptions match). The cost is converting twice; weight
storage is shared, so the file is no larger than one function.

Separate LoRA adapters (`adapters: {mode: separate}`) use the same multifunction mechanism: two more functions,
`prefill_lora` and `decode_lora`, are the decoder with a branch beside every linear some adapter touches, whose
A^T and (s B)^T are inputs (adapters/inputs.py), converted with the same record pass. Their base weights are the
same consts as the bare functions', which save_multifunction stores once; each adapter ships as its own small file
that an app passes to them, so an adapter costs its file, however many there are.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from llmship.adapters import inputs as lora_inputs
from llmship.adapters.branch import storage_dtype
from llmship.errors import ConfigError
from llmship.exporters import ExportJob, ExportResult, tensor_spec
from llmship.exporters import coreml_weights as cw
from llmship.exporters.coreml_weights import weight_plan  # noqa: F401  (the registry's entry point)
from llmship.models.export import export_stateful

PACKAGE = "model.mlpackage"
FUNCTIONS = ("prefill", "decode")
SELECT = ("Core ML multifunction: MLModelConfiguration.functionName = \"prefill_lora\" / \"decode_lora\" "
          "(adapters.list[].functions) with the adapter's file as more inputs (adapters.inputs.slots: each tensor padded "
          "with zeros to the slot's shape, zeros for a module the file lacks); \"prefill\" / \"decode\": the bare base. "
          "The base weights are stored once for every function; one makeState() serves every function.")


def check(target, spec=None) -> None:
    """What an iOS 18 ML program holds here: fp16/fp32 weights in the compute precision, int8 symmetric per channel
    or per block, uint4 blocks with fp16 scale and offset (asymmetric), 4-bit palettization; fp16 states."""
    recipe, name = target.recipe, target.name
    if target.kv_cache_dtype != "fp16":
        raise ConfigError(f"{name}: kv_cache_dtype must be fp16 on coreml (Core ML states are fp16), got {target.kv_cache_dtype}")
    if recipe.activations == "int8":
        raise ConfigError(f"{name}: recipe.activations int8 needs calibration data, which this exporter does not take; "
                          "use activations fp16 (or fp32 with compute fp32)")
    if recipe.activations != recipe.compute:
        raise ConfigError(f"{name}: recipe.activations ({recipe.activations}) must equal recipe.compute ({recipe.compute}); "
                          "an ML program computes and stores activations in one precision")
    if recipe.weights in ("fp32", "fp16") and recipe.weights != recipe.compute:
        raise ConfigError(f"{name}: recipe.weights {recipe.weights} needs recipe.compute {recipe.weights} "
                          "(uncompressed weights are stored in the compute precision)")
    if recipe.embedding not in ("same", recipe.weights, "fp16"):
        raise ConfigError(f"{name}: recipe.embedding {recipe.embedding} is not supported on coreml; use 'same' or 'fp16'")
    if recipe.embedding == "fp16" and recipe.compute != "fp16":
        raise ConfigError(f"{name}: recipe.embedding fp16 needs recipe.compute fp16")
    if recipe.weights == "int8" and recipe.symmetric is False:
        raise ConfigError(f"{name}: recipe.symmetric false: coreml int8 here is symmetric (coremltools linear_symmetric)")
    if recipe.weights == "int4" and recipe.symmetric is True:
        raise ConfigError(f"{name}: recipe.symmetric true: coreml int4 here is asymmetric (fp16 scale and offset per block)")
    if recipe.weights in ("pal4", "fp16", "fp32") and recipe.symmetric is not None:
        raise ConfigError(f"{name}: recipe.symmetric has no meaning for {recipe.weights} weights")


def palettize(mlmodel, record, spec, tied: bool):
    """The record's palettes through coremltools' palettizer, with tables it only reads back (coreml_weights.table_lut);
    every other const is left as it is."""
    import coremltools.optimize.coreml as cto

    palettes = cw.record_consts(record, spec, palette=True)
    if not palettes:
        return mlmodel
    func = mlmodel._mil_program.functions["main"]
    configs = {}
    for op in func.find_ops(op_type="const"):
        t = palettes.get(cw.const_module(op.name, tied))
        if t is not None:
            configs[op.name] = cto.OpPalettizerConfig(mode="custom", lut_function=cw.table_lut, granularity="per_grouped_channel",
                                                      group_size=t.grid.group_size)
    found = {cw.const_module(n, tied) for n in configs}
    missing = sorted({t.name for t in palettes.values()} - {palettes[n].name for n in found})
    if missing:
        raise RuntimeError(f"the converted program has no weight const for {missing[:3]}")
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=None, op_name_configs=configs))


def covered(mlmodel, record, spec, tied: bool) -> None:
    """Every affine record tensor became a constexpr_blockwise_shift_scale: none was left in float by mistake."""
    consts = cw.record_consts(record, spec)
    if not consts:
        return
    func = mlmodel._mil_program.functions["main"]
    done = {cw.const_module(op.name.rsplit("_q", 1)[0], tied) for op in func.find_ops(op_type="constexpr_blockwise_shift_scale")}
    missing = sorted({t.name for t in consts.values()} - {consts[n].name for n in done if n in consts})
    if missing:
        raise RuntimeError(f"record tensors not written into the program: {missing[:3]}")


def fp16_consts(mlmodel, recipe, spec) -> tuple[str, ...]:
    """Const ops the recipe leaves uncompressed (coremltools.optimize compresses every float const above
    2048 elements unless told otherwise)."""
    func = mlmodel._mil_program.functions["main"]
    keep = compressible_consts(func, spec, recipe.embedding == "fp16")
    return tuple(op.name for op in func.find_ops(op_type="const") if op.name not in keep)


def compressible_consts(func, spec, embedding_fp16: bool) -> set[str]:
    """Names of the const ops a recipe compresses: the linear weights and the embedding table.

    Everything else stays fp16: the rope cos/sin tables (SmolLM2: [max_context, 64]; quantizing them
    rotates every query and key wrongly), norms and masks. With recipe.embedding fp16 the embedding
    table, and a head tied to it, stay fp16 too.
    """
    def const_input(op, name):
        var = op.inputs.get(name)
        return var.op.name if var is not None and var.op is not None and var.op.op_type == "const" else None

    weights = {const_input(op, "weight") for op in func.find_ops(op_type="linear")}
    embedding = {const_input(op, "x") for op in func.find_ops(op_type="gather")
                 if tuple(op.inputs["x"].shape) == (spec.vocab_size, spec.hidden_size)}
    return (weights | embedding) - (embedding if embedding_fp16 else set()) - {None}


def register_index_copy() -> None:
    """Teach coremltools' torch frontend `aten.index_copy` as MIL `scatter` (mode update) along `dim`."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op
    from coremltools.converters.mil.mil.types.type_mapping import builtin_to_string

    if _TORCH_OPS_REGISTRY.get_func("index_copy") is not None:
        return  # coremltools has its own (a newer release): use it

    def index_copy(context, node):
        x, dim, index, source = _get_inputs(context, node, expected=4)
        if source.dtype != x.dtype:  # the state was read as fp16 and cast; the update follows the cache's dtype
            source = mb.cast(x=source, dtype=builtin_to_string(x.dtype))
        context.add(mb.scatter(data=x, indices=index, updates=source, axis=dim.val, mode="update", name=node.name))

    register_torch_op(index_copy)


def runs_in_fp16(op) -> bool:
    """The fp16 program's op selector: everything fp16 except the RMSNorm statistic (x^2, its mean, + eps,
    rsqrt, and x * rsqrt), kept fp32. Llama-family residual streams carry massive activations (SmolLM2-135M:
    |x| up to 2.2e4, mean(x^2) up to 8e5), beyond fp16's 65504: an fp16 statistic overflows to inf and
    the layer outputs zeros."""
    if op.op_type in ("pow", "reduce_mean", "rsqrt"):
        return False
    producers = {v.op.op_type for v in op.inputs.values() if hasattr(v, "op") and v.op is not None}
    return not (op.op_type in ("add", "mul") and producers & {"reduce_mean", "rsqrt"})


def convert_function(program, length, max_prefill: int, recipe, record=None, spec=None, tied: bool = False, lora=()):
    """One entry point as a single-function ML program: tokens [1, length], input_pos [1] (and `lora`'s slots'
    tensors, in the compute precision) -> logits."""
    import coremltools as ct
    import numpy as np

    precision = recipe.compute
    tokens_shape = (1, ct.RangeDim(1, max_prefill, default=1, symbol="T")) if length is None else (1, length)
    pipeline = ct.PassPipeline.DEFAULT
    consts = cw.record_consts(record, spec)
    if consts:
        name = cw.register_record_pass()  # last in the pipeline: after fp16 casting and const folding
        pipeline.append_pass(name)
        pipeline.set_options(name, {"consts": consts, "tied": tied})
    return ct.convert(
        program.run_decompositions({}),
        inputs=[ct.TensorType(name="tokens", shape=tokens_shape, dtype=np.int32),
                ct.TensorType(name="input_pos", shape=(1,), dtype=np.int32),
                *(ct.TensorType(name=name, shape=shape, dtype=np.float16 if precision == "fp16" else np.float32)
                  for s in lora for name, shape in zip(s.inputs, s.shapes))],
        outputs=[ct.TensorType(name="logits", dtype=np.float16 if precision == "fp16" else np.float32)],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.transform.FP16ComputePrecision(op_selector=runs_in_fp16) if precision == "fp16" else ct.precision.FLOAT32,
        pass_pipeline=pipeline,
        skip_model_load=True,  # no Core ML runtime on Linux; macOS compiles it when it is opened
    )


def export(job: ExportJob) -> ExportResult:
    import coremltools as ct

    target, recipe, spec = job.target, job.target.recipe, job.loaded.spec
    register_index_copy()
    max_prefill = max(target.prefill_lengths)
    slots = lora_inputs.slots(job.decoder, job.loaded.lora) if job.loaded.lora else []
    variants = [(lambda name: name, job.decoder, ())]
    if slots:
        branched, fed = lora_inputs.with_inputs(job.decoder, slots)
        variants.append((lora_inputs.entry, lora_inputs.taking_inputs(branched, fed, slots), tuple(lora_inputs.sample(slots).values())))
    with tempfile.TemporaryDirectory(dir=job.out_dir) as tmp:
        descriptor, tied = ct.utils.MultiFunctionDescriptor(), spec.tie_word_embeddings
        for rename, decoder, more in variants:
            programs = export_stateful(decoder, max_prefill, more=more)
            programs.setdefault("prefill", programs["decode"])  # max_prefill == 1: both functions take one token
            for entry in FUNCTIONS:
                length = None if entry == "prefill" and max_prefill > 1 else 1
                mlmodel = convert_function(programs[entry], length, max_prefill, recipe, job.record, spec, tied, slots if more else ())
                covered(mlmodel, job.record, spec, tied)
                mlmodel = palettize(mlmodel, job.record, spec, tied)
                path = Path(tmp) / f"{rename(entry)}.mlpackage"
                mlmodel.save(str(path))
                descriptor.add_function(str(path), src_function_name="main", target_function_name=rename(entry))
        descriptor.default_function_name = "decode"
        ct.utils.save_multifunction(descriptor, str(job.out_dir / PACKAGE))  # identical weights are stored once
    make_reproducible(job.out_dir / PACKAGE)
    adapters = {}
    if slots:
        dtype = storage_dtype(job.loaded.adapters["dtype"], target)
        adapters = {"files": lora_inputs.write_files(job.out_dir, job.loaded.lora, dtype), "dtype": dtype, "select": SELECT,
                    "inputs": {"rank": slots[0].rank, "slots": [s.manifest() for s in slots],
                               "dtype": "float16" if recipe.compute == "fp16" else "float32"},
                    "entries": {a.name: {"functions": {e: lora_inputs.entry(e) for e in FUNCTIONS}} for a in job.loaded.lora}}
    return _result(job, max_prefill, adapters)


def make_reproducible(package: Path) -> None:
    """Make the same inputs give the same bytes. coremltools names the package's items with random UUIDs and
    serializes the spec's protobuf maps in arbitrary order; the content is the same either way. Re-serialize
    the spec deterministically and name each item by a UUID derived from its path in the package."""
    import json
    import uuid

    from coremltools.proto import Model_pb2

    spec_file = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec_file.write_bytes(spec.SerializeToString(deterministic=True))
    manifest_file = package / "Manifest.json"
    manifest = json.loads(manifest_file.read_text())
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "llmship:" + item["path"]))
               for old, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[old]: item for old, item in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    # Keys sorted, as coremltools' ModelPackage writes the file each time it opens the package (validation
    # opens it): any other order would change the shipped bytes on first open.
    manifest_file.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def _result(job: ExportJob, max_prefill: int, adapters: dict) -> ExportResult:
    spec, recipe = job.loaded.spec, job.target.recipe
    logits_dtype = "float16" if recipe.compute == "fp16" else "float32"
    states = [tensor_spec(f"{kv}_cache_{i}", "float16", list(shape), "cache")
              for i, shape in enumerate(job.decoder.cache_shapes) for kv in ("k", "v")]

    def entry(name: str, t) -> dict:
        return {"file": PACKAGE, "function": name,
                "inputs": [tensor_spec("tokens", "int32", [1, t], "tokens"), tensor_spec("input_pos", "int32", [1], "positions")],
                "outputs": [tensor_spec("logits", logits_dtype, [1, t, spec.vocab_size], "logits")],
                "states": states}

    return ExportResult(
        entry_points={"prefill": entry("prefill", "T" if max_prefill > 1 else 1), "decode": entry("decode", 1)},
        kv_cache={"held_as": "state", "dtype": "float16", "state_names": ["k_cache_{layer}", "v_cache_{layer}"],
                  "usage": "one MLState from makeState() on either function serves both; a new one is an empty cache"},
        extra={"coreml": {
            "package": PACKAGE,
            "model_type": "mlProgram",
            "minimum_deployment_target": "iOS18",
            "functions": [*FUNCTIONS, *(lora_inputs.entry(e) for e in FUNCTIONS if adapters)],
            "default_function": "decode",
            "prefill_length": {"min": 1, "max": max_prefill, "kind": "RangeDim"},
            "compute_precision": recipe.compute,
            "weights": _weights_note(recipe),
            "cache_write": "MIL scatter at input_pos + arange(T) along the position axis",
        }},
        adapters=adapters,
    )


def _weights_note(recipe) -> str:
    return {
        "fp16": "fp16",
        "fp32": "fp32",
        "int8": "int8 symmetric, " + ("per output channel" if recipe.group_size is None else f"per block of {recipe.group_size}")
                + " (constexpr_blockwise_shift_scale)",
        "int4": f"uint4 per block of {recipe.group_size or 32} input channels, fp16 scale and fp16 offset from each block's "
                "min/max (constexpr_blockwise_shift_scale)",
        "pal4": f"4-bit k-means palettization, one 16-entry fp16 table per {recipe.group_size or 16} output channels "
                "(constexpr_lut_to_dense)",
    }[recipe.weights] + ("; embedding kept fp16" if recipe.embedding == "fp16" and recipe.weights not in ("fp16", "fp32") else "")
