"""The package's structure: no import cycles or layer crossings, one format registry everything reads, one
cache-I/O wrapper, and every runtime's capability check refusing what it cannot hold before a model loads."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "check_imports.py"


def run_checker(package: Path):
    return subprocess.run([sys.executable, str(SCRIPT), str(package)], capture_output=True, text=True)


def test_the_package_has_no_import_cycle_and_keeps_its_layers():
    proc = run_checker(ROOT / "llmship")
    assert proc.returncode == 0, proc.stdout


def test_the_checker_catches_a_function_local_cycle_and_a_layer_crossing(tmp_path):
    package = shutil.copytree(ROOT / "llmship", tmp_path / "llmship", ignore=shutil.ignore_patterns("__pycache__"))
    spec = package / "models" / "spec.py"  # models.spec <- models.weights already; a local import back closes a loop
    spec.write_text(spec.read_text() + "\n\ndef _planted():\n    from llmship.models.weights import check_weights  # noqa\n")
    exporter = package / "exporters" / "pytorch.py"
    exporter.write_text(exporter.read_text() + "\n\ndef _planted():\n    from llmship.validation import gates  # noqa\n")
    proc = run_checker(package)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("import cycle:") and "llmship.models.spec" in ln and "llmship.models.weights" in ln for ln in lines), lines
    assert any("llmship.exporters.pytorch imports llmship.validation.gates" in ln for ln in lines), lines


@pytest.fixture
def fake_format(tmp_path, monkeypatch):
    """Register the sixth format of tests/fake_format.py: one entry, its two modules, one YAML file."""
    from llmship.formats import FORMATS, FormatEntry
    from tests import fake_format as module

    profiles = tmp_path / "fake.yaml"
    profiles.write_text(module.FAKE_PROFILE)
    entry = FormatEntry("fake", "fakert", "tests.fake_format", "tests.fake_format:open_runner", ("pyyaml", "jsonschema"),
                        "pip install nothing", str(profiles), "a test format")
    monkeypatch.setitem(FORMATS, "fake", entry)
    return entry


def test_a_sixth_format_is_picked_up_from_its_one_entry(fake_format, tmp_path, capsys, tiny):
    from llmship import cli
    from llmship.bench import target_row
    from llmship.build import inputs_sha256
    from llmship.config import BuildConfig
    from llmship.manifest import read_manifest
    from llmship.pipeline import export_artifact
    from llmship.targets import resolve_target

    assert cli.main(["targets"]) == 0
    listing = capsys.readouterr().out
    assert "fake-fp32" in listing and "fakert" in listing

    config = BuildConfig(model="builtin:tiny")
    target = resolve_target(config, "fake-fp32")
    assert target.runtime == "fakert"
    artifact = export_artifact(tiny, target, tmp_path / "fake-fp32")
    manifest = read_manifest(artifact)
    assert {"pyyaml", "jsonschema"} <= set(manifest["toolchain"]) and manifest["runtime"] == "fakert"

    before = inputs_sha256(config, target, "digest")
    FORMATS = sys.modules["llmship.formats"].FORMATS
    FORMATS["fake"] = dataclasses.replace(fake_format, toolchain=("pyyaml",))
    assert inputs_sha256(config, target, "digest") != before  # the build hash reads the same list

    assert target_row(target, "tiny")["runtime"] == "fakert"  # the bench labels rows from the entry

    from llmship.validation.runners import open_runner
    runner = open_runner(artifact, manifest, 1)
    assert runner.prefill([1, 5, 7], 0).shape == (3, tiny.spec.vocab_size)


def test_the_build_hash_covers_every_package_a_manifest_records(tiny, tmp_path):
    """The manifest's toolchain and the incremental-build hash come from one list per format."""
    from llmship.build import inputs_sha256
    from llmship.config import BuildConfig
    from llmship.formats import FORMATS, toolchain_packages
    from llmship.manifest import read_manifest
    from llmship.pipeline import export_artifact, toolchain_versions
    from llmship.targets import resolve_target

    for name, entry in FORMATS.items():
        packages = toolchain_packages(name)
        assert set(entry.toolchain) <= set(packages) and {"llmship", "torch"} <= set(packages)
        installed = toolchain_versions(packages)
        assert set(entry.toolchain) <= set(installed), f"{name}: toolchain packages not installed: {set(entry.toolchain) - set(installed)}"
    config = BuildConfig(model="builtin:tiny")
    target = resolve_target(config, "pytorch-fp32")
    manifest = read_manifest(export_artifact(tiny, target, tmp_path / "a"))
    assert set(manifest["toolchain"]) == set(toolchain_versions(toolchain_packages("pytorch")))
    # and the hash changes when any of them changes version
    import llmship.build as build

    real = build.toolchain_versions
    base = inputs_sha256(config, target, "d")
    for package in manifest["toolchain"]:
        build.toolchain_versions = lambda pkgs, p=package: {k: (v + "+changed" if k == p else v) for k, v in real(pkgs).items()}
        try:
            assert inputs_sha256(config, target, "d") != base, package
        finally:
            build.toolchain_versions = real


# An override each runtime cannot hold, and the field the error must name. The model path does not exist:
# exit 2 (not 3) shows the check ran before any model was loaded.
UNHOLDABLE = [
    ("executorch-8da4w", "recipe.group_size=48", "recipe.group_size"),
    ("executorch-8da4w", "recipe.symmetric=false", "recipe.symmetric"),
    ("onnx-int4", "recipe.group_size=48", "recipe.group_size"),
    ("onnx-int8", "recipe.activations=fp16", "recipe.activations"),
    ("litert-int4", "recipe.group_size=48", "recipe.group_size"),
    ("litert-int8", "recipe.symmetric=false", "recipe.symmetric"),
    ("coreml-int4", "recipe.symmetric=true", "recipe.symmetric"),
    ("coreml-fp16", "kv_cache_dtype=fp32", "kv_cache_dtype"),
    ("pytorch-fp32", "recipe.weights=int8", "recipe.weights"),
]


@pytest.mark.parametrize("target,override,field", UNHOLDABLE)
def test_an_override_the_runtime_cannot_hold_exits_2_before_any_model_loads(target, override, field, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmship", "export", "--model", str(tmp_path / "no-such-model"),
                           "--target", target, "--out", str(tmp_path / "out"), "--set", f"overrides.{target}.{override}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_every_built_in_profile_passes_its_runtimes_check():
    from llmship.targets import all_profiles, check_target

    for profile in all_profiles().values():
        check_target(profile)


def test_the_cache_io_wrapper_exists_once():
    """Only the canonical decoder module turns forward_with_cache into a caches-in, caches-out module: no other
    class's forward calls it."""
    import ast

    wrappers = []
    for path in (ROOT / "llmship").rglob("*.py"):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward"):
                if any(isinstance(c, ast.Attribute) and c.attr == "forward_with_cache" for c in ast.walk(fn)):
                    wrappers.append(f"{path.relative_to(ROOT).as_posix()}:{cls.name}")
    assert wrappers == ["llmship/models/decoder.py:CacheIODecoder"], wrappers


def _blocked(module: str, argv: list[str]):
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from llmship.cli import main\nsys.exit(main(" + json.dumps(argv) + "))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_a_missing_toolchain_is_exit_5_with_the_install_hint_at_export_and_at_validate(tmp_path):
    proc = _blocked("onnx_ir", ["export", "--model", "builtin:tiny", "--target", "onnx-fp32", "--out", str(tmp_path / "a")])
    assert proc.returncode == 5, proc.stderr
    assert "pip install onnx" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "a").exists()

    from llmship.config import BuildConfig
    from llmship.models import load_model
    from llmship.pipeline import export_artifact
    from llmship.targets import resolve_target

    target = resolve_target(BuildConfig(), "onnx-fp32").model_copy(update={"max_context": 32, "prefill_lengths": (8,)})
    artifact = export_artifact(load_model("builtin:tiny"), target, tmp_path / "onnx")
    proc = _blocked("onnxruntime", ["validate", str(artifact), "--set", "evaluation.tokens=16"])
    assert proc.returncode == 5, proc.stderr
    assert "pip install onnxruntime" in proc.stderr and "Traceback" not in proc.stderr
    assert "evaluating" not in proc.stdout  # found before any evaluation


@pytest.mark.parametrize("damage,field", [
    (lambda m: m.pop("entry_points"), "entry_points"),
    (lambda m: m["model"].pop("vocab_size"), "model.vocab_size"),
    (lambda m: m.update(max_context="512"), "max_context"),
    (lambda m: m["entry_points"]["decode"].update(file=7), "entry_points.decode.file"),
])
def test_a_corrupt_manifest_is_its_own_error_naming_the_field(damage, field, tiny, tmp_path):
    from llmship.config import BuildConfig
    from llmship.pipeline import export_artifact
    from llmship.targets import resolve_target

    artifact = export_artifact(tiny, resolve_target(BuildConfig(), "pytorch-fp32"), tmp_path / "a")
    manifest = json.loads((artifact / "manifest.json").read_text())
    damage(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, "-m", "llmship", "validate", str(artifact)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert f"field {field}" in proc.stderr and "Traceback" not in proc.stderr
