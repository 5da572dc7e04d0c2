"""Hugging Face checkpoint directories: config.json, safetensors weights (never pickle) and tokenizer.json;
a Hub id is read from the local cache only (llmship downloads nothing)."""
from __future__ import annotations

import json
from pathlib import Path

from llmship.errors import ModelError
from llmship.models.loaded import LoadedModel
from llmship.models.spec import spec_from_config
from llmship.models.weights import check_weights

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def hub_cache_dir(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise ModelError(
            f"'{repo_id}' is neither a local path nor in the Hugging Face cache, and llmship downloads no weights: "
            f"run `hf download {repo_id} --local-dir DIR` where there is network access, then pass DIR"
        ) from None


def read_json_object(file: Path, missing: str) -> dict:
    """A JSON file holding an object; ModelError `missing` when it is absent, one line naming the file otherwise."""
    if not file.is_file():
        raise ModelError(missing)
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{file} must hold a JSON object, not a {type(value).__name__}")
    return value


def read_config(path: Path) -> dict:
    return read_json_object(path / "config.json", f"{path} has no config.json: not a Hugging Face checkpoint directory")


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index} is unreadable: {exc}") from None
        missing = [s for s in shards if not isinstance(s, str) or not (path / s).is_file()]
        if missing:
            raise ModelError(f"{path} is missing weight shards listed in its index: {', '.join(map(str, missing))}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{path} has only pickle weights ({', '.join(pickles)}); llmship refuses them because unpickling "
            "can run arbitrary code. Convert the checkpoint to safetensors (save_pretrained(..., safe_serialization=True))"
        )
    raise ModelError(f"{path} has a config.json but no weights (*.safetensors)")


def read_safetensors(files: list[Path]) -> dict:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot read weights {f}: {str(exc).splitlines()[0]} (truncated or corrupt file?)") from None
    integer = sorted(k for k, v in weights.items() if not v.is_floating_point())
    if integer:
        raise ModelError(f"weight {integer[0]} is stored as {weights[integer[0]].dtype}, not a float type; "
                         "llmship reads float checkpoints (a quantized checkpoint needs its own loader)")
    return {k: v.float() for k, v in weights.items()}


def read_tokenizer(path: Path):
    from tokenizers import Tokenizer

    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelError(f"{path} has no tokenizer.json; llmship ships the model's fast tokenizer with every artifact")
    try:
        return Tokenizer.from_file(str(tok_file))
    except Exception as exc:
        raise ModelError(f"cannot read {tok_file}: {exc}") from None


def load_hf_dir(path: Path, source: str) -> LoadedModel:
    config = read_config(path)
    spec = spec_from_config(config)
    files = safetensors_files(path)
    weights = read_safetensors(files)
    # Checkpoints sometimes prefix names differently (e.g. no "model." for bare backbones).
    if not any(k.startswith("model.") for k in weights):
        weights = {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in weights.items()}
    tokenizer = read_tokenizer(path)
    check_weights(spec, weights, source, tokenizer)
    return LoadedModel(source, config, spec, weights, tokenizer, tuple([path / "config.json", *files]))
