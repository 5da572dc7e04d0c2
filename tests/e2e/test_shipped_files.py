"""Validation judges the files that ship, and only them: every runtime's runner opens only regular files inside
the artifact that the manifest lists (and hashes), never an absolute path, a `..` path, an unlisted file or a
symlink. Each case was a PASS about a file that does not ship before."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmship import cli
from llmship.manifest import describe_files

FORMATS = {
    "pytorch-fp32": pytest.param("pytorch-fp32"),
    "onnx-fp32": pytest.param("onnx-fp32", marks=pytest.mark.onnx),
    "litert-fp32": pytest.param("litert-fp32", marks=pytest.mark.litert),
    "executorch-fp32": pytest.param("executorch-fp32", marks=pytest.mark.executorch),
    "coreml-fp16": pytest.param("coreml-fp16", marks=pytest.mark.coreml),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny):
    from llmship.config import BuildConfig
    from llmship.pipeline import export_artifact
    from llmship.targets import resolve_target

    made = {}

    def get(name: str) -> Path:
        if name not in made:
            target = resolve_target(BuildConfig(), name).model_copy(update={"max_context": 32, "prefill_lengths": (8,)})
            made[name] = export_artifact(tiny, target, tmp_path_factory.mktemp(name) / "good")
        return made[name]
    return get


def model_file(manifest: dict) -> str:
    return manifest["entry_points"]["decode"]["file"]


def copy_of(good: Path, where: Path) -> tuple[Path, dict]:
    art = Path(shutil.copytree(good, where, symlinks=True))
    return art, json.loads((art / "manifest.json").read_text())


def save(art: Path, manifest: dict) -> None:
    (art / "manifest.json").write_text(json.dumps(manifest))


def validate(art: Path, capsys) -> tuple[int, str]:
    code = cli.main(["validate", str(art), "--set", "evaluation.tokens=16", "--set", "evaluation.latency_runs=2"])
    return code, capsys.readouterr().err


def retarget(manifest: dict, name: str) -> None:
    for entry in manifest["entry_points"].values():
        entry["file"] = name


@pytest.mark.parametrize("target", FORMATS.values())
def test_an_entry_point_aimed_outside_the_artifact_is_refused(built, target, tmp_path, capsys):
    good = built(target)
    elsewhere = Path(shutil.copytree(good, tmp_path / "elsewhere"))
    for aim in (str(elsewhere / model_file(json.loads((good / "manifest.json").read_text()))),
                f"../elsewhere/{model_file(json.loads((good / 'manifest.json').read_text()))}"):
        art, manifest = copy_of(good, tmp_path / "art")
        retarget(manifest, aim)
        save(art, manifest)
        code, err = validate(art, capsys)
        assert code == 3 and "relative path inside the artifact" in err, err
        assert not (art / "report.json").exists()
        shutil.rmtree(art)


@pytest.mark.parametrize("target", FORMATS.values())
def test_a_model_file_missing_from_the_files_list_is_refused(built, target, tmp_path, capsys):
    art, manifest = copy_of(built(target), tmp_path / "art")
    name = model_file(manifest)
    manifest["files"] = {n: f for n, f in manifest["files"].items() if n != name and not n.startswith(name + "/")}
    save(art, manifest)
    code, err = validate(art, capsys)
    assert code == 3 and "not listed" in err, err


@pytest.mark.parametrize("target", FORMATS.values())
def test_a_symlinked_model_file_is_refused(built, target, tmp_path, capsys):
    good = built(target)
    elsewhere = Path(shutil.copytree(good, tmp_path / "elsewhere"))
    art, manifest = copy_of(good, tmp_path / "art")
    name = model_file(manifest)
    path = art / name
    if path.is_dir():  # a Core ML package: one file inside it becomes the link
        inner = next(p for p in sorted(path.rglob("*")) if p.is_file())
        rel = inner.relative_to(art).as_posix()
        inner.unlink()
        inner.symlink_to(elsewhere / rel)
    else:
        path.unlink()
        path.symlink_to(elsewhere / name)
    code, err = validate(art, capsys)
    assert code == 3 and "symlink" in err, err


@pytest.mark.parametrize("target", FORMATS.values())
def test_every_file_a_runner_opens_is_hashed(built, target, tmp_path, capsys):
    """One byte changed in the model file the runner opens: the integrity gate fails the run."""
    art, manifest = copy_of(built(target), tmp_path / "art")
    files = [n for n in manifest["files"] if n == model_file(manifest) or n.startswith(model_file(manifest) + "/")]
    victim = art / max(files, key=lambda n: manifest["files"][n]["bytes"])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    code, err = validate(art, capsys)
    report = json.loads((art / "report.json").read_text())
    assert code == 1 and "integrity" in err
    assert any(g["name"] == "integrity" and not g["passed"] for g in report["gates"])
    assert set(manifest["files"]) == set(describe_files(built(target)))


@pytest.mark.litert
def test_a_litertlm_bundle_packs_only_the_artifacts_own_files(built, tmp_path, capsys):
    art, manifest = copy_of(built("litert-fp32"), tmp_path / "art")
    retarget(manifest, "/etc/passwd")
    save(art, manifest)
    assert cli.main(["litertlm", str(art), "--out", str(tmp_path / "b.litertlm")]) == 3
    assert "relative path" in capsys.readouterr().err and not (tmp_path / "b.litertlm").exists()
    (tmp_path / "dir").mkdir()
    assert cli.main(["litertlm", str(built("litert-fp32")), "--out", str(tmp_path / "dir")]) == 2
    assert "directory" in capsys.readouterr().err
    (tmp_path / "mine.litertlm").write_text("my own file")
    assert cli.main(["litertlm", str(built("litert-fp32")), "--out", str(tmp_path / "mine.litertlm")]) == 2
    assert (tmp_path / "mine.litertlm").read_text() == "my own file"
    assert cli.main(["litertlm", str(built("litert-fp32")), "--out", str(tmp_path / "ok.litertlm")]) == 0
    assert cli.main(["litertlm", str(built("litert-fp32")), "--out", str(tmp_path / "ok.litertlm")]) == 0  # its own bundle
