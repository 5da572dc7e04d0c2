"""manifest.json and atomic artifact directories."""
import json

import pytest

from llmship.config import BuildConfig
from llmship.targets import resolve_target
from llmship.errors import ConfigError, ExportError
from llmship.manifest import read_manifest, sha256_file
from llmship.outputs import atomic_directory
from llmship.models import load_model
from llmship.pipeline import export_artifact


def test_atomic_directory_replaces_only_on_success(tmp_path):
    from llmship.manifest import write_manifest

    final = tmp_path / "art"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("one")
        write_manifest(tmp, {"target": "t"})
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("converter crashed")
    assert (final / "a.txt").read_text() == "one"  # previous artifact intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no partial directory or lock left behind


def test_unwritable_output_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write to output directory"):
        with atomic_directory(blocker / "sub" / "art"):
            pass


def test_manifest_states_the_io_contract_and_hashes(tmp_path):
    loaded = load_model("builtin:tiny")
    target = resolve_target(BuildConfig(), "pytorch-fp32")
    out = export_artifact(loaded, target, tmp_path / "art")
    m = read_manifest(out)
    assert m["max_context"] == target.max_context and m["prefill_lengths"] == list(target.prefill_lengths)
    assert m["model"]["vocab_size"] == 331 and m["model"]["bos_token_id"] == 1 and m["model"]["eos_token_ids"] == [2]
    assert m["kv_cache"]["shape"] == [1, 2, target.max_context, 16] and m["kv_cache"]["num_layers"] == 3
    assert set(m["entry_points"]) == {"prefill", "decode"} and m["tokenizer"] == "tokenizer.json"
    assert "torch" in m["toolchain"] and "safetensors" in m["toolchain"]
    for name, f in m["files"].items():
        assert f["sha256"] == sha256_file(out / name) and f["bytes"] == (out / name).stat().st_size
    assert set(m["files"]) == {"model.safetensors", "tokenizer.json"}


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import llmship.exporters.pytorch as exporter

    def boom(job):
        (job.out_dir / "model.safetensors").write_bytes(b"half")
        raise ValueError("converter exploded")

    monkeypatch.setattr(exporter, "export", boom)
    with pytest.raises(ExportError, match="pytorch-fp32: pytorch export failed: ValueError: converter exploded") as info:
        export_artifact(load_model("builtin:tiny"), resolve_target(BuildConfig(), "pytorch-fp32"), tmp_path / "art")
    assert info.value.exit_code == 4
    assert list(tmp_path.iterdir()) == []
    json.dumps(str(info.value))
