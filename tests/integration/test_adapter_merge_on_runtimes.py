"""Merge mode on every runtime: a PEFT adapter folded into builtin:tiny before export; each artifact runs on its own
runtime at its fp32/fp16 gates against the merged FP32 reference, which `llmship validate` rebuilds from the manifest
(base + the recorded adapter); the shipped file holds the adapter (it is far from the bare base); an adapter changed
after export is refused at validation; the build hash covers the adapter."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmship.adapters import load_source
from llmship.config import Adapters, BuildConfig, TargetProfile
from llmship.errors import ManifestError
from llmship.manifest import read_manifest
from llmship.models import build_decoder
from llmship.pipeline import export_artifact
from llmship.targets import get_profile
from llmship.validation.stage import validate_artifact
from tests.helpers import ALL_PROJECTIONS, hf_from_loaded, peft_adapter, target_params

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
CONFIG = {"evaluation": {"tokens": 256, "latency_runs": 2}}
IDS = [1, 17, 42, 99, 5, 7, 300, 12, 64, 65, 66, 3]


def target(name: str) -> TargetProfile:
    return TargetProfile.model_validate({**get_profile(name).model_dump(), "max_context": 128, "prefill_lengths": (16,)})


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("adapter") / "all-r8"
    peft_adapter(hf_from_loaded(tiny), path, r=8, targets=ALL_PROJECTIONS, alpha=16.0)
    return path


def build_config(adapter) -> BuildConfig:
    return BuildConfig.model_validate({**CONFIG, "model": "builtin:tiny", "adapters": {"list": {"all-r8": str(adapter)}}})


def prefill_logits(runner_or_decoder, ids) -> torch.Tensor:
    if hasattr(runner_or_decoder, "reset_cache"):
        runner_or_decoder.reset_cache()
        with torch.no_grad():
            return runner_or_decoder.prefill(torch.tensor([ids]), 0)
    return torch.as_tensor(runner_or_decoder.prefill(ids, 0))


# merging happens before any exporter: make test runs one runtime
@pytest.mark.parametrize("name", target_params(("onnx-fp32", "executorch-fp32", "litert-fp32", "coreml-fp16"), keep=("onnx-fp32",)))
def test_merged_adapter_ships_on_every_runtime(name, adapter, tiny, tmp_path):
    from llmship.validation.runners import open_runner

    config = build_config(adapter)
    merged = load_source("builtin:tiny", config.adapters)
    art = export_artifact(merged, target(name), tmp_path / name, config=config)
    manifest = read_manifest(art)
    assert manifest["source"] == "builtin:tiny" and manifest["adapters"]["list"][0]["sha256"] == merged.adapters["list"][0]["sha256"]

    report = validate_artifact(art, config)  # no model given: the reference is rebuilt from the manifest
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]
    assert report["adapters"]["list"][0]["name"] == "all-r8"

    runner = open_runner(art, manifest, 1)
    try:
        shipped = prefill_logits(runner, IDS)[: len(IDS)]
    finally:
        runner.close()
    with_adapter = prefill_logits(build_decoder(merged, 128), IDS)
    bare = prefill_logits(build_decoder(tiny, 128), IDS)
    # the file holds the adapter: close to base + adapter, far from the bare base
    assert (shipped - with_adapter).abs().max() < 0.1 * (shipped - bare).abs().max()


@pytest.mark.onnx
def test_an_adapter_changed_after_export_is_refused(adapter, tmp_path):
    import shutil

    own = tmp_path / "own-adapter"
    shutil.copytree(adapter, own)
    config = BuildConfig.model_validate({**CONFIG, "adapters": {"list": {"own": str(own)}}})
    art = export_artifact(load_source("builtin:tiny", config.adapters), target("onnx-fp32"), tmp_path / "onnx", config=config)
    tensors = load_file(str(own / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 1.01  # the planted fault: one LoRA matrix scaled by 1%
    save_file(tensors, str(own / "adapter_model.safetensors"))
    with pytest.raises(ManifestError, match="own: .* changed since the artifact was exported"):
        validate_artifact(art, config)
    shutil.rmtree(own)
    with pytest.raises(Exception, match="recorded in the manifest.* is missing"):
        validate_artifact(art, config)


def test_the_build_hash_covers_the_adapter(adapter, tmp_path):
    import shutil

    from llmship.build import inputs_sha256, source_digest

    own = tmp_path / "own"
    shutil.copytree(adapter, own)
    t = target("pytorch-fp32")
    without = inputs_sha256(BuildConfig(model="builtin:tiny"), t, source_digest("builtin:tiny"))
    config = BuildConfig(model="builtin:tiny", adapters=Adapters(list={"own": str(own)}))
    before = inputs_sha256(config, t, source_digest("builtin:tiny"))
    tensors = load_file(str(own / "adapter_model.safetensors"))
    save_file({k: v * 1.01 for k, v in tensors.items()}, str(own / "adapter_model.safetensors"))
    after = inputs_sha256(config, t, source_digest("builtin:tiny"))
    assert len({without, before, after}) == 3
