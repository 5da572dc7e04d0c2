"""The LiteRT exporter ships the compression record exactly: the .tflite holds the record's codes and scales (read
back from the flatbuffer), the artifact matches the compressed reference at kernel-rounding level, and a converter
fault (scales handed to ai-edge-quantizer out of place) fails the conversion gate while parity still passes.

Conversions take ~15 s each: builtin:tiny with one prefill signature, stories260K with the small settings of
test_litert.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmship.config import BuildConfig, Evaluation, TargetProfile
from llmship.errors import ConfigError
from llmship.targets import get_profile

pytestmark = pytest.mark.litert

# builtin:tiny (hidden 64, intermediate 160, tied): int4 blocks of 32 and 64, down_proj's 160 inputs are no whole
# number of 64-blocks (int8 fallback), one projection int8 by rule, one fp16 (cast, not in the record).
INT4_RULES = [{"match": r"layers\.0\.mlp\.(gate|up)_proj", "group_size": 64},
              {"match": r"mlp\.down_proj", "group_size": 64},
              {"match": r"layers\.1\.self_attn\.v_proj", "weights": "int8", "group_size": None},
              {"match": r"layers\.2\.mlp\.up_proj", "weights": "fp16"}]
VARIANTS = {"int4-rules": ("litert-int4", {"rules": INT4_RULES}), "int8": ("litert-int8", {}),
            "int8-weight-only": ("litert-int8", {"activations": "fp32"})}
FAULTY = "model.layers.1.mlp.up_proj"


def profile(name: str, max_context: int, prefill: tuple[int, ...], **recipe) -> TargetProfile:
    data = get_profile(name).model_dump()
    data["recipe"].update(recipe)
    data.update({"max_context": max_context, "prefill_lengths": prefill})
    return TargetProfile.model_validate(data)


def tiny_profile(variant: str) -> TargetProfile:
    name, recipe = VARIANTS[variant]
    return profile(name, 32, (4,), **recipe)


def stories_profile(name: str) -> TargetProfile:
    return profile(name, 128, (16, 32))


def export(loaded, target, out):
    from llmship.manifest import read_manifest
    from llmship.pipeline import export_artifact

    export_artifact(loaded, target, out)
    return out, read_manifest(out)


def record_of(loaded, manifest):
    """The record the artifact was built from, rebuilt from its manifest the way validation rebuilds it."""
    from llmship.compress import rebuild_record

    config = BuildConfig()
    return rebuild_record(loaded, manifest["compression"], config.calibration, config.evaluation)


def unpack_int4(raw, n: int) -> np.ndarray:
    """Two codes a byte, the first in the low nibble, sign-extended."""
    raw = np.frombuffer(bytes(raw), np.uint8)
    out = np.empty(raw.size * 2, np.int16)
    out[0::2], out[1::2] = raw & 0x0F, raw >> 4
    return np.where(out > 7, out - 16, out)[:n]


def tensor_names(data: bytes) -> list[dict]:
    """Per subgraph: its signature's name, its tensors' names, and the indices of its inputs and outputs."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAsModel(data, 0)
    graphs = [model.Subgraphs(s) for s in range(model.SubgraphsLength())]
    return [{"signature": g.Name().decode(), "names": [g.Tensors(i).Name().decode() for i in range(g.TensorsLength())],
             "io": {*g.InputsAsNumpy().tolist(), *g.OutputsAsNumpy().tolist()}} for g in graphs]


def stored_weights(data: bytes) -> dict[int, dict]:
    """Every weight FULLY_CONNECTED / EMBEDDING_LOOKUP read (through a DEQUANTIZE for weight-only and fp16), by
    buffer: its type, codes and scales (as float32 [N, G]) or float values, block size, and (subgraph, op) users."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils as fu

    model = fu.read_model_from_bytearray(bytearray(data))
    kinds = {fb.BuiltinOperator.FULLY_CONNECTED: "FULLY_CONNECTED", fb.BuiltinOperator.EMBEDDING_LOOKUP: "EMBEDDING_LOOKUP"}
    types = {v: k for k, v in vars(fb.TensorType).items() if not k.startswith("_")}

    def code(op):
        c = model.operatorCodes[op.opcodeIndex]
        return max(c.builtinCode, c.deprecatedBuiltinCode)

    out: dict[int, dict] = {}
    for s, sg in enumerate(model.subgraphs):
        producers = {o: op for op in sg.operators for o in op.outputs}
        for op in sg.operators:
            if code(op) not in kinds:
                continue
            index = op.inputs[1]
            if index in producers and code(producers[index]) == fb.BuiltinOperator.DEQUANTIZE:
                index = producers[index].inputs[0]
            t = sg.tensors[index]
            w = out.setdefault(t.buffer, {"type": types[t.type], "users": set()})
            w["users"].add((s, kinds[code(op)]))
            if "values" in w:
                continue
            raw, q, n = model.buffers[t.buffer].data, t.quantization, int(np.prod(t.shape))
            if t.type == fb.TensorType.INT4:
                w["values"] = unpack_int4(raw, n).reshape(t.shape)
            elif t.type == fb.TensorType.INT8:
                w["values"] = np.frombuffer(bytes(raw), np.int8).astype(np.int16).reshape(t.shape)
            else:
                w["values"] = np.frombuffer(bytes(raw), {fb.TensorType.FLOAT16: np.float16}.get(t.type, np.float32)).reshape(t.shape)
            if q is not None and q.detailsType == fb.QuantizationDetails.BlockwiseQuantization:
                st = sg.tensors[q.details.scales]
                w["scale"] = np.frombuffer(bytes(model.buffers[st.buffer].data), np.float16).astype(np.float32).reshape(st.shape)
                w["block"] = q.details.blockSize
            elif q is not None and q.scale is not None and len(q.scale):
                w.update(scale=np.asarray(q.scale, np.float32).reshape(-1, 1), block=None, zero=np.asarray(q.zeroPoint),
                         axis=q.quantizedDimension)
    return out


@pytest.fixture(scope="module")
def tiny_artifacts(tiny, tmp_path_factory):
    made = {}

    def get(variant: str):
        if variant not in made:
            made[variant] = export(tiny, tiny_profile(variant), tmp_path_factory.mktemp("litert-record") / variant)
        return made[variant]
    return get


# ---- no conversion -----------------------------------------------------------------------------------------------

def test_weight_plan_puts_every_matrix_on_a_grid_litert_stores_as_it_is(tiny):
    from llmship.exporters.tflite import weight_plan

    grids, acts = weight_plan(tiny_profile("int4-rules"), tiny.spec)
    int4 = grids["model.layers.0.self_attn.q_proj"]
    assert (int4.bits, int4.group_size, int4.qmin, int4.qmax, int4.scale_dtype) == (4, 32, -8, 7, "bf16")
    assert int4.min_scale == 2.0 ** -14  # the smallest normal fp16: ai-edge-quantizer stores block scales as fp16
    assert grids["model.layers.0.mlp.gate_proj"].group_size == 64
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"):  # 160 % 64: fallback; by rule
        g = grids[name]
        assert (g.bits, g.group_size, g.qmin, g.qmax, g.scale_dtype) == (8, None, -127, 127, "fp32")
    assert grids["model.layers.2.mlp.up_proj"] is None and grids["model.embed_tokens"] == int4
    assert "lm_head" not in grids and acts["lm_head"] == {"scheme": "int8_per_token_asymmetric"}  # the tied head
    assert "model.layers.2.mlp.up_proj" not in acts and len(acts) == 3 * 7 - 1 + 1
    _, weight_only = weight_plan(tiny_profile("int8-weight-only"), tiny.spec)
    assert set(map(str, weight_only.values())) == {"{'scheme': 'none'}"}


@pytest.mark.parametrize("rule, message", [
    ({"match": "q_proj", "weights": "pal4"}, r"rules\[0\]\.weights pal4"),
    ({"match": "q_proj", "group_size": 48}, r"rules\[0\]\.group_size 48"),
    ({"match": "q_proj", "weights": "int8"}, r"rules\[0\]\.group_size: int8"),  # inherits the recipe's blocks of 32
    ({"match": "q_proj", "symmetric": False}, r"rules\[0\]\.symmetric false"),
])
def test_check_holds_every_rule_to_what_litert_stores(rule, message):
    from llmship.exporters.tflite import check

    with pytest.raises(ConfigError, match=message):
        check(profile("litert-int4", 32, (4,), rules=[rule]))


def test_check_with_the_model_refuses_a_rule_that_matches_nothing_or_blocks_hidden_cannot_hold(tiny):
    from llmship.exporters.tflite import check

    check(tiny_profile("int4-rules"), tiny.spec)
    with pytest.raises(ConfigError, match="matches no module"):
        check(profile("litert-int4", 32, (4,), rules=[{"match": "lm_head"}]), tiny.spec)  # tied: no lm_head module
    with pytest.raises(ConfigError, match="hidden_size 64"):
        check(profile("litert-int4", 32, (4,), rules=[{"match": "embed", "group_size": 128}]), tiny.spec)


# ---- builtin:tiny: the file holds the record -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_tflite_holds_the_records_codes_and_scales(tiny, tiny_artifacts, variant):
    path, manifest = tiny_artifacts(variant)
    record = record_of(tiny, manifest)
    data = (path / "model.tflite").read_bytes()
    stored = stored_weights(data)
    quantized = {b: w for b, w in stored.items() if w["type"] in ("INT4", "INT8")}
    where = {}
    for name, t in record.tensors.items():
        hits = [b for b, w in quantized.items() if w["values"].shape == t.shape and np.array_equal(w["values"], t.codes.numpy())
                and np.array_equal(w["scale"], t.scale.numpy())]  # scales as stored: fp32, or fp16 holding bf16 values
        assert len(hits) == 1, (name, hits)
        w = where[name] = quantized[hits[0]]
        assert w["type"] == f"INT{t.grid.bits}" and w["block"] == t.grid.group_size, name
        assert t.grid.group_size is not None or (w["axis"] == 0 and not w["zero"].any()), name
        if t.grid.group_size is None:  # per-channel scales live in each signature's tensor table: written once
            assert data.count(w["scale"].astype("<f4").tobytes()) == 1, name
    assert len(quantized) == len(record.tensors)  # nothing quantized that the record does not hold
    for graph in tensor_names(data):  # the converter's module paths are not kept: only a signature's inputs/outputs
        assert all(name == f"t{i}" for i, name in enumerate(graph["names"]) if i not in graph["io"]), graph["io"]
        assert all(graph["names"][i].startswith(graph["signature"] + "_") for i in graph["io"])  # as converted
    subgraphs = {s for w in stored.values() for s, _ in w["users"]}
    assert len(subgraphs) == 2  # prefill_4, decode
    tied = where["model.embed_tokens"]["users"]  # one buffer: every signature's lookup and head read it
    assert tied == {(s, op) for s in subgraphs for op in ("EMBEDDING_LOOKUP", "FULLY_CONNECTED")}
    floats = [w for w in stored.values() if w["type"] not in ("INT4", "INT8")]
    if variant == "int4-rules":
        assert {n for n, t in record.tensors.items() if t.grid.bits == 8} == {
            "model.layers.1.self_attn.v_proj", *(f"model.layers.{i}.mlp.down_proj" for i in range(3))}
        assert {t.grid.group_size for t in record.tensors.values() if t.grid.bits == 4} == {32, 64}
        assert (record.tensors["model.embed_tokens"].codes == -8).any()  # the full int4 range survives the quantizer
        fp16 = tiny.weights["model.layers.2.mlp.up_proj.weight"].half().numpy()
        assert len(floats) == 1 and floats[0]["type"] == "FLOAT16" and np.array_equal(floats[0]["values"], fp16)
        assert manifest["litert"]["int8_fallback_layers"] == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    else:
        assert floats == [] and len(record.tensors) == 3 * 7 + 1


def test_a_float_model_unlike_the_record_is_refused(tiny):
    """The exporter finds each weight by content and checks it against the record: a weight the record does not
    dequantize to, or a record tensor changed after the model was built, stops the export."""
    import dataclasses

    from llmship.exporters import tflite, tflite_weights as tw
    from llmship.models import build_decoder
    from llmship.pipeline import compression_record

    target = tiny_profile("int8")
    record, _, _ = compression_record(tiny, target, tflite, BuildConfig())
    decoder = build_decoder(tiny, target.max_context, weights=record.dequantized_weights(tiny.weights))
    content = tflite.convert(decoder, target)
    name = "model.layers.0.self_attn.k_proj"
    t = record.tensors[name]
    changed = dataclasses.replace(t, codes=torch.roll(t.codes, 1, dims=0))
    with pytest.raises(RuntimeError, match=f"{name}: the weight in the float model is not the record's"):
        tw.quantize(content, decoder, tiny.spec, target.recipe, dataclasses.replace(record, tensors={**record.tensors, name: changed}))
    weights = record.dequantized_weights(tiny.weights)
    weights[f"{name}.weight"] = weights[f"{name}.weight"] * 1.5  # the model handed over is not the one converted
    other = build_decoder(tiny, target.max_context, weights=weights)
    with pytest.raises(RuntimeError, match="is no matrix of the model"):
        tw.quantize(content, other, tiny.spec, target.recipe, record)


# ---- stories260K: conversion against the compressed reference --------------------------------------------------------

def validate(stories, artifact):
    from llmship.validation.stage import validate_artifact

    return validate_artifact(artifact, BuildConfig(evaluation=Evaluation(tokens=128, latency_runs=2)), loaded=stories)


@pytest.mark.shared
@pytest.mark.parametrize("name, below_parity, top1_min", [
    # Dynamic int8 activations set a floor: an fp32 rounding difference anywhere flips an activation code and the
    # flip travels through the cache. The PyTorch reference against itself with its norm weights nudged by one ulp
    # gives KL 1e-8 .. 4.3e-4, top-1 0.984 on these tokens (int4: 4e-8 .. 2.1e-4). stories260K's int8 weights cost
    # little (parity KL 1.2e-3), so int8's conversion (3.6e-4, top-1 0.984; the logits are bit-exact up to the
    # first flip, at position 25) sits at that floor, ~3x below parity.
    pytest.param("litert-int8", 1, 0.97, marks=pytest.mark.full),  # make test: its gates in test_litert.py
    ("litert-int4", 50, 0.98),  # measured: conversion KL 3.5e-5, top-1 0.992, against parity 0.083
])
def test_conversion_is_at_kernel_rounding_level_on_stories(stories, tmp_path, name, below_parity, top1_min):
    artifact, _ = export(stories, stories_profile(name), tmp_path / name)
    report = validate(stories, artifact)
    conversion, parity = report["conversion"], report["parity"]
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]  # conversion_floor_ratio_max among them
    assert conversion["reference"].startswith("compressed")
    assert conversion["kl_mean"] * below_parity < parity["kl_mean"]
    assert conversion["top1_agreement"] >= top1_min


@pytest.mark.shared
def test_scales_out_of_place_fail_the_conversion_gate_while_parity_passes(stories, tmp_path, monkeypatch):
    """One projection's channel scales handed to the quantizer rolled by one: the model is still a usable int8 model
    (parity within the profile's limits), but not the record; only the conversion comparison can tell."""
    from llmship.exporters import tflite_weights as tw

    real = tw.quantizer_params

    def rolled(t):
        codes, scale = real(t)
        if t.name == FAULTY:
            scale = np.roll(scale, 1, axis=1 if t.grid.group_size else 0)
        return codes, scale

    monkeypatch.setattr(tw, "quantizer_params", rolled)
    artifact, _ = export(stories, stories_profile("litert-int8"), tmp_path / "faulty")
    report = validate(stories, artifact)
    failed = {g["name"] for g in report["gates"] if not g["passed"]}
    assert failed == {"conversion_floor_ratio_max"}, report["gates"]
    assert report["conversion"]["floor_ratio"] > 3 * get_profile("litert-int8").gates.conversion_floor_ratio_max
