"""Core ML ships the compression record exactly: the package's decompression ops hold the record's codes, scales,
offsets and palettes; validation's conversion check (against the compressed reference) is at fp16-rounding
level; and a converter fault too small for a recipe's parity gate fails the conversion gate."""
from __future__ import annotations

import numpy as np
import pytest

from llmship.compress import rebuild_record
from llmship.config import BuildConfig, TargetProfile
from llmship.manifest import read_manifest
from llmship.pipeline import export_artifact
from llmship.targets import get_profile
from llmship.validation.runners.mil_executor import load_program
from llmship.validation.stage import validate_artifact

pytest.importorskip("coremltools")
pytestmark = pytest.mark.coreml

FAST = BuildConfig.model_validate({"evaluation": {"tokens": 96, "latency_runs": 2}})


def target(name: str, **changes) -> TargetProfile:
    return TargetProfile.model_validate({**get_profile(name).model_dump(), **changes})


def record_of(loaded, artifact):
    manifest = read_manifest(artifact)
    return rebuild_record(loaded, manifest["compression"], FAST.calibration, FAST.evaluation)


def decompressed(artifact) -> dict:
    """Each decompression op of the decode function, decoded by coremltools' own op definition, by the module
    it replaces (the const names carry the PyTorch parameter's name)."""
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale, constexpr_lut_to_dense

    from llmship.exporters.coreml_weights import const_module

    out = {}
    for op in load_program(artifact / "model.mlpackage").functions["decode"].operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            offset = None if op.offset is None else op.offset.val.astype(np.float32)
            w = constexpr_blockwise_shift_scale.decompress(op.data.val, op.scale.val.astype(np.float32), offset)
            out[const_module(op.name.rsplit("_q", 1)[0], True)] = (op, w)
        elif op.op_type == "constexpr_lut_to_dense":
            w = constexpr_lut_to_dense.decompress(op.indices.val, op.lut.val.astype(np.float32), None)
            out[const_module(op.name.removesuffix("_palettized"), True)] = (op, w)
    return out


@pytest.mark.parametrize("name", ["coreml-int4", pytest.param("coreml-int8", marks=pytest.mark.full),
                                  pytest.param("coreml-pal4", marks=pytest.mark.full)])  # pal4: the palette fault test
def test_the_package_holds_the_records_weights(tiny, tmp_path, name):
    art = export_artifact(tiny, target(name, max_context=32, prefill_lengths=(8,)), tmp_path / name)
    record = record_of(tiny, art)
    found = decompressed(art)
    assert {n.replace(".", "_") for n in record.tensors} == set(found)
    for module, t in record.tensors.items():
        op, w = found[module.replace(".", "_")]
        # decoded in fp32 by the op's definition, then held in fp16 like every value of an fp16 program
        np.testing.assert_array_equal(w.astype(np.float16), t.dequantize().numpy().astype(np.float16))
        if not t.grid.palette:  # the stored operands themselves are the record's
            np.testing.assert_array_equal(op.data.val.astype(np.int16), t.codes.numpy())
            np.testing.assert_array_equal(op.scale.val.astype(np.float32), t.scale.numpy())


@pytest.mark.shared
@pytest.mark.parametrize("name", ["coreml-int4", pytest.param("coreml-int8", marks=pytest.mark.full),
                                  pytest.param("coreml-pal4", marks=pytest.mark.full)])
def test_conversion_is_at_fp16_rounding_level_while_parity_carries_the_recipe(stories, tmp_path, name):
    art = export_artifact(stories, target(name, max_context=128, prefill_lengths=(32,)), tmp_path / name)
    report = validate_artifact(art, FAST, loaded=stories)
    conversion, parity = report["conversion"], report["parity"]
    assert conversion["kl_mean"] < 1e-4 and conversion["top1_agreement"] >= 0.98
    assert parity["kl_mean"] > 20 * conversion["kl_mean"]
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]


@pytest.mark.shared
def test_a_planted_converter_fault_passes_parity_but_fails_conversion(stories, tmp_path, monkeypatch):
    """Some of one matrix's block scales shifted by one block, as a converter bug would: small enough that the int4
    recipe's parity gates pass, caught by the conversion gate."""
    from llmship.exporters import coreml_weights

    real = coreml_weights.blockwise_arrays

    def shifted(t, dtype):
        data, scale, offset = real(t, dtype)
        if t.name == "model.layers.3.self_attn.o_proj":  # eight output channels' block scales one block off
            scale = scale.copy()
            scale[:8] = np.roll(scale[:8], 1, axis=1)
        return data, scale, offset

    monkeypatch.setattr(coreml_weights, "blockwise_arrays", shifted)
    art = export_artifact(stories, target("coreml-int4", max_context=128, prefill_lengths=(32,)), tmp_path / "faulty")
    report = validate_artifact(art, FAST, loaded=stories)
    failed = {g["name"] for g in report["gates"] if not g["passed"]}
    parity_gates = {g["name"] for g in report["gates"] if not g["name"].startswith(("conversion", "integrity", "regression"))}
    assert failed and failed <= {g for g in failed if g.startswith("conversion")}, failed
    assert parity_gates and not (failed & parity_gates)


@pytest.mark.shared
@pytest.mark.parametrize("tables", [4, pytest.param(None, marks=pytest.mark.full)])
def test_a_planted_palette_fault_fails_the_gate_that_guards_it(stories, tmp_path, monkeypatch, tables):
    """Two neighbouring entries of a table swapped, as a converter bug in the palette path would. In the first
    four tables (64 channels of one matrix): inside pal4's parity gates, caught by the conversion gate (stories260K,
    96 tokens: parity KL 0.104 -> 0.114, conversion 8.4e-6 -> 2.7e-3). In every table: a recipe as bad as SmolLM2's
    pal4 (KL 0.41), which the parity gates fail too."""
    from llmship.exporters import coreml_weights

    real, calls = coreml_weights.table_lut, []

    def swapped(group, bits=4):
        table, indices = real(group, bits)
        calls.append(1)
        if tables is None or len(calls) <= tables:
            table = table.copy()
            table[[7, 8]] = table[[8, 7]]
        return table, indices

    monkeypatch.setattr(coreml_weights, "table_lut", swapped)
    art = export_artifact(stories, target("coreml-pal4", max_context=128, prefill_lengths=(32,)), tmp_path / "faulty")
    report = validate_artifact(art, FAST, loaded=stories)
    failed = {g["name"] for g in report["gates"] if not g["passed"]}
    assert "conversion_kl_mean_max" in failed, failed
    parity_failed = failed & {"top1_agreement_min", "kl_mean_max", "ppl_ratio_max"}
    assert parity_failed == (set() if tables else {"top1_agreement_min", "kl_mean_max", "ppl_ratio_max"}), failed


def test_a_palette_group_of_a_large_matrix_is_read_back_as_its_table():
    """A 16 x 576 group (SmolLM2's width) on a 16-entry fp16 table gives back that table and indices that
    rebuild the group exactly. numpy's float16 sort returns unsorted runs for arrays like this on some x86
    CPUs, which once made SmolLM2's pal4 export fail with "20 distinct values"."""
    from llmship.exporters.coreml_weights import table_lut

    rng = np.random.default_rng(0)
    table = np.sort(rng.standard_normal(16).astype(np.float32)).astype(np.float16)
    group = table[rng.integers(0, 16, (16, 576))]
    lut, indices = table_lut(group)
    assert lut.dtype == np.float16 and np.array_equal(lut, table)
    assert np.array_equal(lut[indices], group)
    few = table[:5][rng.integers(0, 5, (16, 576))]  # fewer values than entries: padded, still exact
    lut, indices = table_lut(few)
    assert len(lut) == 16 and np.array_equal(lut[indices], few)
