"""Separate mode on LiteRT and ExecuTorch: one model file whose bare entry points run the base and whose
`<entry>_<name>` ones run it with a PEFT adapter (LiteRT signatures `prefill_<T>_<name>`, `decode_<name>`;
ExecuTorch methods `prefill_<name>`, `decode_<name>`, as its own multimethod LoRA export writes them). Every entry
point reads the same weight buffers (LiteRT's shared constants, XNNPACK's content-addressed named data), so the
base is stored once. Each adapter's entry points, run on the runtime from the shipped file, are judged against the
FP32 base with that adapter merged; the bare base against the base."""
from __future__ import annotations


import numpy as np
import pytest

from llmship.adapters import load_source, merged
from llmship.manifest import read_manifest
from llmship.models import build_decoder
from llmship.pipeline import export_artifact
from llmship.validation.runners import open_runner
from llmship.validation.runners.reference import ReferenceRunner
from llmship.validation.stage import validate_artifact
from tests.integration.test_adapter_separate_coreml import bare_config, plant_doubled_b
from tests.integration.test_adapter_separate_onnx import PROMPT, adapters_for, config_for, target

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def tflite_constant_bytes(path) -> int:
    """The bytes of a .tflite's constant buffers (the weights), apart from the subgraphs that read them."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAsModel(path.read_bytes(), 0)
    return sum(model.Buffers(i).DataLength() for i in range(model.BuffersLength()))


def pte_constant_bytes(path) -> int:
    from llmship.exporters.executorch import pte_weight_bytes

    return pte_weight_bytes(path.read_bytes())


RUNTIMES = {  # runtime: (fp32 target, quantized target, model file, where the manifest lists its entry points, weight bytes,
    # the model fixture: ExecuTorch lowers every method of every variant layer by layer, so it gets builtin:tiny's 2 layers)
    "litert": ("litert-fp32", "litert-int8", "model.tflite", ("litert", "signatures"), tflite_constant_bytes, "stories"),
    "executorch": ("executorch-fp32", "executorch-8da4w", "model.pte", ("executorch", "methods"), pte_constant_bytes, "tiny"),
}
ENTRIES = {"litert": ["prefill_16", "decode", "prefill_16_all", "decode_all", "prefill_16_qv", "decode_qv"],
           "executorch": ["prefill", "decode", "prefill_all", "decode_all", "prefill_qv", "decode_qv"]}
BOTH = [pytest.param("litert", marks=pytest.mark.litert), pytest.param("executorch", marks=pytest.mark.executorch)]


@pytest.fixture(scope="module", params=BOTH)
def fp32(request, tmp_path_factory):
    runtime = request.param
    name, base = RUNTIMES[runtime][0], request.getfixturevalue(RUNTIMES[runtime][5])
    root = tmp_path_factory.mktemp(f"{runtime}-separate")
    config = config_for(base.source, adapters_for(base, root, alpha=1.0))
    art = export_artifact(load_source(base.source, config.adapters), target(name), root / name, config=config)
    plain = export_artifact(base, target(name), root / "plain", config=bare_config(base.source))
    return runtime, config, art, plain


def test_two_adapters_and_the_bare_base_pass_at_fp32_parity(fp32, capsys):
    runtime, config, art, _ = fp32
    report = validate_artifact(art, config)  # references rebuilt from the manifest
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]
    assert sorted(report["by_adapter"]) == ["all", "qv"]
    for name, result in report["by_adapter"].items():
        assert result["parity"]["kl_mean"] < 1e-9 and result["parity"]["top1_agreement"] == 1.0, name
        assert result["parity"]["greedy_fraction"] == 1.0, name
    assert report["parity"]["kl_mean"] < 1e-9
    manifest = read_manifest(art)
    section, key = RUNTIMES[runtime][3]
    assert manifest[section][key] == ENTRIES[runtime]
    assert manifest["adapters"]["dtype"] == "fp32"
    from llmship import cli

    assert cli.main(["inspect", str(art)]) == 0
    assert f"select one: {'LiteRT signatures' if runtime == 'litert' else 'ExecuTorch methods'}" in capsys.readouterr().out


def test_each_adapters_entry_points_move_the_model_to_its_own_reference(fp32, request):
    runtime, config, art, _ = fp32
    base = request.getfixturevalue(RUNTIMES[runtime][5])
    loaded = load_source(base.source, config.adapters)
    expected = {None: ReferenceRunner.from_decoder(build_decoder(base, 128), threads=1).prefill(PROMPT, 0)}
    for a in loaded.lora:
        expected[a.name] = ReferenceRunner.from_decoder(build_decoder(merged(base, a), 128), threads=1).prefill(PROMPT, 0)
    runner = open_runner(art, read_manifest(art), threads=1)
    try:
        for name in (None, "qv", "all", None):  # and back: switching leaves nothing behind
            runner.set_adapter(name)
            got = runner.prefill(PROMPT, 0)
            errors = {other: float(np.abs(got - logits).max()) for other, logits in expected.items()}
            assert errors[name] < 1e-4 and all(e > 0.2 for o, e in errors.items() if o != name), (name, errors)
    finally:
        runner.close()


def test_the_base_weights_are_stored_once(fp32):
    """The weight bytes grow by exactly the adapters' fp32 tensors; each entry point adds its own program."""
    runtime, _, art, plain = fp32
    file, weight_bytes = RUNTIMES[runtime][2], RUNTIMES[runtime][4]
    manifest = read_manifest(art)
    payload = sum(e["bytes"] for e in manifest["adapters"]["list"])
    assert payload == sum(4 * e["params"] for e in manifest["adapters"]["list"])
    grown = weight_bytes(art / file) - weight_bytes(plain / file)
    assert payload <= grown <= 1.01 * payload, (grown, payload)


def test_a_fault_in_one_adapters_weights_fails_that_adapter(fp32, tmp_path):
    """One adapter's B matrices doubled inside the model file after export: integrity fails (every entry point shares
    the file); with the manifest re-hashed that adapter's parity and conversion gates fail, and the rest pass."""
    runtime, config, built, _ = fp32
    before, after = plant_doubled_b(built, tmp_path / "art", config, RUNTIMES[runtime][2], "fp32")
    assert {"integrity", "adapter.all.integrity", "adapter.qv.integrity"} <= before, before
    assert {"adapter.all.kl_mean_max", "adapter.all.conversion_kl_mean_max"} <= after, after
    assert not {g for g in after if not g.startswith("adapter.all.")}, after


@pytest.mark.parametrize("runtime", BOTH)
def test_a_quantized_base_carries_fp16_adapters_that_convert_within_the_floor(runtime, request, tmp_path):
    """QLoRA-style: the base on the runtime's quantized kernels (LiteRT int8 dynamic range, ExecuTorch 8da4w), each
    adapter's branches rounded to fp16 (LiteRT stores them fp16; XNNPACK's fp32 linears hold the fp16 values)."""
    base = request.getfixturevalue(RUNTIMES[runtime][5])
    config = config_for(base.source, adapters_for(base, tmp_path, alpha=1.0))
    name = RUNTIMES[runtime][1]
    art = export_artifact(load_source(base.source, config.adapters), target(name), tmp_path / name, config=config)
    assert read_manifest(art)["adapters"]["dtype"] == "fp16"
    report = validate_artifact(art, config, loaded=load_source(config.model, config.adapters))
    for adapter, result in report["by_adapter"].items():
        conversion = {g["name"]: g for g in result["gates"] if g["name"].startswith("conversion")}
        assert conversion and all(g["passed"] for g in conversion.values()), (adapter, conversion)
        assert result["conversion"]["kl_mean"] < 5e-3, (adapter, result["conversion"]["kl_mean"])
