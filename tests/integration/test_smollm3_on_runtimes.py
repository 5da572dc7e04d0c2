"""SmolLM3's NoPE layers (no RoPE in every second layer here) on every runtime: a random-weight SmolLM3 saved in
Hugging Face layout, loaded from disk, exported to each runtime's fp32/fp16 target and validated on that runtime
against the canonical model, which matches transformers' SmolLM3 (tests/unit/test_decoder_parity.py)."""
from __future__ import annotations

import pytest

from llmship.config import BuildConfig, TargetProfile
from llmship.models import load_model
from llmship.pipeline import export_artifact
from llmship.targets import get_profile
from llmship.validation.stage import validate_artifact
from tests.helpers import hf_model

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def smollm3(tmp_path_factory):
    from llmship.models.builtin import byte_tokenizer

    hf = hf_model("smollm3-nope")
    path = tmp_path_factory.mktemp("smollm3")
    hf.save_pretrained(str(path), safe_serialization=True)
    byte_tokenizer(hf.config.vocab_size).save(str(path / "tokenizer.json"))
    loaded = load_model(str(path))
    assert loaded.spec.model_type == "smollm3" and loaded.spec.rope_layers == (True, False, True)
    return loaded


@pytest.mark.parametrize("name", [
    pytest.param("executorch-fp32", marks=pytest.mark.executorch),
    pytest.param("onnx-fp32", marks=pytest.mark.onnx),
    pytest.param("litert-fp32", marks=pytest.mark.litert),
    pytest.param("coreml-fp16", marks=pytest.mark.coreml),
])
def test_smollm3_passes_at_fp32_level_parity_on_every_runtime(name, smollm3, tmp_path):
    config = BuildConfig.model_validate({"model": smollm3.source, "evaluation": {"tokens": 128, "latency_runs": 2}})
    target = TargetProfile.model_validate({**get_profile(name).model_dump(), "max_context": 128, "prefill_lengths": (16,)})
    report = validate_artifact(export_artifact(smollm3, target, tmp_path / name, config=config), config, loaded=smollm3)
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]
    p = report["parity"]
    assert p["top1_agreement"] == 1.0 and p["greedy_match"] == p["greedy_total"] > 0, p
