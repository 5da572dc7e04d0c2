"""LiteRT-LM bundle (`.litertlm`) of a LiteRT artifact, for apps that generate with LiteRT-LM's engine.

LiteRT-LM runs the `tflite` format's model as it is: it calls the `decode` signature and any `prefill*`
signature, finds `tokens` / `input_pos` / `logits` by name, and binds each `k_cache_{i}` / `v_cache_{i}`
input and output to one buffer, so the cache is updated in place. The bundle adds what its engine reads
besides the model: the tokenizer (tokenizer.json) and an LlmMetadata record (start token = BOS, stop tokens
= EOS ids, max tokens = max_context). It is built with LiteRT-LM's own builder (`litert-lm-builder`).

The bundle is made from a built artifact directory, after its files are checked against the manifest, and
holds model.tflite byte for byte: the model LiteRT-LM runs is the file llmship validated.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from llmship.errors import ConfigError, ModelError, require
from llmship.manifest import artifact_file, check_integrity, read_manifest

# The first bytes of every .litertlm file (LiteRT-LM's container header): what marks a file as a bundle llmship
# may replace.
MAGIC = b"LITERTLM"


def check_bundle_output(out: Path) -> None:
    """Refuse (exit 2) to write the bundle over anything but an earlier bundle."""
    if out.is_symlink() or out.is_dir():
        raise ConfigError(f"--out {out} is a directory or a symlink; name the .litertlm file to write")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ConfigError(f"--out {out} exists and is not a LiteRT-LM bundle; llmship will not replace it")


def bundle(artifact_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `<artifact_dir>.litertlm` (or `out`) from a LiteRT artifact; returns its path."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    if manifest["format"] != "tflite":
        raise ConfigError(f"{artifact_dir}: a LiteRT-LM bundle is made from a tflite artifact, this one is '{manifest['format']}'")
    out = Path(out) if out else artifact_dir.with_suffix(".litertlm")
    check_bundle_output(out)
    model_file = artifact_file(artifact_dir, manifest, manifest["entry_points"]["decode"]["file"])
    tokenizer_file = artifact_file(artifact_dir, manifest, manifest["tokenizer"])
    integrity = check_integrity(artifact_dir, manifest)
    if integrity["mismatched"]:
        raise ModelError(f"{artifact_dir}: files differ from the manifest ({', '.join(integrity['mismatched'])}); rebuild the artifact")
    lb = require("litert_lm_builder.litertlm_builder", "LiteRT-LM builder", "pip install litert-lm-builder==0.18.1")
    core = require("litert_lm_builder.litertlm_core", "LiteRT-LM builder", "pip install litert-lm-builder==0.18.1")
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    model = manifest["model"]
    meta = llm_metadata_pb2.LlmMetadata()
    if model.get("bos_token_id") is not None:
        meta.start_token.token_ids.ids.append(int(model["bos_token_id"]))
    for eos in model.get("eos_token_ids") or []:
        meta.stop_tokens.add().token_ids.ids.append(int(eos))
    meta.max_num_tokens = int(manifest["max_context"])
    meta.llm_model_type.generic_model.SetInParent()
    meta.supports_thinking = False
    meta.supports_function_calling = False

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        meta_file, partial = Path(tmp) / "llm_metadata.pb", Path(tmp) / out.name
        meta_file.write_bytes(meta.SerializeToString())
        builder = lb.LitertLmFileBuilder()
        builder.add_system_metadata(lb.Metadata(key="Authors", value="llmship", dtype=lb.DType.STRING))
        builder.add_llm_metadata(str(meta_file))
        builder.add_tflite_model(str(model_file), lb.TfLiteModelType.PREFILL_DECODE)
        builder.add_hf_tokenizer(str(tokenizer_file))
        with core.open_file(str(partial), "wb") as f:
            builder.build(f, validate_metadata=True)
        partial.replace(out)  # complete or absent, never half-written
    return out
