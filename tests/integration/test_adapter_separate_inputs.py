"""Separate mode on Core ML, LiteRT and ExecuTorch: the base's own entry points, plus one `_lora` pair (Core ML
functions `prefill_lora`/`decode_lora`, LiteRT signatures `prefill_<T>_lora`/`decode_lora`, ExecuTorch methods
`prefill_lora`/`decode_lora`) that take an adapter's tensors as inputs, as LiteRT-LM runs LoRA; each PEFT adapter
ships as one small safetensors file. Each adapter, run on the runtime from its shipped file, is judged against the
FP32 base with that adapter merged; the bare base against the base. Apple's runtime exists only on Apple platforms:
on Linux the Core ML package runs on llmship's MIL reference executor."""
from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from llmship.adapters import load_source, merged
from llmship.adapters.branch import stored_pair
from llmship.config import BuildConfig
from llmship.manifest import read_manifest, sha256_file
from llmship.models import build_decoder
from llmship.pipeline import export_artifact
from llmship.validation.runners import open_runner
from llmship.validation.runners.reference import ReferenceRunner
from llmship.validation.stage import validate_artifact
from tests.helpers import runtime_marks
from tests.integration.test_adapter_separate_onnx import CONFIG, PROMPT, adapters_for, config_for, target

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def tflite_constant_bytes(art) -> int:
    """The bytes of a .tflite's constant buffers (the weights), apart from the subgraphs that read them."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAsModel((art / "model.tflite").read_bytes(), 0)
    return sum(model.Buffers(i).DataLength() for i in range(model.BuffersLength()))


def pte_constant_bytes(art) -> int:
    from llmship.exporters.executorch import pte_weight_bytes

    return pte_weight_bytes((art / "model.pte").read_bytes())


def coreml_weight_bytes(art) -> int:
    return (art / "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin").stat().st_size


RUNTIMES = {  # runtime: float target, quantized target, where the manifest lists its entry points, weight bytes, the
    # model fixture (ExecuTorch lowers every method layer by layer, so it gets builtin:tiny's 2 layers), the largest
    # difference from its own reference a prompt's logits may have (Core ML's fp16 program: 0.05)
    "coreml": ("coreml-fp16", "coreml-int4", ("coreml", "functions"), coreml_weight_bytes, "stories", 0.05),
    "litert": ("litert-fp32", "litert-int8", ("litert", "signatures"), tflite_constant_bytes, "stories", 1e-4),
    "executorch": ("executorch-fp32", "executorch-8da4w", ("executorch", "methods"), pte_constant_bytes, "tiny", 1e-4),
}
ENTRIES = {"coreml": ["prefill", "decode", "prefill_lora", "decode_lora"],
           "litert": ["prefill_16", "decode", "prefill_16_lora", "decode_lora"],
           "executorch": ["prefill", "decode", "prefill_lora", "decode_lora"]}
SELECT = {"coreml": "Core ML multifunction", "litert": "LiteRT signatures", "executorch": "ExecuTorch methods"}
# make test runs LiteRT's (the quickest to export); Core ML's and ExecuTorch's are make test-full's
ALL = [pytest.param(r, marks=runtime_marks(r, full=r != "litert")) for r in RUNTIMES]


def bare_config(model: str) -> BuildConfig:
    return BuildConfig.model_validate({**CONFIG, "model": model})


@pytest.fixture(scope="module", params=ALL)
def built(request, tmp_path_factory):
    """(runtime, config, the artifact with two adapters, the same target without any) on the float target."""
    runtime = request.param
    name, base = RUNTIMES[runtime][0], request.getfixturevalue(RUNTIMES[runtime][4])
    root = tmp_path_factory.mktemp(f"{runtime}-separate")
    config = config_for(base.source, adapters_for(base, root, alpha=1.0))
    art = export_artifact(load_source(base.source, config.adapters), target(name), root / name, config=config)
    plain = export_artifact(base, target(name), root / "plain", config=bare_config(base.source))
    return runtime, config, art, plain


def test_two_adapters_and_the_bare_base_pass_at_the_targets_parity(built, capsys):
    runtime, config, art, plain = built
    report = validate_artifact(art, config)  # references rebuilt from the manifest
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]
    assert sorted(report["by_adapter"]) == ["all", "qv"]
    bare = validate_artifact(plain, bare_config(config.model))
    flips = 1 if RUNTIMES[runtime][0].endswith("fp16") else 0  # an fp16 program: a near-tie may flip once in 256
    for name, result in report["by_adapter"].items():  # the same parity as the target without adapters
        assert result["parity"]["greedy_fraction"] == 1.0, name
        assert result["parity"]["top1_agreement"] >= 1.0 - flips / config.evaluation.tokens, (name, result["parity"])
        assert result["parity"]["kl_mean"] < 3 * bare["parity"]["kl_mean"] + 1e-9, (name, result["parity"]["kl_mean"])
    assert report["parity"]["kl_mean"] == pytest.approx(bare["parity"]["kl_mean"], rel=1e-6)  # the bare entry points
    manifest = read_manifest(art)
    section, key = RUNTIMES[runtime][2]
    assert manifest[section][key] == ENTRIES[runtime]
    assert manifest["adapters"]["dtype"] == ("fp16" if runtime == "coreml" else "fp32")
    assert [e["file"] for e in manifest["adapters"]["list"]] == ["adapters/all.safetensors", "adapters/qv.safetensors"]
    from llmship import cli

    assert cli.main(["inspect", str(art)]) == 0
    out = capsys.readouterr().out
    assert f"select one: {SELECT[runtime]}" in out and "ships in adapters/qv.safetensors" in out


def test_each_adapters_file_moves_the_model_to_its_own_reference(built, request):
    runtime, config, art, _ = built
    base = request.getfixturevalue(RUNTIMES[runtime][4])
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
            assert errors[name] < RUNTIMES[runtime][5] and all(e > 0.2 for o, e in errors.items() if o != name), (name, errors)
    finally:
        runner.close()


def test_the_base_is_stored_once_and_an_adapter_costs_its_file(built):
    """The model's weights do not grow with adapters (the `_lora` entry points read the base's); each adapter file is
    its tensors in adapters.dtype plus the safetensors header naming them."""
    runtime, _, art, plain = built
    weight_bytes = RUNTIMES[runtime][3]
    assert weight_bytes(art) <= 1.001 * weight_bytes(plain), (weight_bytes(art), weight_bytes(plain))
    manifest = read_manifest(art)
    itemsize = 2 if manifest["adapters"]["dtype"] == "fp16" else 4
    for entry in manifest["adapters"]["list"]:
        blob = (art / entry["file"]).read_bytes()
        header = struct.unpack("<Q", blob[:8])[0]
        assert len(blob) - 8 - header == itemsize * entry["params"], entry["name"]
        assert manifest["files"][entry["file"]]["bytes"] == len(blob)


def test_a_fault_in_one_adapters_file_fails_that_adapter(built, tmp_path):
    """One adapter's B matrices doubled in its file after export: its integrity fails (and the artifact's); with the
    manifest re-hashed (as if the exporter had written it wrong) its parity and conversion gates fail, and the other
    adapter and the bare base pass."""
    runtime, config, art, _ = built
    before, after = plant_doubled_b(art, tmp_path / "art", config, "adapters/all.safetensors")
    assert {g for g in before if not g.startswith("adapter.all.")} == {"integrity"}, before
    assert "adapter.all.integrity" in before
    assert "adapter.all.conversion_kl_mean_max" in after, after
    assert {g for g in after if g.startswith("adapter.all.") and "conversion" not in g}, after  # and a parity gate
    assert not {g for g in after if not g.startswith("adapter.all.")}, after


def plant_doubled_b(built, art, config, file: str) -> tuple[set, set]:
    """A copy of artifact `built` at `art` with adapter "all"'s s B doubled inside `file`: the gates that fail as
    shipped, then with the manifest re-hashed over the changed file (as if the exporter had written it wrong)."""
    shutil.copytree(built, art)
    loaded = load_source(config.model, config.adapters)
    dtype = read_manifest(art)["adapters"]["dtype"]
    blob = bytearray((art / file).read_bytes())
    for a, b, scale in next(a for a in loaded.lora if a.name == "all").lora.values():
        stored = stored_pair(a, b, scale, dtype)[1].numpy()
        assert blob.count(stored.tobytes()) == 1
        at = blob.index(stored.tobytes())
        blob[at:at + stored.nbytes] = (stored * stored.dtype.type(2.0)).tobytes()
    (art / file).write_bytes(bytes(blob))

    def failed():
        return {g["name"] for g in validate_artifact(art, config, loaded=loaded)["gates"] if not g["passed"]}

    before = failed()
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"][file] = {**manifest["files"][file], "sha256": sha256_file(art / file), "bytes": (art / file).stat().st_size}
    (art / "manifest.json").write_text(json.dumps(manifest))
    return before, failed()


@pytest.mark.parametrize("runtime", ALL)
def test_a_quantized_base_carries_fp16_adapters_that_convert_within_the_floor(runtime, request, tmp_path):
    """QLoRA-style: the base on the runtime's quantized kernels (Core ML uint4 blocks, LiteRT int8 dynamic range,
    ExecuTorch 8da4w), each adapter fp16 in its file; the `_lora` entry points read the same quantized weights."""
    base = request.getfixturevalue(RUNTIMES[runtime][4])
    config = config_for(base.source, adapters_for(base, tmp_path, alpha=1.0))
    name = RUNTIMES[runtime][1]
    art = export_artifact(load_source(base.source, config.adapters), target(name), tmp_path / name, config=config)
    assert read_manifest(art)["adapters"]["dtype"] == "fp16"
    report = validate_artifact(art, config, loaded=load_source(config.model, config.adapters))
    for adapter, result in report["by_adapter"].items():
        conversion = {g["name"]: g for g in result["gates"] if g["name"].startswith("conversion")}
        assert conversion and all(g["passed"] for g in conversion.values()), (adapter, conversion)
        assert result["conversion"]["kl_mean"] < 5e-3, (adapter, result["conversion"]["kl_mean"])
