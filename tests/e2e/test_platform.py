"""App integration: platform layouts with an index manifest, incremental rebuilds, the Xcode build phase,
the release-gate workflow, and the CI matrix split + report merge."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from llmship.manifest import sha256_file
from tests.conftest import ROOT

FAST = {"tokens": 24, "latency_runs": 4}


def write_config(tmp_path, **extra) -> Path:
    data = {"model": "builtin:tiny", "targets": ["pytorch-fp32"], "evaluation": FAST,
            "platforms": {"android": ["pytorch-fp32"], "ios": ["pytorch-fp32"]}, **extra}
    path = tmp_path / "llmship.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def llmship(*args):
    return subprocess.run([sys.executable, "-m", "llmship", *map(str, args)], capture_output=True, text=True)


def test_android_layout_index_and_incremental_rebuild(tmp_path):
    cfg, out = write_config(tmp_path), tmp_path / "out"
    t0 = time.perf_counter()
    first = llmship("build", cfg, "--platform", "android", "--out", out)
    t_first = time.perf_counter() - t0
    assert first.returncode == 0, first.stderr
    # the closing timing lines: each target's export and validate seconds, then the total
    assert re.search(r"time: pytorch-fp32 +export +\d+\.\d s  validate +\d+\.\d s", first.stdout), first.stdout
    assert re.search(r"time: total \d+\.\d s for 1 target", first.stdout)
    root = out / "android" / "assets" / "llmship"
    artifact = root / "tiny" / "pytorch-fp32"
    index = json.loads((root / "index.json").read_text())
    assert index["platform"] == "android" and [a["target"] for a in index["artifacts"]] == ["pytorch-fp32"]
    entry = index["artifacts"][0]
    assert entry["path"] == "tiny/pytorch-fp32" and entry["validation"]["passed"] is True
    assert set(entry["entry_points"]) == {"prefill", "decode"} and entry["max_context"] == 512
    for name, f in entry["files"].items():
        assert sha256_file(artifact / name) == f["sha256"]
    stamp = (artifact / "manifest.json").stat().st_mtime_ns

    t0 = time.perf_counter()
    second = llmship("build", cfg, "--platform", "android", "--out", out)
    t_second = time.perf_counter() - t0
    assert second.returncode == 0 and "up to date" in second.stdout and "exporting" not in second.stdout
    assert "time: pytorch-fp32         reused" in second.stdout
    assert (artifact / "manifest.json").stat().st_mtime_ns == stamp
    assert t_second < t_first

    # a changed input (the evaluation settings) rebuilds
    cfg = write_config(tmp_path, evaluation={**FAST, "seed": 7})
    third = llmship("build", cfg, "--platform", "android", "--out", out)
    assert third.returncode == 0 and "exporting" in third.stdout
    assert (artifact / "manifest.json").stat().st_mtime_ns != stamp


def test_a_target_both_platforms_share_is_built_once(tmp_path):
    cfg, out = write_config(tmp_path), tmp_path / "out"
    assert llmship("build", cfg, "--platform", "android", "--out", out).returncode == 0
    ios = llmship("build", cfg, "--platform", "ios", "--out", out)
    assert ios.returncode == 0, ios.stderr
    assert "copied" in ios.stdout and "exporting" not in ios.stdout
    android_dir = out / "android" / "assets" / "llmship" / "tiny" / "pytorch-fp32"
    ios_dir = out / "ios" / "Resources" / "llmship" / "tiny" / "pytorch-fp32"
    assert (ios_dir / "manifest.json").read_bytes() == (android_dir / "manifest.json").read_bytes()
    index = json.loads((out / "ios" / "Resources" / "llmship" / "index.json").read_text())
    assert [a["target"] for a in index["artifacts"]] == ["pytorch-fp32"] and index["artifacts"][0]["validation"]["passed"]
    # different inputs (another evaluation seed) are not copied
    cfg = write_config(tmp_path, evaluation={**FAST, "seed": 3})
    again = llmship("build", cfg, "--platform", "ios", "--out", out)
    assert again.returncode == 0 and "exporting" in again.stdout and "copied" not in again.stdout


def test_a_symlink_planted_in_one_platforms_artifact_is_never_copied_into_the_other(tmp_path):
    cfg, out = write_config(tmp_path), tmp_path / "out"
    assert llmship("build", cfg, "--platform", "android", "--out", out).returncode == 0
    android_dir = out / "android" / "assets" / "llmship" / "tiny" / "pytorch-fp32"
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the app bundle")
    (android_dir / "tokenizer.json").unlink()
    (android_dir / "tokenizer.json").symlink_to(secret)
    ios = llmship("build", cfg, "--platform", "ios", "--out", out)
    assert ios.returncode == 0, ios.stderr
    assert "copied" not in ios.stdout and "exporting" in ios.stdout  # not up to date: rebuilt from the source
    ios_dir = out / "ios" / "Resources" / "llmship" / "tiny" / "pytorch-fp32"
    assert not any(p.is_symlink() for p in ios_dir.rglob("*"))
    assert "not for the app bundle" not in (ios_dir / "tokenizer.json").read_text()


def test_xcode_build_phase_copies_artifacts_into_the_bundle(tmp_path):
    srcroot = tmp_path / "App"
    srcroot.mkdir()
    write_config(srcroot)
    env = dict(os.environ, SRCROOT=str(srcroot), TARGET_BUILD_DIR=str(tmp_path / "DerivedData" / "Build" / "Products" / "Debug-iphoneos"),
               UNLOCALIZED_RESOURCES_FOLDER_PATH="App.app", CONFIGURATION="Debug", LLMSHIP_ROOT=str(ROOT))
    script = ROOT / "integrations" / "ios" / "llmship-build-phase.sh"
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    bundle = tmp_path / "DerivedData" / "Build" / "Products" / "Debug-iphoneos" / "App.app" / "llmship"
    index = json.loads((bundle / "index.json").read_text())
    assert index["platform"] == "ios"
    for a in index["artifacts"]:
        for name, f in a["files"].items():
            assert sha256_file(bundle / a["path"] / name) == f["sha256"]
    assert (srcroot / "build" / "llmship" / "Debug" / "ios" / "Resources" / "llmship" / "index.json").is_file()


def test_release_workflow_is_valid_and_uses_existing_make_targets():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "release-gate.yml").read_text())
    assert set(wf["jobs"]) == {"matrix", "validate", "gate"}
    runs = [s["run"] for job in wf["jobs"].values() for s in job["steps"] if "run" in s]
    make_targets = {m for r in runs for m in re.findall(r"\bmake (\w[\w-]*)", r)}
    declared = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert make_targets and make_targets <= declared, make_targets - declared
    llmship_cmds = {m for r in runs for m in re.findall(r"llmship (\w+)", r)}
    assert llmship_cmds == {"matrix", "report"}
    uploads = [s for j in wf["jobs"].values() for s in j["steps"] if "upload-artifact" in s.get("uses", "")]
    assert any("report.html" in s["with"]["path"] and "junit.xml" in s["with"]["path"] for s in uploads)


def test_matrix_split_validate_and_merge_into_one_verdict(tmp_path):
    cfg = write_config(tmp_path, overrides={"pytorch-fp32": {"max_context": 64, "prefill_lengths": [8]}})
    proc = llmship("matrix", cfg)
    assert proc.returncode == 0, proc.stderr
    jobs = json.loads(proc.stdout)["include"]
    assert jobs == [{"target": "pytorch-fp32", "format": "pytorch"}]
    # two jobs: the matrix's one, and the same target with a planted failure (an impossible speed budget)
    ok = llmship("build", cfg, "--target", "pytorch-fp32", "--out", tmp_path / "jobs" / "a")
    bad = llmship("build", cfg, "--target", "pytorch-fp32", "--out", tmp_path / "jobs" / "b",
                  "--set", "overrides.pytorch-fp32.gates.decode_tok_s_min=1000000000")
    assert ok.returncode == 0 and bad.returncode == 1, bad.stderr
    merged = llmship("report", "merge", tmp_path / "jobs" / "a", "--out", tmp_path / "gate-ok")
    assert merged.returncode == 0 and "PASS: 1/1" in merged.stdout
    merged = llmship("report", "merge", tmp_path / "jobs", "--out", tmp_path / "gate")
    assert merged.returncode == 1 and "FAIL: 1/2" in merged.stdout and "decode_tok_s_min" in merged.stdout
    verdict = json.loads((tmp_path / "gate" / "verdict.json").read_text())
    assert verdict["passed"] is False and len(verdict["jobs"]) == 2
    assert (tmp_path / "gate" / "report.html").is_file() and (tmp_path / "gate" / "junit.xml").is_file()


def _lint(tool: str, path: Path):
    exe = Path(sys.executable).with_name(tool)
    assert exe.is_file(), f"{tool} is not installed in the environment (make test installs it: pyproject dev extras)"
    return subprocess.run([str(exe), str(path)], capture_output=True, text=True)


def test_the_release_gate_workflow_passes_actionlint(tmp_path):
    workflow = ROOT / ".github" / "workflows" / "release-gate.yml"
    proc = _lint("actionlint", workflow)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "broken.yml"  # the linter is really looking: an undefined step output is caught
    broken.write_text(workflow.read_text().replace("${{", "${{ steps.nonexistent.outputs.x }}${{", 1))
    assert _lint("actionlint", broken).returncode != 0


def test_the_xcode_build_phase_passes_shellcheck(tmp_path):
    script = ROOT / "integrations" / "ios" / "llmship-build-phase.sh"
    proc = _lint("shellcheck", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "broken.sh"
    broken.write_text(script.read_text() + '\ncp $SRCROOT/x $TARGET_BUILD_DIR\n')  # unquoted expansions: SC2086
    assert "SC2086" in _lint("shellcheck", broken).stdout
