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
def test_html_report_renders_its_plots_in_chromium(tmp_path):
    browser = chromium()
    art = tmp_path / "build" / "pytorch-fp32"
    assert cli.main(["export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", str(art)]) == 0
    assert cli.main(["validate", str(art), "--set", "evaluation.tokens=24", "--set", "evaluation.latency_runs=4"]) == 0
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
    # Chromium logs every console message (errors and uncaught exceptions included) as INFO:CONSOLE; the page logs nothing.
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == []
    assert 'id="verdict"' in proc.stdout and "PASS" in proc.stdout
