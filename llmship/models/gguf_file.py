"""GGUF files: metadata -> Hugging Face config, tensors dequantized to fp32 with Hugging Face names,
vocabulary -> a `tokenizers` tokenizer (through transformers' GGUF tokenizer converter)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from llmship.errors import ModelError
from llmship.models.loaded import LoadedModel, SourceBlocks
from llmship.models.spec import spec_from_config
from llmship.models.weights import check_weights

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}

# The GGUF architectures whose metadata llmship reads (SmolLM3's NoPE layers are read from config.json only).
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores llama q/k rows in interleaved-pair rope order; Hugging Face uses half-split order.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelError(f"unsupported architecture '{arch}' in GGUF; supported: {', '.join(GGUF_ARCHITECTURES)}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ModelError("GGUF with rope_freqs (llama3 rope scaling) is not supported; use the Hugging Face checkpoint")
    heads, hidden = _field(reader, f"{arch}.attention.head_count"), _field(reader, f"{arch}.embedding_length")
    for key, value in (("attention.head_count", heads), ("embedding_length", hidden), ("block_count", _field(reader, f"{arch}.block_count")),
                       ("feed_forward_length", _field(reader, f"{arch}.feed_forward_length"))):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"GGUF metadata {arch}.{key} is {'missing' if value is None else repr(value)}; it must be a positive integer")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    return {
        "model_type": arch,
        "architectures": [f"{arch} (GGUF)"],
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }


# GGUF block layouts llmship keeps as they are: bytes per block of 32 weights.
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def read_blocks(t) -> SourceBlocks | None:
    """The codes and scales of a Q4_0 / Q4_1 / Q8_0 tensor (rows = output channels), or None for other types."""
    kind = t.tensor_type.name
    if kind not in BLOCK_BYTES:
        return None
    rows = int(t.shape[-1])
    blocks = np.asarray(t.data, dtype=np.uint8).reshape(-1, BLOCK_BYTES[kind])
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    if kind == "Q8_0":
        codes, m = blocks[:, 2:34].copy().view(np.int8), None
    else:
        first = 4 if kind == "Q4_1" else 2
        qs = blocks[:, first:first + 16]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8)  # low nibbles: the block's first half
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0] if kind == "Q4_1" else None
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a.reshape(rows, -1)))  # noqa: E731
    return SourceBlocks(kind, 32, to(codes), to(d), None if m is None else to(m))


def _permute_rows(blocks: SourceBlocks, n_head: int) -> SourceBlocks:
    def rows(a):
        return torch.from_numpy(np.ascontiguousarray(_unpermute(a.numpy(), n_head)))
    return SourceBlocks(blocks.kind, blocks.block, rows(blocks.codes), rows(blocks.d), None if blocks.m is None else rows(blocks.m))


def load_gguf(path: Path, source: str):
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ModelError(f"cannot read GGUF {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__} (truncated or corrupt file?)") from None
    config = gguf_config(reader)
    spec = spec_from_config(config)
    weights: dict[str, torch.Tensor] = {}
    kept: dict[str, SourceBlocks] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        try:
            w = gguf.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except Exception as exc:
            raise ModelError(f"cannot dequantize GGUF tensor {t.name} ({t.tensor_type.name}): {exc}") from None
        w = w.reshape([int(n) for n in reversed(t.shape)])
        blocks = read_blocks(t) if w.ndim == 2 else None
        if spec.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = spec.num_heads if "q_proj" in name else spec.num_kv_heads
            w = _unpermute(w, heads)
            blocks = blocks and _permute_rows(blocks, heads)
        weights[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: F32 tensors are read-only memmaps
        if blocks is not None:
            kept[name.removesuffix(".weight")] = blocks
    tokenizer = gguf_tokenizer(path)
    check_weights(spec, weights, source, tokenizer)
    if spec.tie_word_embeddings:
        kept.pop("lm_head", None)
    return LoadedModel(source, config, spec, weights, tokenizer, (path,), kept)


def gguf_tokenizer(path: Path):
    """The GGUF's vocabulary as a `tokenizers` tokenizer, through transformers' converter. The converter adds
    GPT-2's `<|endoftext|>` when the vocabulary lacks it; an id past the GGUF's own token list has no row in the
    embedding, so such added tokens are dropped."""
    import json

    from tokenizers import Tokenizer
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    try:
        arch, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
        tokenizer, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    except Exception as exc:
        raise ModelError(f"cannot build a tokenizer from the vocabulary in {path}: {exc}") from None
    size = len(tokenizer_dict.get("tokens") or [])
    data = json.loads(tokenizer.to_str())
    extra = [t for t in data.get("added_tokens") or [] if size and t["id"] >= size]
    if extra:
        data["added_tokens"] = [t for t in data["added_tokens"] if t not in extra]
        tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer
