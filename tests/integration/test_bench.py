"""`llmship bench --quick` end to end on stories260K: three llmship targets beside the anchors that are quick on it.

The ExecuTorch and LiteRT anchors are left out here: their first-party exports take minutes even on a
260K-parameter model. onnxruntime-genai's builder converts stories260K, but onnxruntime 1.31's CPU
GroupQueryAttention refuses its head size of 8, so those rows come back carrying that error: the path an
anchor that cannot run takes.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmship.bench import ROW_FIELDS

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
TARGETS = ("pytorch-fp32", "onnx-fp32", "litert-fp32")
ANCHORS = {"transformers-eager": ("fp32 generate",), "onnxruntime-genai-builder": ("int4", "fp32")}

pytestmark = [pytest.mark.slow, pytest.mark.shared, pytest.mark.onnx, pytest.mark.litert,
              pytest.mark.skipif(not STORIES.is_dir(), reason=f"stories260K is absent ({STORIES})")]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "llmship", "bench", "--quick", "--out", str(out)]
    cmd += [a for t in TARGETS for a in ("--target", t)] + [a for n in ANCHORS for a in ("--anchor", n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads((out / "results.json").read_text())


def test_writes_results_table_and_plot(bench):
    out, results = bench
    assert results["quick"] is True and results["model"] == "stories260K"
    assert results["params"] > 0
    md = (out / "results.md").read_text()
    assert "Ours ÷ first-party anchor" in md and "onnxruntime-genai-builder" in md
    assert (out / "plot.svg").read_text().lstrip().startswith("<svg")


def test_machine_is_measured(bench):
    machine = bench[1]["machine"]
    assert machine["cores"] >= 1
    assert machine["read_gb_s"] > 0


def test_one_row_per_target_and_anchor_recipe(bench):
    rows = bench[1]["rows"]
    keys = sorted((r["tool"], r["recipe"]) for r in rows)
    expected = sorted([("llmship", t) for t in TARGETS] + [(tool, rec) for tool, recs in ANCHORS.items() for rec in recs])
    assert keys == expected
    for r in rows:
        assert set(r) == set(ROW_FIELDS), r


def test_each_row_is_measured_or_says_why_not(bench):
    for r in bench[1]["rows"]:
        if r["error"] is None:
            assert r["decode_tok_s"] > 0 and r["bytes"] > 0, r
            assert 0.0 <= r["top1_agreement"] <= 1.0 and r["kl_mean"] >= 0.0, r
        else:
            assert isinstance(r["error"], str) and r["error"].strip(), r


def test_fp32_rows_match_the_reference(bench):
    """An fp32 artifact computes the reference's function: a broken conversion or misaligned logits would not."""
    by = {(r["tool"], r["recipe"]): r for r in bench[1]["rows"]}
    for key in (("llmship", "pytorch-fp32"), ("llmship", "onnx-fp32"), ("transformers-eager", "fp32 generate")):
        r = by[key]
        assert r["error"] is None, r
        assert r["top1_agreement"] == 1.0 and r["kl_mean"] < 1e-6, r


def test_the_compression_stage_is_costed(bench):
    """GPTQ and the sensitivity/allocation step each ran in a child process with a cold cache, and say what they did."""
    out, results = bench
    steps = {c["step"]: c for c in results["compression"]}
    assert set(steps) == {"gptq", "sensitivity"}
    for c in steps.values():
        assert c["error"] is None, c
        assert c["wall_s"] > c["seconds"] > 0 and c["peak_rss_mb"] > 0 and c["matrices"] > 0, c
    assert sum(steps["sensitivity"]["counts"].values()) == steps["sensitivity"]["matrices"]
    assert "The compression stage's cost" in (out / "results.md").read_text()


def test_pruning_and_healing_are_measured_against_the_original(bench):
    """A quarter of stories260K's FFN pruned, unhealed and healed in child processes with a cold cache: healing costs
    time per step and lowers the KL to the FP32 original on both real texts."""
    out, results = bench
    rows = {r["steps"]: r for r in results["pruning"]}
    assert set(rows) == {0, 50}
    for r in rows.values():
        assert r["error"] is None and r["params"] < r["params_before"] and r["wall_s"] > r["seconds"] > 0, r
        assert set(r["texts"]) == {"tinyshakespeare.txt", "tinystories_val.txt"}
    assert rows[0]["heal_s"] is None and rows[50]["seconds_per_step"] > 0
    for name, healed in rows[50]["texts"].items():
        assert healed["kl_mean"] < rows[0]["texts"][name]["kl_mean"], name
    assert "Pruning and healing" in (out / "results.md").read_text()
