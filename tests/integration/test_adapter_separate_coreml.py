"""Separate mode on Core ML: one multifunction ML program, `prefill`/`decode` for the bare base and
`prefill_<name>`/`decode_<name>` per PEFT adapter, the base weights stored once for all of them (coremltools'
save_multifunction shares identical consts). Each adapter's functions, run from the shipped package, are judged
against the FP32 base with that adapter merged; the bare base against the base. Apple's runtime exists only on
Apple platforms: on Linux the package runs on llmship's MIL reference executor."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llmship.adapters import load_source, merged
from llmship.adapters.branch import stored_pair
from llmship.config import BuildConfig
from llmship.manifest import read_manifest, sha256_file
from llmship.models import build_decoder
from llmship.pipeline import export_artifact
from llmship.validation.runners.coreml import MilReferenceRunner
from llmship.validation.runners.reference import ReferenceRunner
from llmship.validation.stage import validate_artifact
from tests.integration.test_adapter_separate_onnx import CONFIG, PROMPT, adapters_for, config_for, target

pytestmark = [pytest.mark.slow, pytest.mark.coreml, pytest.mark.filterwarnings("ignore::UserWarning")]
WEIGHTS = "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"


def bare_config(model: str) -> BuildConfig:
    return BuildConfig.model_validate({**CONFIG, "model": model})


@pytest.fixture(scope="module")
def stories_fp16(tmp_path_factory, stories):
    root = tmp_path_factory.mktemp("coreml-separate")
    config = config_for(stories.source, adapters_for(stories, root, alpha=1.0))
    art = export_artifact(load_source(stories.source, config.adapters), target("coreml-fp16"), root / "coreml-fp16", config=config)
    plain = export_artifact(stories, target("coreml-fp16"), root / "plain", config=bare_config(stories.source))
    return config, art, plain


def test_two_adapters_and_the_bare_base_pass_at_the_targets_parity(stories_fp16, capsys):
    config, art, plain = stories_fp16
    report = validate_artifact(art, config)  # references rebuilt from the manifest
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]
    assert sorted(report["by_adapter"]) == ["all", "qv"]
    bare = validate_artifact(plain, bare_config(config.model))
    for name, result in report["by_adapter"].items():  # fp16 compute: the same parity as the target without adapters
        assert result["parity"]["top1_agreement"] == 1.0 and result["parity"]["greedy_fraction"] == 1.0, name
        assert result["parity"]["kl_mean"] < 3 * bare["parity"]["kl_mean"] + 1e-6, (name, result["parity"]["kl_mean"])
        assert result["conversion"]["kl_mean"] < 1e-5, name
    assert report["parity"]["kl_mean"] == pytest.approx(bare["parity"]["kl_mean"], rel=1e-6)  # the base functions are the plain ones
    manifest = read_manifest(art)
    assert manifest["coreml"]["functions"] == ["prefill", "decode", "prefill_all", "decode_all", "prefill_qv", "decode_qv"]
    assert "functionName" in manifest["adapters"]["select"] and manifest["adapters"]["dtype"] == "fp16"
    from llmship import cli

    assert cli.main(["inspect", str(art)]) == 0
    out = capsys.readouterr().out
    assert "functions prefill_qv, decode_qv" in out and "functions prefill_all, decode_all" in out


def test_each_adapters_functions_move_the_model_to_its_own_reference(stories_fp16, stories):
    config, art, _ = stories_fp16
    loaded = load_source(stories.source, config.adapters)
    expected = {None: ReferenceRunner.from_decoder(build_decoder(stories, 128), threads=1).prefill(PROMPT, 0)}
    for a in loaded.lora:
        expected[a.name] = ReferenceRunner.from_decoder(build_decoder(merged(stories, a), 128), threads=1).prefill(PROMPT, 0)
    runner = MilReferenceRunner(art, read_manifest(art), threads=1)
    for name in (None, "qv", "all", None):  # and back: switching leaves nothing behind
        runner.set_adapter(name)
        got = runner.prefill(PROMPT, 0)
        errors = {other: float(np.abs(got - logits).max()) for other, logits in expected.items()}
        assert errors[name] < 0.05 and all(e > 0.2 for o, e in errors.items() if o != name), (name, errors)


def test_the_base_weights_are_stored_once(stories_fp16):
    """The package's weights grow by about the adapters' fp16 tensors (each blob has a small header and alignment);
    every function carries its own program text besides."""
    _, art, plain = stories_fp16
    manifest, base = read_manifest(art), read_manifest(plain)
    payload = sum(e["bytes"] for e in manifest["adapters"]["list"])
    assert payload == sum(2 * e["params"] for e in manifest["adapters"]["list"])
    grown = manifest["files"][WEIGHTS]["bytes"] - base["files"][WEIGHTS]["bytes"]
    assert payload <= grown <= 1.2 * payload, (grown, payload)


def test_a_fault_in_one_adapters_weights_fails_that_adapter(stories_fp16, tmp_path):
    """One adapter's B matrices doubled inside weight.bin after export: the package no longer matches the manifest
    (integrity fails for every function, as they share the file); with the manifest re-hashed (as if the exporter had
    written it wrong) that adapter's parity and conversion gates fail, and the other adapter and the base pass."""
    config, built, _ = stories_fp16
    before, after = plant_doubled_b(built, tmp_path / "art", config, WEIGHTS, "fp16")
    assert {"integrity", "adapter.all.integrity", "adapter.qv.integrity"} <= before, before
    assert {"adapter.all.greedy_match_min", "adapter.all.conversion_kl_mean_max"} <= after, after
    assert not {g for g in after if not g.startswith("adapter.all.")}, after


def plant_doubled_b(built, art, config, file: str, dtype: str) -> tuple[set, set]:
    """A copy of artifact `built` at `art` with adapter "all"'s s B doubled inside `file`: the gates that fail as
    shipped, then with the manifest re-hashed over the changed file (as if the exporter had written it wrong)."""
    shutil.copytree(built, art)
    loaded = load_source(config.model, config.adapters)
    double_b_in_place(art / file, next(a for a in loaded.lora if a.name == "all"), dtype)

    def failed():
        return {g["name"] for g in validate_artifact(art, config, loaded=loaded)["gates"] if not g["passed"]}

    before = failed()
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"][file] = {**manifest["files"][file], "sha256": sha256_file(art / file), "bytes": (art / file).stat().st_size}
    (art / "manifest.json").write_text(json.dumps(manifest))
    return before, failed()


def double_b_in_place(file, adapter, dtype: str) -> None:
    """Double every stored s B of `adapter` where `file` holds it (found by content, in either layout): the scale
    applied twice, a fault only the values show."""
    blob = bytearray(file.read_bytes())
    for a, b, scale in adapter.lora.values():
        b_t = stored_pair(a, b, scale, dtype)[1].numpy()
        stored = next(layout for layout in (b_t, np.ascontiguousarray(b_t.T)) if blob.count(layout.tobytes()) == 1)
        at = blob.index(stored.tobytes())
        blob[at:at + stored.nbytes] = (stored * stored.dtype.type(2.0)).tobytes()
    file.write_bytes(bytes(blob))


def test_an_int4_base_carries_fp16_adapters_that_convert_exactly(stories, tmp_path):
    """QLoRA-style: the base on Core ML's uint4 blocks, each adapter's functions read the same blocks."""
    config = config_for(stories.source, adapters_for(stories, tmp_path, alpha=1.0))
    art = export_artifact(load_source(stories.source, config.adapters), target("coreml-int4"), tmp_path / "coreml-int4", config=config)
    report = validate_artifact(art, config, loaded=load_source(config.model, config.adapters))
    for name, result in report["by_adapter"].items():
        conversion = {g["name"]: g for g in result["gates"] if g["name"].startswith("conversion")}
        assert conversion and all(g["passed"] for g in conversion.values()), (name, conversion)
        assert result["conversion"]["kl_mean"] < 1e-4, (name, result["conversion"]["kl_mean"])
