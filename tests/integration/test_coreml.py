"""Core ML target: a stateful multifunction ML program (iOS 18), run on Linux by the MIL reference executor.

Every parity test runs the saved model.mlpackage (program and weight.bin read back by coremltools) through
the runner an app-facing evaluation uses, and compares with the FP32 PyTorch reference on the same tokens:
prefill chunks, then decode steps through the shared KV-cache state. Conversions take seconds (tiny,
stories260K) to minutes (SmolLM2), so each artifact is built once per module.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmship.config import TargetProfile
from llmship.errors import ConfigError
from llmship.manifest import read_manifest
from llmship.models import build_decoder, load_model
from llmship.pipeline import export_artifact
from llmship.targets import get_profile
from llmship.validation import evaluate as ev
from llmship.validation.runners import open_runner
from llmship.validation.runners.reference import ReferenceRunner

pytest.importorskip("coremltools")
pytestmark = pytest.mark.coreml

WEIGHTS = "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"


def target(name: str, **changes) -> TargetProfile:
    return TargetProfile.model_validate({**get_profile(name).model_dump(), **changes})


def build(loaded, profile: TargetProfile, out: Path):
    export_artifact(loaded, profile, out)
    return out, read_manifest(out)


def reference(loaded, max_context: int) -> ReferenceRunner:
    return ReferenceRunner.from_decoder(build_decoder(loaded, max_context))


def plan(tokens, prefill_tokens: int, chunk: int, greedy_prompt) -> ev.EvalPlan:
    return ev.single_window_plan(tokens, prefill_tokens, chunk, (greedy_prompt,), 32)


def parity(artifact, loaded, n_tokens: int = 64, prefill_tokens: int = 24, chunk: int = 16, seed: int = 0):
    """Teacher-forced metrics and greedy match (of 32) of the artifact against the FP32 reference."""
    path, manifest = artifact
    runner, ref = open_runner(path, manifest), reference(loaded, manifest["max_context"])
    tokens = ev.sample_text(ref, loaded.spec.bos_token_id, n_tokens, seed=seed, vocab=loaded.spec.vocab_size)
    p = plan(tokens, prefill_tokens, chunk, tokens[:6])
    metrics, _ = ev.parity_metrics(ev.teacher_forced(runner, p), ev.teacher_forced(ref, p), p.targets())
    greedy = ev.greedy_match(ev.greedy(runner, p.prompts[0], 32, chunk), ev.greedy(ref, p.prompts[0], 32, chunk))
    return metrics, greedy


@pytest.fixture(scope="module")
def tiny_fp16(tiny, tmp_path_factory):
    # A short context and prefill range keep it quick and make a 24-token prefill go in two chunks.
    return build(tiny, target("coreml-fp16", max_context=96, prefill_lengths=(16,)), tmp_path_factory.mktemp("tiny") / "coreml-fp16")


@pytest.fixture(scope="module")
def stories_artifacts(stories, tmp_path_factory):
    root = tmp_path_factory.mktemp("stories")
    return {name: build(stories, target(name, max_context=128), root / name)
            for name in ("coreml-fp16", "coreml-int8", "coreml-int4", "coreml-pal4")}


def program(artifact):
    from llmship.validation.runners.mil_executor import load_program

    return load_program(artifact[0] / "model.mlpackage")


# --- the package and its manifest ------------------------------------------------------------------

def test_manifest_describes_functions_inputs_and_state(tiny, tiny_fp16):
    _, manifest = tiny_fp16
    spec = tiny.spec
    cache = [1, spec.num_kv_heads, 96, spec.head_dim]
    prefill, decode = manifest["entry_points"]["prefill"], manifest["entry_points"]["decode"]
    assert (prefill["function"], decode["function"]) == ("prefill", "decode")
    assert prefill["inputs"] == [{"name": "tokens", "dtype": "int32", "shape": [1, "T"], "role": "tokens"},
                                 {"name": "input_pos", "dtype": "int32", "shape": [1], "role": "positions"}]
    assert decode["outputs"] == [{"name": "logits", "dtype": "float16", "shape": [1, 1, spec.vocab_size], "role": "logits"}]
    assert [s["name"] for s in decode["states"]] == [f"{kv}_cache_{i}" for i in range(spec.num_layers) for kv in "kv"]
    assert all(s["shape"] == cache and s["dtype"] == "float16" for s in decode["states"])
    assert manifest["kv_cache"]["held_as"] == "state" and manifest["kv_cache"]["dtype"] == "float16"
    assert manifest["coreml"]["minimum_deployment_target"] == "iOS18"
    assert manifest["coreml"]["prefill_length"] == {"min": 1, "max": 16, "kind": "RangeDim"}


def test_package_is_a_stateful_multifunction_program_with_shared_weights(tiny, tiny_fp16):
    import coremltools as ct
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    path, manifest = tiny_fp16
    spec = ct.models.MLModel(str(path / "model.mlpackage"), skip_model_load=True).get_spec()
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion >= 9  # 9 = iOS 18
    prog = program(tiny_fp16)
    assert set(prog.functions) == {"prefill", "decode"}
    for func in prog.functions.values():
        states = {n: v for n, v in func.inputs.items() if types.is_state(v.sym_type)}
        assert len(states) == 2 * tiny.spec.num_layers
        assert len(func.find_ops(op_type="coreml_update_state")) == len(states)
    assert prog.functions["decode"].inputs["tokens"].shape == (1, 1)
    assert is_symbolic(prog.functions["prefill"].inputs["tokens"].shape[1])  # RangeDim 1..16
    # Weights are stored once for both functions: fp16 parameters plus the small rope tables.
    weight_bytes = manifest["files"][WEIGHTS]["bytes"]
    assert 2 * tiny.spec.num_params <= weight_bytes <= 1.25 * 2 * tiny.spec.num_params


def test_fp16_program_keeps_only_the_rms_statistic_in_fp32(tiny_fp16):
    from coremltools.converters.mil.mil import types

    func = program(tiny_fp16).functions["decode"]
    fp32_ops = {op.op_type for op in func.operations if op.op_type not in ("const", "cast")
                and any(getattr(o, "dtype", None) == types.fp32 for o in op.outputs)}
    assert fp32_ops == {"pow", "reduce_mean", "add", "rsqrt", "mul"}
    assert all(op.outputs[0].dtype == types.fp16 for op in func.find_ops(op_type="linear"))


# --- parity through the reference executor ---------------------------------------------------------

def test_runner_on_linux_says_core_ml_did_not_run(tiny_fp16):
    import sys

    runner = open_runner(*tiny_fp16)
    if sys.platform == "darwin":
        pytest.skip("on macOS the real Core ML runtime runs")
    assert "Core ML runtime was not run" in runner.executor
    assert "does not prove what Apple's runtime outputs on a device" in runner.executor_note


def test_tiny_fp16_matches_reference(tiny, tiny_fp16):
    metrics, greedy = parity(tiny_fp16, tiny)
    assert metrics["top1_agreement"] >= 0.99
    assert metrics["max_abs_err"] <= 0.05  # fp16 rounding of logits of magnitude ~10
    assert greedy == 32


def test_prefill_chunks_long_prompts_and_rejects_positions_past_the_cache(tiny, tiny_fp16):
    runner, ref = open_runner(*tiny_fp16), reference(tiny, 96)
    tokens = list(range(3, 43))  # 40 tokens: three calls of the prefill function (16 + 16 + 8)
    ours, theirs = runner.prefill(tokens, 0), ref.prefill(tokens, 0)
    assert ours.shape == (40, tiny.spec.vocab_size) and ours.dtype == np.float32
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.99
    runner.reset()
    fresh = runner.prefill(tokens[:5], 0)  # reset forgot the cache: same logits as a first call
    np.testing.assert_allclose(fresh, ours[:5], atol=1e-6)
    with pytest.raises(ConfigError, match="max_context 96"):
        runner.decode(5, 96)


def test_fault_planted_in_weight_bin_is_caught(tiny, tiny_fp16, tmp_path):
    """The executor runs the shipped file: alter the tied embedding/head inside weight.bin and parity collapses."""
    path, manifest = tiny_fp16
    faulty = tmp_path / "faulty"
    shutil.copytree(path, faulty)
    blob = bytearray((faulty / WEIGHTS).read_bytes())
    table = tiny.weights["model.embed_tokens.weight"].half().numpy()
    needle = table.tobytes()
    assert blob.count(needle) == 1  # one copy serves gather, lm_head, and both functions
    start = blob.find(needle)
    blob[start:start + len(needle)] = np.roll(table, 1, axis=0).tobytes()  # every token gets its neighbour's row
    (faulty / WEIGHTS).write_bytes(bytes(blob))
    good, _ = parity(tiny_fp16, tiny)
    bad, _ = parity((faulty, manifest), tiny)
    # The random tiny model's argmax barely depends on its input (it repeats one token), so the fault shows
    # in the distribution: KL far above any recipe's gate, logits no longer aligned with the reference.
    assert good["kl_mean"] < 1e-5 and good["cosine_min"] > 0.9999
    assert bad["kl_mean"] > 0.05 and bad["cosine_min"] < 0.5


def test_pal4_palettes_are_the_ones_coremltools_kmeans_picks(tiny):
    """The record's pal4 tables are coremltools' own k-means (palettize_weights mode="kmeans", 16 channels a
    table): the palettes llmship ships are the ones Core ML's toolchain would choose."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_lut_to_dense

    from llmship.compress.algorithms import rtn
    from llmship.exporters import coreml, coreml_weights
    from llmship.models.export import export_stateful

    profile = target("coreml-pal4", max_context=32, prefill_lengths=(8,))
    coreml.register_index_copy()
    programs = export_stateful(build_decoder(tiny, 32, "fp16"), 8)
    mlmodel = coreml.convert_function(programs["decode"], 1, 8, profile.recipe)
    stock = cto.palettize_weights(mlmodel, cto.OptimizationConfig(
        global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16)))
    grids, _ = coreml_weights.weight_plan(profile, tiny.spec)
    grids = {n: g for n, g in grids.items() if g is not None}
    ours = rtn(tiny, grids)
    seen = 0
    for op in stock._mil_program.functions["main"].find_ops(op_type="constexpr_lut_to_dense"):
        module = coreml_weights.const_module(op.name.removesuffix("_palettized"), True)
        name = next(n for n in grids if n.replace(".", "_") == module)
        expected = constexpr_lut_to_dense.decompress(op.indices.val, op.lut.val, None)
        np.testing.assert_array_equal(grids[name].dequantize(*ours[name]).numpy().astype(np.float16), expected)
        seen += 1
    assert seen == len(grids) > 0


def test_unsupported_recipe_is_a_config_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="activations int8"):
        export_artifact(tiny, target("coreml-int8", recipe={"weights": "int8", "activations": "int8"}), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- stories260K: every recipe ---------------------------------------------------------------------

@pytest.mark.shared
def test_stories_fp16_matches_reference(stories, stories_artifacts):
    metrics, greedy = parity(stories_artifacts["coreml-fp16"], stories, n_tokens=96, prefill_tokens=32, chunk=32)
    assert metrics["top1_agreement"] >= 0.99 and greedy == 32
    assert metrics["kl_mean"] <= 1e-3


@pytest.mark.shared
@pytest.mark.parametrize("name, op_type, max_weight_ratio", [
    # stories260K's MLP is 172 wide: not a multiple of int4's 32-blocks (down_proj) nor of pal4's 16-channel
    # groups (gate/up_proj), so coremltools leaves those matrices fp16 and the ratios sit above 1/4.
    ("coreml-int8", "constexpr_blockwise_shift_scale", 0.6),
    ("coreml-int4", "constexpr_blockwise_shift_scale", 0.55),
    ("coreml-pal4", "constexpr_lut_to_dense", 0.7),
])
def test_stories_compressed_recipes_are_smaller_and_within_their_gates(stories, stories_artifacts, name, op_type, max_weight_ratio):
    artifact = stories_artifacts[name]
    fp16_bytes = stories_artifacts["coreml-fp16"][1]["files"][WEIGHTS]["bytes"]
    # Compressed matrices read through decompression ops; norms (below coremltools' size threshold) stay fp16.
    assert program(artifact).functions["decode"].find_ops(op_type=op_type)
    assert artifact[1]["files"][WEIGHTS]["bytes"] <= max_weight_ratio * fp16_bytes
    metrics, _ = parity(artifact, stories, n_tokens=96, prefill_tokens=32, chunk=32)
    gates = get_profile(name).gates
    assert metrics["top1_agreement"] >= gates.top1_agreement_min
    assert gates.kl_mean_max is None or metrics["kl_mean"] <= gates.kl_mean_max


# --- SmolLM2 ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_fp16_matches_reference(smollm2, tmp_path):
    loaded = load_model(smollm2)
    artifact = build(loaded, target("coreml-fp16", max_context=160, prefill_lengths=(32,)), tmp_path / "smollm2")
    metrics, greedy = parity(artifact, loaded, n_tokens=96, prefill_tokens=32, chunk=32)
    assert metrics["top1_agreement"] >= 0.99 and greedy == 32
    assert metrics["kl_mean"] <= 1e-3
    report = json.dumps(metrics)
    assert "inf" not in report and "nan" not in report.lower()  # no fp16 overflow anywhere in the program


def test_opening_the_package_with_coremltools_leaves_its_bytes(tiny_fp16, tmp_path):
    """coremltools rewrites Manifest.json whenever it opens a package (validation opens it): the exported
    file must already be in the form it writes, or the first validation changes the shipped bytes."""
    import coremltools as ct

    from llmship.manifest import describe_files
    from llmship.validation.runners.mil_executor import load_program

    copy = shutil.copytree(tiny_fp16[0], tmp_path / "copy")
    before = describe_files(copy)
    ct.models.MLModel(str(copy / "model.mlpackage"), skip_model_load=True)
    load_program(copy / "model.mlpackage")
    assert describe_files(copy) == before == tiny_fp16[1]["files"]


def test_same_inputs_give_the_same_bytes(tmp_path):
    """coremltools names package items with random UUIDs and writes protobuf maps in any order; llmship's
    package is byte-reproducible from one run to the next (as app builds call it), so a build cache sees an
    unchanged model as unchanged."""
    import subprocess
    import sys

    def export(out):
        cmd = [sys.executable, "-m", "llmship", "export", "--model", "builtin:tiny", "--target", "coreml-int8", "--out", str(out)]
        assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
        return (out / "manifest.json").read_bytes()

    assert export(tmp_path / "a") == export(tmp_path / "b")  # the manifest lists every file's sha256
