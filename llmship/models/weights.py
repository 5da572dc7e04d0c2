"""The weights a spec implies, and the checks a loaded state dict must pass before it becomes a model."""
from __future__ import annotations

import torch

from llmship.errors import ModelError
from llmship.models.spec import ModelSpec


def weights_digest(weights: dict) -> str:
    """sha256 over every tensor's name and fp32 bytes: what keys a model's cached references and a pruned student."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode() + weights[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()


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
        if spec.sandwich_norms:
            shapes.update({p + "pre_feedforward_layernorm.weight": (d,), p + "post_feedforward_layernorm.weight": (d,)})
    return shapes


# Fused projections some families store (Phi-3: qkv_proj rows are q, k, v; gate_up_proj rows are gate, up) -> the
# canonical ones they hold, as functions of the spec giving each part's rows.
FUSED = {
    "self_attn.qkv_proj": {"self_attn.q_proj": lambda s: s.num_heads * s.head_dim,
                           "self_attn.k_proj": lambda s: s.num_kv_heads * s.head_dim,
                           "self_attn.v_proj": lambda s: s.num_kv_heads * s.head_dim},
    "mlp.gate_up_proj": {"mlp.gate_proj": lambda s: s.intermediate_size, "mlp.up_proj": lambda s: s.intermediate_size},
}


def fused_parts(spec: ModelSpec, module: str) -> dict[str, int] | None:
    """{canonical module: rows} that a fused module (model.layers.N.self_attn.qkv_proj, ...) holds, in row order;
    None for a module that is not fused."""
    for kind, parts in FUSED.items():
        if module.endswith("." + kind):
            prefix = module[: -len(kind)]
            return {prefix + name: rows(spec) for name, rows in parts.items()}
    return None


def split_fused(spec: ModelSpec, weights: dict[str, torch.Tensor], source: str) -> None:
    """Replace each fused projection by the canonical ones (row slices of it, so each is stored once)."""
    for name in list(weights):
        parts = fused_parts(spec, name.removesuffix(".weight")) if name.endswith(".weight") else None
        if parts is None:
            continue
        fused = weights[name]
        if fused.dim() != 2 or fused.shape[0] != sum(parts.values()):
            raise ModelError(f"{source}: {name} is {tuple(fused.shape)}, not the {sum(parts.values())} rows "
                             "config.json gives its parts")
        for part, part_weight in zip(parts, fused.split(list(parts.values()))):
            weights[f"{part}.weight"] = part_weight  # a view: the fused tensor's rows, not a copy
        del weights[name]


def check_weights(spec: ModelSpec, weights: dict[str, torch.Tensor], source: str, tokenizer=None) -> None:
    """Names, shapes, values and the tokenizer must fit the spec; fused projections are split into the canonical
    ones; a tied lm_head equal to the embedding is dropped."""
    split_fused(spec, weights, source)
    expected = expected_weight_shapes(spec)
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(f"{source}: weights missing for {', '.join(missing[:3])}{more}")
    wrong = [f"{k} {tuple(weights[k].shape)} (config says {s})" for k, s in expected.items() if tuple(weights[k].shape) != s]
    if wrong:
        raise ModelError(f"{source}: weight shapes do not match config.json: {wrong[0]}")
    for name in expected:
        if not bool(torch.isfinite(weights[name]).all()):
            raise ModelError(f"{source}: weight {name} holds NaN or infinite values")
    if spec.tie_word_embeddings and "lm_head.weight" in weights:
        if not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"]):
            raise ModelError(f"{source}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
        del weights["lm_head.weight"]
    if tokenizer is not None:
        ids = tokenizer.get_vocab_size(with_added_tokens=True)
        if ids > spec.vocab_size:
            raise ModelError(f"{source}: the tokenizer has {ids} token ids but the model's vocab_size is {spec.vocab_size}; "
                             "ids beyond the embedding would have no logits")
