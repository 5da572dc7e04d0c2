"""Separate mode on ONNX Runtime: one base graph plus one .onnx_adapter file per PEFT adapter (ONNX Runtime's own
adapter format, also what onnxruntime-genai's og.Adapters loads). Each adapter, run on the runtime from its shipped
file, is judged against the FP32 base with that adapter merged; the bare base against the base. The base weights are
stored once, each adapter file holds about its own tensors, and a fault planted in one adapter's file fails that
adapter's gates and no one else's."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llmship.adapters import load_source, merged
from llmship.config import BuildConfig, TargetProfile
from llmship.manifest import read_manifest, sha256_file
from llmship.models import build_decoder
from llmship.pipeline import export_artifact
from llmship.targets import get_profile
from llmship.validation.evaluate import greedy
from llmship.validation.runners.onnx import OnnxRunner
from llmship.validation.runners.reference import ReferenceRunner
from llmship.validation.stage import validate_artifact
from tests.helpers import ALL_PROJECTIONS, hf_from_loaded, peft_adapter

pytestmark = [pytest.mark.slow, pytest.mark.onnx, pytest.mark.filterwarnings("ignore::UserWarning")]
CONFIG = {"evaluation": {"tokens": 256, "latency_runs": 2}}
PROMPT = [1, 17, 42, 99, 5, 7, 300, 12]


def target(name: str) -> TargetProfile:
    return TargetProfile.model_validate({**get_profile(name).model_dump(), "max_context": 128, "prefill_lengths": (16,)})


def adapters_for(loaded, root, alpha: float = 8.0) -> dict[str, str]:
    """Two PEFT adapters: rank 4 on q/v (scale alpha / 4), rank 8 on every projection (scale 2 alpha / 8)."""
    base = hf_from_loaded(loaded)
    peft_adapter(base, root / "qv", r=4, alpha=alpha)
    peft_adapter(base, root / "all", r=8, targets=ALL_PROJECTIONS, alpha=2 * alpha, seed=1)
    return {"qv": str(root / "qv"), "all": str(root / "all")}


def config_for(model: str, listed: dict, **adapters) -> BuildConfig:
    return BuildConfig.model_validate({**CONFIG, "model": model, "adapters": {"mode": "separate", "list": listed, **adapters}})


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("separate")
    config = config_for("builtin:tiny", adapters_for(tiny, root))
    art = export_artifact(load_source("builtin:tiny", config.adapters), target("onnx-fp32"), root / "onnx-fp32", config=config)
    plain = export_artifact(tiny, target("onnx-fp32"), root / "plain", config=BuildConfig(model="builtin:tiny"))
    return config, art, plain


def test_two_adapters_and_the_bare_base_each_pass_at_fp32_parity(tiny_fp32):
    config, art, _ = tiny_fp32
    report = validate_artifact(art, config)  # references rebuilt from the manifest: the base, the base + each adapter
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]
    assert sorted(report["by_adapter"]) == ["all", "qv"]
    names = {g["name"] for g in report["gates"]}
    for name, result in report["by_adapter"].items():
        assert {f"adapter.{name}.kl_mean_max", f"adapter.{name}.greedy_match_min", f"adapter.{name}.integrity"} <= names
        assert result["parity"]["kl_mean"] < 1e-9 and result["parity"]["top1_agreement"] == 1.0
        assert result["parity"]["greedy_fraction"] == 1.0
    assert report["parity"]["kl_mean"] < 1e-9  # the bare base, through the same graph with its rank-0 defaults
    from llmship.validation.report import markdown

    page = markdown([report])
    assert "| onnx-fp32 + all | PASS |" in page and "| onnx-fp32 + qv | PASS |" in page and "separate adapters all" in page


def test_each_adapter_file_moves_the_model_to_its_own_reference(tiny_fp32, tiny):
    """The runner with an adapter's file active matches base + that adapter and is far from the other ones."""
    config, art, _ = tiny_fp32
    manifest = read_manifest(art)
    loaded = load_source("builtin:tiny", config.adapters)
    references = {None: build_decoder(tiny, 128), **{a.name: build_decoder(merged(tiny, a), 128) for a in loaded.lora}}
    expected = {}
    for name, decoder in references.items():
        ref = ReferenceRunner.from_decoder(decoder, threads=1)
        expected[name] = ref.prefill(PROMPT, 0)
    runner = OnnxRunner(art, manifest, threads=1)
    try:
        for name in (None, "qv", "all", None):  # and back to the bare base: switching leaves nothing behind
            runner.set_adapter(name)
            got = runner.prefill(PROMPT, 0)
            for other, logits in expected.items():
                err = np.abs(got - logits).max()
                assert (err < 1e-4) if other == name else (err > 1e-2), (name, other, err)
    finally:
        runner.close()


def test_the_base_is_stored_once_and_each_file_holds_its_adapter(tiny_fp32):
    config, art, plain = tiny_fp32
    manifest = read_manifest(art)
    files, plain_files = manifest["files"], read_manifest(plain)["files"]
    # the base graph with its LoRA branches is the plain export plus under a kB of nodes and names per adapted linear
    extra = files["model.onnx"]["bytes"] - plain_files["model.onnx"]["bytes"]
    branches = len({m for a in load_source("builtin:tiny", config.adapters).lora for m in a.lora})
    assert 0 < extra < 1024 * branches
    assert manifest["adapters"]["dtype"] == "fp32" and "add_active_adapter" in manifest["adapters"]["select"]
    for entry in manifest["adapters"]["list"]:  # fp32 A and B plus each tensor's name and shape
        stored, payload = files[entry["file"]]["bytes"], entry["params"] * 4
        assert payload <= stored <= payload + 128 * 2 * entry["modules"] + 256, (entry["name"], stored, payload)


def test_genai_runs_each_adapter_from_its_file(tiny_fp32, tiny):
    import onnxruntime_genai as og

    config, art, _ = tiny_fp32
    model = og.Model(str(art))
    adapters = og.Adapters(model)
    loaded = load_source("builtin:tiny", config.adapters)
    for adapter in loaded.lora:
        adapters.load(str(art / "adapters" / f"{adapter.name}.onnx_adapter"), adapter.name)
    for adapter in (None, *loaded.lora):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(PROMPT) + 12)
        generator = og.Generator(model, params)
        if adapter is not None:
            generator.set_active_adapter(adapters, adapter.name)
        generator.append_tokens(PROMPT)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        reference = build_decoder(tiny if adapter is None else merged(tiny, adapter), 128)
        assert tokens == greedy(ReferenceRunner.from_decoder(reference, threads=1), PROMPT, 12, 16), adapter


@pytest.fixture(scope="module")
def stories_int4(tmp_path_factory, stories):
    root = tmp_path_factory.mktemp("qlora")
    config = config_for(stories.source, adapters_for(stories, root, alpha=1.0))  # a fine-tune's size of change
    art = export_artifact(load_source(stories.source, config.adapters), target("onnx-int4"), root / "onnx-int4", config=config)
    return config, art


def test_an_int4_base_ships_fp16_adapters_that_convert_exactly(stories_int4):
    """QLoRA-style: the base on MatMulNBits, the adapters beside it in fp16 (adapters.dtype auto)."""
    config, art = stories_int4
    manifest = read_manifest(art)
    assert manifest["adapters"]["dtype"] == "fp16" and "MatMulNBits" in manifest["onnx"]["quantized_ops"]
    for entry in manifest["adapters"]["list"]:  # fp16 A and B plus each tensor's name and shape (~100 bytes)
        stored, payload = manifest["files"][entry["file"]]["bytes"], entry["params"] * 2
        assert payload <= stored <= payload + 128 * 2 * entry["modules"] + 256, (entry["name"], stored, payload)
    report = validate_artifact(art, config, loaded=load_source(config.model, config.adapters))
    for name, result in report["by_adapter"].items():
        conversion = {g["name"]: g for g in result["gates"] if g["name"].startswith("conversion")}
        assert conversion and all(g["passed"] for g in conversion.values()), (name, conversion)
        assert result["conversion"]["kl_mean"] < 5e-3


def test_a_fault_in_one_adapter_file_fails_that_adapter_only(stories_int4, tmp_path):
    """One adapter's B matrices doubled after export: with the manifest left alone its integrity
    gate fails; with the manifest re-hashed (as if the exporter itself had written it wrong) its conversion gate
    still fails. Nothing else changes verdict: the other adapter and the bare base pass either way."""
    import shutil

    import onnxruntime as ort

    config, built = stories_int4
    art = tmp_path / "art"
    shutil.copytree(built, art)
    loaded = load_source(config.model, config.adapters)

    def failed(report):
        return {g["name"] for g in report["gates"] if not g["passed"]}

    clean = failed(validate_artifact(art, config, loaded=loaded))
    assert not clean, clean
    file = art / "adapters" / "all.onnx_adapter"
    reader = ort.AdapterFormat.read_adapter(str(file))  # owns the tensors its values point into
    params = {k: v.numpy().copy() for k, v in reader.get_parameters().items()}
    for name in [n for n in params if n.endswith(".lora_B")]:  # the scale applied twice: 2 s B instead of s B
        params[name] = params[name] * np.float16(2.0)
    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(file))

    bad = failed(validate_artifact(art, config, loaded=loaded))
    assert {"adapter.all.integrity", "integrity"} <= bad
    assert {g for g in bad if not g.startswith("adapter.all.")} == {"integrity"}, bad

    manifest = json.loads((art / "manifest.json").read_text())
    rel = "adapters/all.onnx_adapter"
    manifest["files"][rel] = {**manifest["files"][rel], "sha256": sha256_file(file), "bytes": file.stat().st_size}
    (art / "manifest.json").write_text(json.dumps(manifest))
    bad = failed(validate_artifact(art, config, loaded=loaded))
    assert "adapter.all.conversion_floor_ratio_max" in bad and "adapter.all.integrity" not in bad
    assert not {g for g in bad if not g.startswith("adapter.all.")}, bad
