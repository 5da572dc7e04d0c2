"""The onnx target: export with torch.onnx + onnxruntime.quantization, run on ONNX Runtime and onnxruntime-genai."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmship.config import BuildConfig, Evaluation
from llmship.errors import ConfigError
from llmship.manifest import read_manifest
from llmship.models import build_decoder, load_model
from llmship.pipeline import export_artifact
from llmship.validation.stage import validate_artifact
from llmship.targets import get_profile
from llmship.validation.evaluate import greedy
from llmship.validation.runners.onnx import OnnxRunner
from llmship.validation.runners.reference import ReferenceRunner

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
MAX_CONTEXT = 128

pytestmark = pytest.mark.onnx


def profile(name: str, **recipe):
    from llmship.config import Recipe

    base = get_profile(name)
    return base.model_copy(update={"max_context": MAX_CONTEXT, "prefill_lengths": (16, 32),
                                   "recipe": Recipe.model_validate({**base.recipe.model_dump(), **recipe})})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Export each (model, target, recipe override) once per module."""
    made = {}

    def get(loaded, target: str, **recipe) -> Path:
        key = (loaded.source, target, tuple(sorted(recipe.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(target) / "artifact"
            made[key] = export_artifact(loaded, profile(target, **recipe), out)
        return made[key]
    return get


def graph(artifact: Path):
    import onnx

    return onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph


def ops(artifact: Path) -> set[str]:
    return {n.op_type for n in graph(artifact).node}


def float_linears(artifact: Path) -> list[str]:
    """MatMuls that still multiply by a constant fp32 weight (HQQ's zero-point remainders, [K/block, N], aside)."""
    g = graph(artifact)
    constants = {i.name for i in g.initializer if not i.name.endswith("_remainder")}
    return [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in constants]


def prompt_ids(loaded, text="Once upon a time") -> list[int]:
    ids = loaded.tokenizer.encode(text).ids
    bos = loaded.spec.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def chunked(runner, ids: list[int], chunks: tuple[int, ...]) -> np.ndarray:
    """Prefill `chunks` (lengths) one after another, then decode the rest one token at a time."""
    runner.reset()
    out, pos = [], 0
    for n in chunks:
        out.append(runner.prefill(ids[pos:pos + n], pos))
        pos += n
    out += [runner.decode(t, p)[None] for p, t in enumerate(ids[pos:], start=pos)]
    return np.concatenate(out)


def assert_fp32_parity(loaded, artifact: Path):
    reference = ReferenceRunner.from_decoder(build_decoder(loaded, MAX_CONTEXT))
    runner = OnnxRunner(artifact, read_manifest(artifact), threads=2)
    ids = np.random.default_rng(0).integers(3, loaded.spec.vocab_size, 72).tolist()
    ours, ref = chunked(runner, ids, (32, 9)), chunked(reference, ids, (32, 9))
    assert ours.shape == (72, loaded.spec.vocab_size)
    assert np.abs(ours - ref).max() < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0
    prompt = prompt_ids(loaded)
    assert greedy(runner, prompt, 32, chunk=4) == greedy(reference, prompt, 32, chunk=4)


def genai_greedy(artifact: Path, prompt: list[int], steps: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + steps)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


# ---- fp32 -------------------------------------------------------------------------------------------------

def test_fp32_matches_reference_on_tiny(tiny, artifacts):
    assert_fp32_parity(tiny, artifacts(tiny, "onnx-fp32"))


@pytest.mark.shared
def test_fp32_matches_reference_on_stories(stories, artifacts):
    assert_fp32_parity(stories, artifacts(stories, "onnx-fp32"))


def test_manifest_describes_the_graph_an_app_calls(tiny, artifacts):
    import onnxruntime as ort

    artifact = artifacts(tiny, "onnx-fp32")
    manifest = read_manifest(artifact)
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    types = {"tensor(int64)": "int64", "tensor(float)": "float32"}
    graph_inputs = [(i.name, types[i.type], [d if isinstance(d, int) else "T" for d in i.shape]) for i in session.get_inputs()]
    graph_outputs = [(o.name, types[o.type], [d if isinstance(d, int) else "T" for d in o.shape]) for o in session.get_outputs()]
    entry = manifest["entry_points"]["prefill"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in entry["inputs"]] == graph_inputs
    assert [(t["name"], t["dtype"], t["shape"]) for t in entry["outputs"]] == graph_outputs
    assert manifest["kv_cache"]["held_as"] == "inputs"
    assert manifest["kv_cache"]["shape"] == [1, tiny.spec.num_kv_heads, MAX_CONTEXT, tiny.spec.head_dim]
    assert set(manifest["files"]) >= {"model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"}


def test_tied_embedding_is_stored_once(tiny, artifacts):
    import onnx

    model = onnx.load(str(artifacts(tiny, "onnx-fp32") / "model.onnx"))
    matrices = [i.name for i in model.graph.initializer if tiny.spec.vocab_size in i.dims]
    assert matrices == ["lm_head.MatMul.weight"]
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "lm_head.MatMul.weight"]
    assert len(gathers) == 1  # the embedding reads the head's matrix


def test_runner_refuses_positions_past_the_cache(tiny, artifacts):
    artifact = artifacts(tiny, "onnx-fp32")
    runner = OnnxRunner(artifact, read_manifest(artifact), threads=1)
    runner.prefill([5] * 8, MAX_CONTEXT - 8)  # exactly fills the cache
    with pytest.raises(ConfigError, match=f"max_context {MAX_CONTEXT}"):
        runner.decode(5, MAX_CONTEXT)


# ---- onnxruntime-genai ------------------------------------------------------------------------------------

def test_genai_matches_reference_logits_and_greedy_on_tiny(tiny, artifacts):
    import onnxruntime_genai as og

    artifact = artifacts(tiny, "onnx-fp32")
    prompt = prompt_ids(tiny)
    reference = ReferenceRunner.from_decoder(build_decoder(tiny, MAX_CONTEXT))
    assert genai_greedy(artifact, prompt, 32) == greedy(reference, prompt, 32, chunk=len(prompt))
    # teacher-forced through genai's shared past/present buffer: the prompt at once, then one token a call
    ids = np.random.default_rng(2).integers(3, tiny.spec.vocab_size, 24).tolist()
    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=MAX_CONTEXT)
    generator = og.Generator(model, params)
    generator.append_tokens(ids[:8])
    ours = [np.asarray(generator.get_logits()).reshape(-1)]
    for t in ids[8:]:
        generator.append_tokens([t])
        ours.append(np.asarray(generator.get_logits()).reshape(-1))
    ref = chunked(reference, ids, (8,))[7:]
    assert np.abs(np.stack(ours) - ref).max() < 1e-3


@pytest.mark.shared
def test_genai_generates_reference_greedy_tokens_on_stories(stories, artifacts):
    import onnxruntime_genai as og

    artifact = artifacts(stories, "onnx-fp32")
    prompt = prompt_ids(stories)
    reference = ReferenceRunner.from_decoder(build_decoder(stories, MAX_CONTEXT))
    expected = greedy(reference, prompt, 32, chunk=len(prompt))
    assert genai_greedy(artifact, prompt, 32) == expected
    # genai's own tokenizer reads the artifact's tokenizer files and decodes what the reference decodes
    tokenizer = og.Tokenizer(og.Model(str(artifact)))
    assert tokenizer.decode(np.array(expected, dtype=np.int32)) == stories.tokenizer.decode(expected)


# ---- int8 / int4 ------------------------------------------------------------------------------------------

@pytest.mark.shared
@pytest.mark.parametrize("target, size_ratio_max", [("onnx-int8", 0.45), ("onnx-int4", 0.4)])
def test_quantized_targets_pass_their_gates_on_stories(stories, artifacts, target, size_ratio_max):
    artifact = artifacts(stories, target)
    assert float_linears(artifact) == []
    # the tied matrix is one quantized tensor: the embedding gathers the head's MatMulNBits blocks
    g = graph(artifact)
    head = next(n for n in g.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    reshape = {n.output[0]: n for n in g.node if n.op_type == "Reshape"}
    embedding = next(n for n in g.node if n.op_type == "GatherBlockQuantized")
    assert reshape[embedding.input[0]].input[0] == head.input[1]
    assert not [i.name for i in g.initializer if "embed_tokens" in i.name]
    config = BuildConfig(model=str(STORIES), evaluation=Evaluation(tokens=128, latency_runs=4))
    report = validate_artifact(artifact, config, loaded=stories)
    failed = [g for g in report["gates"] if not g["passed"]]
    assert not failed, failed
    fp32_bytes = sum(f.stat().st_size for f in artifacts(stories, "onnx-fp32").glob("model.onnx*"))
    assert sum(f.stat().st_size for f in artifact.glob("model.onnx*")) < size_ratio_max * fp32_bytes


@pytest.mark.shared
def test_per_channel_int8_is_dynamic_quantization(stories, artifacts):
    artifact = artifacts(stories, "onnx-int8", group_size=None)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops(artifact)
    assert float_linears(artifact) == []
    reference = ReferenceRunner.from_decoder(build_decoder(stories, MAX_CONTEXT))
    runner = OnnxRunner(artifact, read_manifest(artifact), threads=2)
    ids = prompt_ids(stories, "Once upon a time, there was a little girl named Lily. She loved to play outside")
    ours, ref = chunked(runner, ids, (16,)), chunked(reference, ids, (16,))
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def snap_to_4bit_grid(loaded, block: int = 32):
    """The same model with every matrix on a 4-bit grid per block of `block` inputs, (q - z) * s with integer
    z, each block using levels 0 and 15: weights the int4/int8 recipes represent exactly, so any error left
    is the graph's, not the quantizer's."""
    import dataclasses

    import torch

    weights = dict(loaded.weights)
    for name, w in loaded.weights.items():
        if w.dim() != 2:
            continue
        rows, cols = w.shape
        padded = torch.nn.functional.pad(w, (0, -cols % block)).reshape(rows, -1, block)
        lo, hi = padded.amin(-1, keepdim=True).clamp(max=0), padded.amax(-1, keepdim=True).clamp(min=0)
        s = (hi - lo) / 15
        z = torch.round(-lo / s)
        q = torch.clamp(torch.round(padded / s + z), 0, 15)
        q[..., 0], q[..., 1] = 0, 15
        weights[name] = ((q - z) * s).reshape(rows, -1)[:, :cols].contiguous()
    return dataclasses.replace(loaded, weights=weights, source=loaded.source + "@grid4")


@pytest.mark.parametrize("model, target, recipe", [
    ("gqa3-tied", "onnx-int4", {"activations": "fp32", "embedding": "int4"}),  # head int4 shared, hidden 48: padded
    ("tiny-tied", "onnx-int4", {"activations": "fp32", "embedding": "int8"}),  # head int8, shared 8-bit
    ("qwen3-untied", "onnx-int4", {"activations": "fp32", "embedding": "int4"}),  # hidden 48: padded blocks
    ("qwen3-untied", "onnx-int8", {"activations": "fp32"}),  # 8-bit blocks, int8 embedding rows
], ids=["tied-int4-emb4", "tied-int4-emb8", "untied-int4-emb4", "untied-int8"])
def test_quantized_graph_is_exact_on_grid_weights(tiny, artifacts, model, target, recipe):
    """Every quantized path (HQQ linears, a tied head shared through GatherBlockQuantized, an untied int4 or
    int8 embedding, hidden sizes that are not whole blocks) computes the reference function when the
    weights are representable: the error left is the graph's, not the quantizer's."""
    from tests.helpers import hf_model, loaded_from_hf

    family = {"gqa3-tied": "llama-tied-gqa3", "qwen3-untied": "qwen3-qknorm-headdim"}.get(model)
    loaded = snap_to_4bit_grid(loaded_from_hf(hf_model(family), family) if family else tiny)
    artifact = artifacts(loaded, target, **recipe)
    assert float_linears(artifact) == [] and "MatMulNBits" in ops(artifact)
    reference = ReferenceRunner.from_decoder(build_decoder(loaded, MAX_CONTEXT))
    runner = OnnxRunner(artifact, read_manifest(artifact), threads=2)
    ids = np.random.default_rng(1).integers(3, loaded.spec.vocab_size, 40).tolist()
    ours, ref = chunked(runner, ids, (16,)), chunked(reference, ids, (16,))
    # an untied int8 embedding is a symmetric per-row table, which this asymmetric grid does not fit exactly
    tolerance = 1e-2 if model == "qwen3-untied" and recipe.get("embedding", "int8") == "int8" else 1e-3
    assert np.abs(ours - ref).max() < tolerance * max(1.0, np.abs(ref).max())
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0


def test_the_records_blocks_are_what_onnx_runtime_multiplies_by():
    """A record's 4-bit blocks with float zero points written as MatMulNBits: ONNX Runtime computes x @ W^T with
    exactly the record's dequantized W, before and after the zero points are split into an integer kernel and a
    block-sum correction (K = 80 is not a whole number of blocks, so the padded path is covered too)."""
    import onnx_ir as ir
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from llmship.compress.grids import asymmetric
    from llmship.compress.record import QuantizedTensor
    from llmship.exporters import onnx_weights as ow
    from llmship.exporters.onnx import _adder

    rng = np.random.default_rng(0)
    k, n = 80, 24
    weight = (rng.standard_normal((n, k)) + 0.3).astype(np.float32)  # off-centre, so zero points are fractional
    grid = asymmetric(4, 32, zero_point="float")
    t = QuantizedTensor("linear", grid, *grid.rtn(torch.from_numpy(weight)))
    proto = helper.make_model(
        helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="linear/MatMul")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, n])],
                          [numpy_helper.from_array(weight.T.copy(), "w")]),
        opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = rng.standard_normal((1, 3, k)).astype(np.float32)

    def run(model):
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    model = ir.from_proto(proto)
    ow.matmul_nbits(model, next(iter(model.graph)), t, accuracy_level=0)
    assert np.abs(t.zero.numpy() - np.round(t.zero.numpy())).max() > 0.1
    before = run(model)
    expected = x @ t.dequantize().numpy().T
    assert np.abs(before - expected).max() < 1e-5 * np.abs(expected).max()
    assert ow.integer_zero_points(model, _adder) == 1
    assert next(v for v in model.graph.initializers.values() if v.name.endswith("zero_points")).const_value.numpy().dtype == np.uint8
    assert np.abs(run(model) - expected).max() < 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("recipe, message", [
    ({"weights": "fp16", "group_size": None}, "recipe.weights fp16"),
    ({"weights": "int8", "activations": "fp32", "group_size": None}, "set recipe.activations: int8"),
    ({"weights": "int8", "rules": [{"match": "down_proj", "group_size": 48}]}, r"recipe.rules\[0\].group_size 48"),
    ({"weights": "int4", "group_size": 48}, "MatMulNBits"),
])
def test_recipes_onnx_cannot_do_are_config_errors(tiny, tmp_path, recipe, message):
    target = profile("onnx-int8", **recipe)
    with pytest.raises(ConfigError, match=message):
        export_artifact(tiny, target, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- SmolLM2 ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_fp32_matches_reference(smollm2, tmp_path):
    loaded = load_model(smollm2)
    artifact = export_artifact(loaded, profile("onnx-fp32"), tmp_path / "fp32")
    assert_fp32_parity(loaded, artifact)


def test_runner_calls_the_graph_by_the_names_its_manifest_gives(tiny, artifacts, tmp_path):
    """Rename the graph's token input and logits output (and say so in the manifest): the runner follows the
    manifest, so the renamed artifact computes the same logits."""
    import json
    import shutil

    import onnx

    from llmship.manifest import describe_files

    source = artifacts(tiny, "onnx-fp32")
    renamed = Path(shutil.copytree(source, tmp_path / "renamed"))
    model = onnx.load(str(renamed / "model.onnx"))
    for node in model.graph.node:
        node.input[:] = ["ids" if n == "input_ids" else n for n in node.input]
        node.output[:] = ["scores" if n == "logits" else n for n in node.output]
    next(i for i in model.graph.input if i.name == "input_ids").name = "ids"
    next(o for o in model.graph.output if o.name == "logits").name = "scores"
    onnx.save(model, str(renamed / "model.onnx"))
    manifest = json.loads((renamed / "manifest.json").read_text())
    for entry in manifest["entry_points"].values():
        for t in entry["inputs"] + entry["outputs"]:
            t["name"] = {"input_ids": "ids", "logits": "scores"}.get(t["name"], t["name"])
    manifest["files"] = describe_files(renamed)
    (renamed / "manifest.json").write_text(json.dumps(manifest))
    ids = [1, 17, 40, 99, 3]
    a = OnnxRunner(source, read_manifest(source), threads=1).prefill(ids, 0)
    b = OnnxRunner(renamed, read_manifest(renamed), threads=1).prefill(ids, 0)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("family, with_ids", [
    # without BOS/EOS: make test runs Qwen2's (its configs name none), make test-full every family's
    pytest.param(f, ids, id=f"{f}-{'bos-eos' if ids else 'no-bos-eos'}", marks=[] if ids or f == "qwen2-bias" else [pytest.mark.full])
    for f in sorted(__import__("tests.helpers", fromlist=["FAMILY_CONFIGS"]).FAMILY_CONFIGS) for ids in (True, False)])
def test_every_family_loads_in_genai_and_generates_the_reference_tokens(family, with_ids, tmp_path):
    """The folder is an onnxruntime-genai model for every family, also when the config names no BOS/EOS
    (Qwen2/Qwen3-style configs): genai needs a number for bos_token_id."""
    import dataclasses

    from tests.helpers import hf_model, loaded_from_hf

    loaded = loaded_from_hf(hf_model(family))
    if not with_ids:
        config = {k: v for k, v in loaded.config.items() if k not in ("bos_token_id", "eos_token_id")}
        loaded = dataclasses.replace(loaded, config=config, spec=dataclasses.replace(loaded.spec, bos_token_id=None, eos_token_ids=()))
    target = get_profile("onnx-fp32").model_copy(update={"max_context": 64, "prefill_lengths": (16,)})
    artifact = export_artifact(loaded, target, tmp_path / "a")
    reference = ReferenceRunner.from_decoder(build_decoder(loaded, 64))
    prompt = [5, 17, 33, 8, 21]
    assert genai_greedy(artifact, prompt, 24) == greedy(reference, prompt, 24, chunk=len(prompt))
