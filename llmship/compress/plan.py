"""Which precision every quantizable matrix gets: the recipe's fields, then its per-module rules.

Quantizable matrices are the layers' seven projections, the embedding (`model.embed_tokens`, which a tied head
reads too) and an untied head (`lm_head`). The recipe-wide `weights` / `group_size` / `symmetric` apply to the
projections and an untied head; `embedding` sets the embedding's precision ("same": the projections'). Rules
(`recipe.rules`) then override, in order, the fields they set, on the modules their regular expression finds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from llmship.errors import ConfigError

EMBEDDING, HEAD = "model.embed_tokens", "lm_head"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QUANTIZED = ("int8", "int4", "pal4")  # precisions the compression stage puts on an integer grid or a palette


@dataclass(frozen=True)
class ModuleRule:
    weights: str  # fp32 | fp16 | int8 | int4 | pal4
    group_size: int | None
    symmetric: bool | None  # None: the runtime's default grid

    @property
    def quantized(self) -> bool:
        return self.weights in QUANTIZED


def matrix_shapes(spec) -> dict[str, tuple[int, int]]:
    """Every quantizable matrix [out, in] by module name, in model order."""
    d, f, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    per_layer = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                 "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    shapes = {EMBEDDING: (spec.vocab_size, d)}
    for i in spec.weight_layers:  # a shared block's matrices once, under its first layer
        shapes.update({f"model.layers.{i}.{p}": s for p, s in per_layer.items()})
    if not spec.tie_word_embeddings:
        shapes[HEAD] = (spec.vocab_size, d)
    return shapes


def module_uses(spec, name: str) -> list[str]:
    """The module paths that run matrix `name`: itself, and the same projection at each depth that shares its block."""
    if not name.startswith("model.layers.") or spec.shared_layers is None:
        return [name]
    index, rest = name[len("model.layers."):].split(".", 1)
    return [f"model.layers.{j}.{rest}" for j in range(spec.num_layers) if spec.owner_of(j) == int(index)]


def role(name: str) -> str:
    return "embedding" if name == EMBEDDING else "lm_head" if name == HEAD else "linear"


def default_rules(recipe) -> tuple[ModuleRule, ModuleRule]:
    """(projections and untied head, embedding) before any per-module rule."""
    linear = ModuleRule(recipe.weights, recipe.group_size, recipe.symmetric)
    embedding = linear if recipe.embedding == "same" else ModuleRule(recipe.embedding, recipe.group_size, recipe.symmetric)
    return linear, embedding


def apply_rule(current: ModuleRule, rule) -> ModuleRule:
    return replace(current, **{k: getattr(rule, k) for k in ("weights", "group_size", "symmetric") if k in rule.model_fields_set})


# Module names of any model up to this depth: enough to tell, without a model, which roles a rule can reach.
SAMPLE_NAMES = {"embedding": [EMBEDDING], "linear": [f"model.layers.{i}.{p}" for i in range(256) for p in PROJECTIONS] + [HEAD]}


def rule_variants(recipe) -> list[tuple[str, ModuleRule, str]]:
    """Every (role, rule, where it comes from) a recipe can produce, without a model: what a runtime's `check` must
    accept. A rule is checked for the roles its pattern can reach (an embedding-only rule is not held to the
    linears' limits). `where` is "recipe" or "recipe.rules[i]", for error messages."""
    linear, embedding = default_rules(recipe)
    out = [("linear", linear, "recipe"), ("embedding", embedding, "recipe")]
    for i, rule in enumerate(recipe.rules):
        for r, base in (("linear", linear), ("embedding", embedding)):
            if any(re.search(rule.match, n) for n in SAMPLE_NAMES[r]):
                out.append((r, apply_rule(base, rule), f"recipe.rules[{i}]"))
    return out


def module_rules(recipe, spec) -> dict[str, ModuleRule]:
    """The precision of every quantizable matrix of a model of `spec`."""
    linear, embedding = default_rules(recipe)
    rules = {name: (embedding if role(name) == "embedding" else linear) for name in matrix_shapes(spec)}
    for i, rule in enumerate(recipe.rules):
        hits = [name for name in rules if re.search(rule.match, name)]
        if not hits:
            raise ConfigError(f"recipe.rules[{i}].match {rule.match!r} matches no module of this model "
                              f"(modules look like {EMBEDDING}, model.layers.0.mlp.down_proj, {HEAD})")
        for name in hits:
            rules[name] = apply_rule(rules[name], rule)
    return rules
