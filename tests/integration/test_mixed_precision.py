"""Mixed precision: sensitivities, the allocation under a budget, budgets no runtime can meet, and the search for
the smallest artifact that passes its gates (one target per runtime)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from llmship.compress.plan import matrix_shapes
from llmship.targets import get_profile
from tests.helpers import target_params


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.shared
def test_the_scaled_sensitivities_rank_matrices_like_measured_kl(stories):
    """The proxy (measured KL of the coarsest grid scaled by Hessian-weighted error ratios) against the KL measured
    with each matrix alone on the other grids, on stories260K: rank correlation above 0.8."""
    from llmship.compress.calibration import calibration_sequences
    from llmship.compress.grids import symmetric
    from llmship.compress.sensitivity import Probe, sensitivities
    from llmship.config import Calibration, Evaluation

    seqs = calibration_sequences(stories, Calibration(tokens=256), Evaluation())
    names = [n for n in matrix_shapes(stories.spec) if n != "model.embed_tokens" and matrix_shapes(stories.spec)[n][1] % 64 == 0]
    options = {n: {"int4/g64": symmetric(4, 64, "bf16"), "int4/g32": symmetric(4, 32, "bf16"), "int8": symmetric(8, None)} for n in names}
    estimated = sensitivities(stories, options, seqs)
    probe = Probe(stories, seqs)
    for option in ("int4/g32", "int8"):
        measured = []
        for n in names:
            grid = options[n][option]
            w = stories.weights[f"{n}.weight"].float()
            measured.append(probe.kl_with(n, grid.dequantize(*grid.rtn(w, "mse"))))
        rho = spearman([estimated[n][option] for n in names], measured)
        assert rho > 0.8, (option, rho)


def llmship(*args):
    return subprocess.run([sys.executable, "-m", "llmship", *map(str, args)], capture_output=True, text=True)


def test_a_budget_the_runtime_cannot_meet_exits_2_saying_the_smallest_it_can_reach(tmp_path):
    proc = llmship("export", "--model", "builtin:tiny", "--target", "onnx-int4", "--out", tmp_path / "a",
                   "--set", "overrides.onnx-int4.recipe.budget={bytes: 1000}")
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "below the smallest artifact" in line and "about" in line and "Traceback" not in proc.stderr
    smallest = int(line.split("about ")[1].split(" bytes")[0].replace(",", ""))
    ok = llmship("export", "--model", "builtin:tiny", "--target", "onnx-int4", "--out", tmp_path / "b",
                 "--set", f"overrides.onnx-int4.recipe.budget={{bytes: {smallest}}}")
    assert ok.returncode == 0, ok.stderr  # and that size is reachable


def test_the_allocation_is_in_the_manifest_and_inspect_shows_it(tmp_path):
    art = tmp_path / "a"
    proc = llmship("export", "--model", "builtin:tiny", "--target", "onnx-int4", "--out", art,
                   "--set", "overrides.onnx-int4.recipe.budget={bytes_per_param: 1.0}")
    assert proc.returncode == 0, proc.stderr
    allocation = json.loads((art / "manifest.json").read_text())["compression"]["allocation"]
    assert set(allocation["choice"]) == set(matrix_shapes(__import__("llmship.models", fromlist=["load_model"]).load_model("builtin:tiny").spec))
    assert allocation["matrix_bytes"] + allocation["other_bytes"] <= allocation["budget_bytes"]
    info = llmship("inspect", art).stdout
    assert "budget" in info and "model.layers.0.mlp.down_proj:" in info


@pytest.mark.litert
@pytest.mark.slow
def test_a_mix_with_float_matrices_exports_on_litert(tmp_path):
    """A budget roomy enough that the allocation keeps some matrices fp16: the exporter is handed the allocated
    recipe (it once got the uniform int4 one and refused the float matrices the record did not hold)."""
    art = tmp_path / "a"
    proc = llmship("export", "--model", "builtin:tiny", "--target", "litert-int4", "--out", art,
                   "--set", "overrides.litert-int4.recipe.budget={bytes_per_param: 1.5}")
    assert proc.returncode == 0, proc.stderr
    counts = json.loads((art / "manifest.json").read_text())["compression"]["allocation"]["counts"]
    assert counts.get("fp16", 0) > 0 and any(k.startswith("int4") for k in counts), counts
    tensors = json.loads((art / "manifest.json").read_text())["compression"]["grids"]
    choice = json.loads((art / "manifest.json").read_text())["compression"]["allocation"]["choice"]
    assert {m for m, k in choice.items() if k.startswith("int4")} <= set(tensors)  # the record holds the int4 ones
    assert not {m for m, k in choice.items() if k == "fp16"} & set(tensors)


# make test searches on ONNX (20 s here); LiteRT's, Core ML's and ExecuTorch's (6 minutes) are make test-full's
SEARCHED = target_params(("executorch-8da4w", "onnx-int4", "litert-int4", "coreml-int4"), keep=("onnx-int4",))


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("target", SEARCHED)
def test_smallest_ends_with_a_passing_artifact_smaller_than_the_recipe_it_started_from(stories_dir, tmp_path, target):
    relaxed = {"kl_mean_max": 0.5, "top1_agreement_min": 0.6, "ppl_ratio_max": 1.6}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": str(stories_dir), "targets": [target], "evaluation": {"tokens": 128, "latency_runs": 2},
                               "search": {"mode": "smallest", "max_steps": 1},
                               "overrides": {target: {"max_context": 256, "prefill_lengths": [32], "gates": relaxed}}}))
    proc = llmship("build", cfg, "--out", tmp_path / "dist")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "dist" / target / "report.json").read_text())
    steps = report["search"]["steps"]
    assert report["passed"] and len(steps) >= 2 and steps[0]["step"] == 0
    chosen = next(s for s in steps if s["step"] == report["search"]["chosen_step"])
    assert chosen["passed"] and chosen["step"] > 0 and report["artifact"]["bytes"] < steps[0]["bytes"]
    assert report["artifact"]["bytes"] == chosen["bytes"]
    assert not list((tmp_path / "dist").glob(".*search*"))  # the steps' artifacts are gone, only the chosen one stays
    page = (tmp_path / "dist" / "report.html").read_text()
    assert 'class="chosen"' in page and get_profile(target).name in page


@pytest.mark.parametrize("target", ["executorch-8da4w", "onnx-int4", "litert-int4", "coreml-int4"])
def test_every_4bit_target_offers_the_allocation_an_8bit_option_it_can_hold(tiny, target):
    """A budget pays for int8 on the sensitive matrices with cheaper blocks elsewhere; a runtime whose int8 is per
    output channel (LiteRT refuses int8 in the recipe's 4-bit blocks) gets that form, not no int8 at all."""
    from llmship.compress.mixed import CANDIDATES, _with_rules, candidate_grids
    from llmship.formats import exporter

    profile = get_profile(target)
    module = exporter(profile.format)
    eight = [k for k in candidate_grids(profile, module, tiny.spec) if k.startswith("int8")]
    assert len(eight) == 1, eight
    module.check(_with_rules(profile, [{"match": ".*", **CANDIDATES[eight[0]]}]), tiny.spec)  # the rule it writes holds
