"""The HTML report opened in a real headless Chromium (Debian's package): plots laid out, no console errors."""
import os
import re
import shutil
import subprocess

import pytest

from llmship import cli


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    return path


@pytest.mark.browser
def test_html_report_renders_its_plots_intervals_marginal_flags_and_greedy_text_in_chromium(tmp_path, stories_dir):
    import dataclasses
    import json

    import torch

    from llmship.config import BuildConfig
    from llmship.models import load_model
    from llmship.pipeline import export_artifact
    from llmship.targets import resolve_target
    from llmship.validation.stage import validate_artifact

    browser = chromium()
    tiny = load_model(str(stories_dir))
    gen = torch.Generator().manual_seed(0)
    weights = {k: v + (0.1 * v.std() * torch.randn(v.shape, generator=gen) if v.ndim == 2 else 0) for k, v in tiny.weights.items()}
    art = export_artifact(dataclasses.replace(tiny, weights=weights), resolve_target(BuildConfig(), "pytorch-fp32"),
                          tmp_path / "build" / "pytorch-fp32")  # a drifting artifact: intervals with a spread, greedy text apart
    loose = {"max_abs_err": None, "kl_mean_max": 10.0, "top1_agreement_min": None, "greedy_match_min": None}
    config = BuildConfig.model_validate({"evaluation": {"tokens": 256, "latency_runs": 2}, "overrides": {"pytorch-fp32": {"gates": loose}}})
    first = validate_artifact(art, config, loaded=tiny)
    lo, hi = first["parity"]["intervals"]["kl_mean"]
    assert lo < hi
    loose["kl_mean_max"] = (lo + hi) / 2  # a limit inside the interval: marginal
    config = BuildConfig.model_validate({"evaluation": {"tokens": 256, "latency_runs": 2}, "overrides": {"pytorch-fp32": {"gates": loose}}})
    report = validate_artifact(art, config, loaded=tiny)
    assert any(g.get("marginal") for g in report["gates"])
    assert report["greedy"]["text"][0]["first_divergence"] is not None, json.dumps(report["greedy"]["text"])
    assert cli.main(["report", str(tmp_path / "build")]) == 0
    page = tmp_path / "build" / "report.html"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r'data-plots-rendered="(\d+)"', proc.stdout)
    assert match and int(match.group(1)) == 3, proc.stdout[:500]
    bars = re.search(r'data-errorbars-rendered="(\d+)"', proc.stdout)
    assert bars and int(bars.group(1)) == 1
    # Chromium logs every console message (errors and uncaught exceptions included) as INFO:CONSOLE; the page logs nothing.
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == []
    assert 'id="verdict"' in proc.stdout
    dom = proc.stdout
    assert dom.count('class="errorbar"') == 1 and "<line" in dom.split('class="errorbar"')[1][:200]
    assert 'class="marginal"' in dom
    assert dom.count('class="diverge"') == 2  # the first diverging token, marked in both continuations
    assert 'class="side"' in dom and "reference" in dom
