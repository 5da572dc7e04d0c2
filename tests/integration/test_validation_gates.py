"""The validation stage and its gates, on the `pytorch` identity target (no converter involved).

Each planted fault is a real bug class: a corrupted weight, the wrong rope convention (llama.cpp's
interleaved q/k layout left in place), and a KV cache written one position off. Gates are set to the
looser, quantized-recipe level (KL 0.05, top-1 0.9) so the test shows the faults are caught by gates
that still admit a good int4/int8 artifact, not only by exact equality.
"""
import dataclasses
import json
import subprocess
import sys
from xml.etree import ElementTree as ET

import pytest
import torch

from llmship import cli
from llmship.config import BuildConfig
from llmship.targets import resolve_target
from llmship.models import load_model
from llmship.pipeline import export_artifact
from llmship.validation.report import validate_schema
from tests.helpers import llama_cpp_permute

REALISTIC = ["--set", "overrides.pytorch-fp32.gates={max_abs_err: null, kl_mean_max: 0.05, top1_agreement_min: 0.9, greedy_match_min: 0.5}"]
FAST = ["--set", "evaluation.tokens=96", "--set", "evaluation.latency_runs=4"]


def validate_cli(artifact, *extra):
    return subprocess.run([sys.executable, "-m", "llmship", "validate", str(artifact), *FAST, *extra], capture_output=True, text=True)


def export_with(loaded, weights, out):
    faulty = dataclasses.replace(loaded, weights=weights)  # same source: the reference is the original model
    return export_artifact(faulty, resolve_target(BuildConfig(), "pytorch-fp32"), out)


@pytest.fixture(scope="module")
def stories(request):
    from tests.conftest import STORIES

    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"../shared/models/stories260K is absent ({STORIES})")
    return load_model(str(STORIES))


@pytest.fixture(scope="module")
def good_artifact(stories, tmp_path_factory):
    out = export_artifact(stories, resolve_target(BuildConfig(), "pytorch-fp32"), tmp_path_factory.mktemp("good") / "pytorch-fp32")
    proc = validate_cli(out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_reference_validated_against_itself_is_exact_and_passes(good_artifact):
    """The canonical model against itself: the artifact runs prefill chunks and decode steps, the reference each
    window in one pass, so they differ by fp32 summation order only; greedy runs the same steps and is exact."""
    report = json.loads((good_artifact / "report.json").read_text())
    validate_schema(report)
    p = report["parity"]
    assert p["max_abs_err"] <= 1e-4 and p["kl_mean"] <= 1e-10 and p["top1_agreement"] == 1.0
    assert p["greedy_match"] == p["greedy_total"] == 32 and abs(p["ppl"] / p["ppl_reference"] - 1) <= 1e-6
    assert report["passed"] and all(g["passed"] for g in report["gates"]) and len(report["gates"]) >= 4
    lat = report["latency"]
    assert lat["decode_tok_s"] > 0 and lat["decode_ms_p90"] >= lat["decode_ms_p50"] > 0 and report["memory"]["peak_rss_mb"] > 50
    assert report["artifact"]["bytes"] == sum(f["bytes"] for f in report["artifact"]["files"].values())


def _failed_gates(proc):
    line = [ln for ln in proc.stderr.splitlines() if "gate(s) failed" in ln]
    assert len(line) == 1, proc.stderr
    return line[0]


def test_perturbed_weight_in_one_layer_fails_the_parity_gate(stories, tmp_path):
    weights = dict(stories.weights)
    w = weights["model.layers.2.mlp.down_proj.weight"]
    weights["model.layers.2.mlp.down_proj.weight"] = w + 0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    proc = validate_cli(export_with(stories, weights, tmp_path / "a"), *REALISTIC)
    assert proc.returncode == 1
    assert "kl_mean_max" in _failed_gates(proc)


def test_wrong_rope_convention_fails_the_parity_gate(stories, tmp_path):
    weights, spec = dict(stories.weights), stories.spec
    for i in range(spec.num_layers):  # q/k rows left in llama.cpp's interleaved-pair order
        for proj, heads in (("q_proj", spec.num_heads), ("k_proj", spec.num_kv_heads)):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            weights[key] = torch.from_numpy(llama_cpp_permute(weights[key].numpy(), heads).copy())
    proc = validate_cli(export_with(stories, weights, tmp_path / "a"), *REALISTIC)
    assert proc.returncode == 1
    failed = _failed_gates(proc)
    assert "kl_mean_max" in failed and "top1_agreement_min" in failed


class OffByOneCacheRunner:
    """The reference runner, except each K/V is written one slot later than its position (a real bug)."""

    def __new__(cls, artifact_dir, manifest, threads):
        from llmship.models.decoder import MobileDecoder
        from llmship.validation.runners.reference import ReferenceRunner, load_pytorch_artifact

        decoder = load_pytorch_artifact(artifact_dir, manifest)
        run = MobileDecoder._run

        def shifted(self, tokens, input_pos, k_caches, v_caches, inplace):
            original = self.model.layers[0].self_attn.forward.__func__

            def attn_forward(attn, x, cos, sin, positions, *rest):
                return original(attn, x, cos, sin, torch.clamp(positions + 1, max=self.max_context - 1), *rest)

            for layer in self.model.layers:
                layer.self_attn.forward = attn_forward.__get__(layer.self_attn)
            try:
                return run(self, tokens, input_pos, k_caches, v_caches, inplace)
            finally:
                for layer in self.model.layers:
                    del layer.self_attn.forward

        decoder._run = shifted.__get__(decoder)
        return ReferenceRunner.from_decoder(decoder, threads)


def test_kv_cache_written_one_position_off_fails_the_parity_gate(good_artifact, monkeypatch, capsys, tmp_path):
    import shutil

    from llmship.formats import FORMATS

    artifact = shutil.copytree(good_artifact, tmp_path / "art")
    monkeypatch.setitem(FORMATS, "pytorch", dataclasses.replace(FORMATS["pytorch"], runner=f"{__name__}:OffByOneCacheRunner"))
    code = cli.main(["validate", str(artifact), *FAST, *REALISTIC])
    err = capsys.readouterr().err
    assert code == 1 and "kl_mean_max" in err
    report = json.loads((artifact / "report.json").read_text())
    assert report["parity"]["greedy_match"] < report["parity"]["greedy_total"]


def test_a_better_baseline_fails_the_regression_gate(good_artifact, tmp_path):
    import shutil

    artifact = shutil.copytree(good_artifact, tmp_path / "art")
    baseline = json.loads((artifact / "report.json").read_text())
    baseline["artifact"]["bytes"] = int(baseline["artifact"]["bytes"] * 0.8)  # the previous release was 20% smaller
    (tmp_path / "report.json").write_text(json.dumps(baseline))
    proc = validate_cli(artifact, "--baseline", tmp_path)
    assert proc.returncode == 1
    assert "regression.size" in _failed_gates(proc)
    same = validate_cli(artifact, "--baseline", good_artifact / "report.json")
    report = json.loads((artifact / "report.json").read_text())
    names = {g["name"] for g in report["gates"]}
    assert {"regression.size", "regression.kl_mean"} <= names
    assert all(g["passed"] for g in report["gates"] if g["name"] in ("regression.size", "regression.kl_mean")), same.stderr


def test_modified_artifact_file_fails_integrity(good_artifact, tmp_path):
    import shutil

    copy = shutil.copytree(good_artifact, tmp_path / "copy")
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    proc = validate_cli(copy)
    assert proc.returncode == 1 and "integrity" in _failed_gates(proc)


def test_a_file_changed_during_validation_fails_integrity(stories, good_artifact, tmp_path, monkeypatch):
    """A runtime that rewrites the file it opens (coremltools did, to a Core ML package's Manifest.json)
    leaves the artifact unlike its manifest: the report names the file and the integrity gate fails."""
    import shutil

    from llmship.config import BuildConfig
    from llmship.validation.stage import validate_artifact
    from llmship.validation import runners

    copy = shutil.copytree(good_artifact, tmp_path / "copy")
    real_open = runners.open_runner

    def rewriting_open(artifact_dir, manifest, threads):
        with open(artifact_dir / "tokenizer.json", "a") as f:
            f.write(" ")
        return real_open(artifact_dir, manifest, threads)

    monkeypatch.setattr(runners, "open_runner", rewriting_open)
    config = BuildConfig.model_validate({"evaluation": {"tokens": 64, "latency_runs": 2}})
    report = validate_artifact(copy, config, loaded=stories)
    assert report["integrity"] == {"mismatched": [], "changed_by_validation": ["tokenizer.json"]}
    assert not report["passed"] and [g["name"] for g in report["gates"] if not g["passed"]] == ["integrity"]


def test_report_renders_markdown_html_and_junit_with_one_failure_per_failed_gate(stories, good_artifact, tmp_path):
    import shutil

    weights = dict(stories.weights)
    weights["model.norm.weight"] = weights["model.norm.weight"] * 3
    bad = export_with(stories, weights, tmp_path / "build" / "bad-fp32")
    assert validate_cli(bad, *REALISTIC).returncode == 1
    shutil.copytree(good_artifact, tmp_path / "build" / "pytorch-fp32")
    assert cli.main(["report", str(tmp_path / "build")]) == 0
    out = tmp_path / "build"
    bad_report = json.loads((bad / "report.json").read_text())
    failed = [g["name"] for g in bad_report["gates"] if not g["passed"]]
    suites = ET.parse(out / "junit.xml").getroot().findall("testsuite")
    assert len(suites) == 2
    failures = [(s.get("name"), c.get("name")) for s in suites for c in s.findall("testcase") if c.find("failure") is not None]
    assert len(failed) >= 1 and sorted(failures) == sorted(("pytorch-fp32", n) for n in failed)
    md = (out / "report.md").read_text()
    assert "FAIL" in md and "| pytorch-fp32 |" in md
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 3 and "polyline" in page


def test_latency_child_reports_its_own_memory_not_its_parents(tiny, tmp_path):
    """Linux carries a parent's peak RSS across fork + exec into ru_maxrss; the runtime's memory must be the
    child's own, however much the validating process holds."""
    import numpy as np

    from llmship.validation.latency import run_in_child

    artifact = export_artifact(tiny, resolve_target(BuildConfig(model="builtin:tiny"), "pytorch-fp32"), tmp_path / "a")
    held = np.ones(2 * 2**30 // 8)  # 2 GiB resident in this (the parent) process
    child = run_in_child(artifact, threads=1, decode_steps=4)["peak_rss_mb"]
    assert held.sum() > 0 and 0 < child < 1024


def noisy(loaded, scale: float, seed: int = 0):
    """The model with every matrix perturbed by `scale` times its own spread (KL grows about as scale squared)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {k: (v + scale * v.std() * torch.randn(v.shape, generator=gen)) if v.ndim == 2 else v for k, v in loaded.weights.items()}
    return dataclasses.replace(loaded, weights=weights)


def test_intervals_overlap_across_seeds_and_the_regression_gate_catches_a_20_percent_worsening(stories, tmp_path):
    """Two validations of one artifact with other evaluation seeds agree within their intervals, and pass the
    regression gate against each other; the same evaluation of a model 20% worse (in KL) fails it."""
    from llmship.config import BuildConfig
    from llmship.validation.stage import validate_artifact

    relaxed = {"max_abs_err": None, "kl_mean_max": 1.0, "top1_agreement_min": 0.5, "greedy_match_min": None}

    def config(seed):
        return BuildConfig.model_validate({"evaluation": {"tokens": 1024, "seed": seed, "latency_runs": 2},
                                           "overrides": {"pytorch-fp32": {"gates": relaxed}}})

    # the reference is the clean model; the artifacts hold perturbed weights
    a = export_with(stories, noisy(stories, 0.06).weights, tmp_path / "a")
    b = export_with(stories, noisy(stories, 0.06 * 1.1).weights, tmp_path / "b")  # ~1.21x the KL
    base = validate_artifact(a, config(0), loaded=stories)
    (tmp_path / "base.json").write_text(json.dumps(base))
    other = validate_artifact(a, config(1), loaded=stories, baseline=tmp_path / "base.json")
    i, j = base["parity"]["intervals"]["kl_mean"], other["parity"]["intervals"]["kl_mean"]
    assert i[0] <= j[1] and j[0] <= i[1], (i, j)  # the intervals overlap
    assert base["parity"]["eval_tokens"] >= 1024
    gate = next(g for g in other["gates"] if g["name"] == "regression.kl_mean")
    assert gate["passed"] and gate["method"] == "intervals"
    again = validate_artifact(a, config(0), loaded=stories, baseline=tmp_path / "base.json")
    gate = next(g for g in again["gates"] if g["name"] == "regression.kl_mean")
    assert gate["passed"] and gate["method"] == "paired"
    worse = validate_artifact(b, config(0), loaded=stories, baseline=tmp_path / "base.json")
    assert worse["parity"]["kl_mean"] > 1.15 * base["parity"]["kl_mean"]
    gate = next(g for g in worse["gates"] if g["name"] == "regression.kl_mean")
    assert not gate["passed"] and gate["method"] == "paired" and gate["difference"][1] > 0
