"""ONNX Runtime ships the compression record exactly: the graph's MatMulNBits / MatMulInteger / GatherBlockQuantized
initializers hold the record's codes, scales and zero points; conversion is at the level kernel rounding allows;
and a converter fault too small for the recipe's parity gates fails the conversion gate."""
from __future__ import annotations

import numpy as np
import pytest

from llmship.compress import rebuild_record
from llmship.config import BuildConfig, TargetProfile
from llmship.manifest import read_manifest
from llmship.pipeline import export_artifact
from llmship.targets import get_profile
from llmship.validation.stage import validate_artifact

pytestmark = pytest.mark.onnx
FAST = BuildConfig.model_validate({"evaluation": {"tokens": 256, "latency_runs": 2}})


def target(name: str, **changes) -> TargetProfile:
    return TargetProfile.model_validate({**get_profile(name).model_dump(), **changes})


def initializers(artifact) -> dict:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact / "model.onnx"))
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return values, {n.name: n for n in model.graph.node}


def unpack_nibbles(packed: np.ndarray, k: int) -> np.ndarray:
    flat = packed.reshape(packed.shape[0], -1)
    out = np.empty((flat.shape[0], flat.shape[1] * 2), dtype=np.int16)
    out[:, 0::2], out[:, 1::2] = flat & 0x0F, flat >> 4
    return out[:, :k]


@pytest.mark.parametrize("name, recipe", [
    ("onnx-int4", {}),                                                  # float zero points, integer + remainder
    ("onnx-int4", {"symmetric": True}),                                 # default zero point 8
    ("onnx-int8", {"group_size": None, "rules": [{"match": "embed", "weights": "int8", "group_size": 32}]}),  # MatMulInteger
])
def test_the_graph_holds_the_records_weights(tiny, tmp_path, name, recipe):
    base = get_profile(name)
    art = export_artifact(tiny, target(name, max_context=32, prefill_lengths=(8,),
                                       recipe={**base.recipe.model_dump(), **recipe}), tmp_path / "a")
    record = rebuild_record(tiny, read_manifest(art)["compression"], FAST.calibration, FAST.evaluation)
    values, nodes = initializers(art)
    for module, t in record.tensors.items():
        base_name = "lm_head" if module == "model.embed_tokens" else module  # a tied matrix is stored as the head's
        n, k = t.shape
        if t.grid.group_size is None:
            codes = values[f"{base_name}.MatMul.weight_quantized"].T
            np.testing.assert_array_equal(codes, t.codes.numpy())
            np.testing.assert_array_equal(values[f"{base_name}.MatMul.weight_scale"], t.scale.numpy().reshape(-1))
            continue
        packed = values[f"{base_name}.weight_Q{t.grid.bits}"]
        stored = unpack_nibbles(packed, k) if t.grid.bits == 4 else packed.reshape(n, -1)[:, :k].astype(np.int16)
        scales = values[f"{base_name}.weight_scales"].reshape(n, -1)
        np.testing.assert_array_equal(scales, t.scale.numpy())
        if t.grid.symmetric:
            np.testing.assert_array_equal(stored - 2 ** (t.grid.bits - 1), t.codes.numpy())
            continue
        np.testing.assert_array_equal(stored, t.codes.numpy())
        zp = values[f"{base_name}.weight_zero_points"]
        whole = unpack_nibbles(zp, scales.shape[1]) if t.grid.bits == 4 else zp.reshape(n, -1)
        if t.grid.zero_point == "float":  # z = integer part + remainder / scale (the correction's weights)
            remainder = values[f"{base_name}.weight_zero_points_remainder"].T
            np.testing.assert_allclose(whole + remainder / scales, t.zero.numpy(), rtol=0, atol=1e-4)
        else:
            np.testing.assert_array_equal(whole, t.zero.numpy())


@pytest.mark.shared
@pytest.mark.parametrize("name", ["onnx-int4", "onnx-int8"])
def test_conversion_stays_at_the_noise_floor_of_dynamic_activation_quantization(stories, tmp_path, name):
    art = export_artifact(stories, target(name, max_context=256, prefill_lengths=(32,)), tmp_path / name)
    report = validate_artifact(art, FAST, loaded=stories)
    conversion, parity = report["conversion"], report["parity"]
    assert conversion["floor_ratio"] < 1.5 and conversion["top1_agreement"] >= 0.98
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]
    if name == "onnx-int4":
        assert parity["kl_mean"] > 20 * conversion["kl_mean"]  # the recipe's error is the weights', not the converter's


@pytest.mark.shared
def test_a_planted_converter_fault_passes_parity_but_fails_conversion(stories, tmp_path, monkeypatch):
    """Eight rows of one matrix get their neighbours' block scales when written into the graph: small enough for
    the int4 recipe's parity gates, caught by the conversion gate."""
    from llmship.exporters import onnx_weights

    real = onnx_weights.nbits_arrays

    def shifted(t):
        packed, scales, zero = real(t)
        if t.name != "model.layers.3.self_attn.o_proj":
            return packed, scales, zero
        scales = scales.copy()
        scales[:8] = np.roll(scales[:8], 1, axis=1)
        return packed, scales, zero

    monkeypatch.setattr(onnx_weights, "nbits_arrays", shifted)
    art = export_artifact(stories, target("onnx-int4", max_context=256, prefill_lengths=(32,)), tmp_path / "faulty")
    report = validate_artifact(art, FAST, loaded=stories)
    failed = {g["name"] for g in report["gates"] if not g["passed"]}
    assert failed and all(n.startswith("conversion") for n in failed), failed


@pytest.mark.shared
def test_a_weight_only_variant_keeps_a_conversion_gate_it_can_pass(stories, tmp_path):
    """onnx-int4 with activations fp32 (weight-only MatMulNBits): no dynamic activations, yet the target's floor-ratio
    gate is measured (a floor is computed for it) and holds."""
    base = get_profile("onnx-int4")
    art = export_artifact(stories, target("onnx-int4", max_context=256, prefill_lengths=(32,),
                                          recipe={**base.recipe.model_dump(), "activations": "fp32"}), tmp_path / "wo")
    report = validate_artifact(art, FAST, loaded=stories)
    conversion = report["conversion"]
    assert conversion["noise_floor_kl_mean"] is not None and conversion["floor_ratio"] < 2.0, conversion
    assert conversion["kl_mean"] < 1e-6
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]
