"""The `executorch` format: one `model.pte` with `prefill` and `decode` over one KV cache, lowered to XNNPACK.

How it is built (the same route ExecuTorch's own LLM export takes, written against the canonical model):
- The canonical model's function is re-expressed for ExecuTorch (`ExecuTorchDecoder`, sharing its weights):
  the cache update and attention use ExecuTorch's LLM kernels `llama::update_cache` and `llama::custom_sdpa`
  (cache laid out [1, max_context, kv_heads, head_dim]; attention reads only positions < input_pos + T), and
  every reshape, norm and rotation is written in a form XNNPACK accepts with a dynamic length, so each layer
  lowers to one XNNPACK delegate instead of a dozen fragments.
- Quantization is torchao's `quantize_` before export: linears get dynamic int8 activations with int4
  group-wise or int8 per-channel weights (XNNPACK's qd8 GEMMs); the embedding gets weight-only int4/int8,
  which ExecuTorch's quant fusion turns into `quantized_decomposed::embedding_{4bit,byte}`.
- Both entry points are exported with torch.export, lowered together with `to_edge_transform_and_lower`,
  and emitted with `share_mutable_buffers=True`: the caches are planned once (memory id 2) and every method
  reads and writes the same memory, so a prefill through one method is seen by decode through the other.
- Metadata follows ExecuTorch's LLM runner: constant methods `get_max_seq_len`, `get_max_context_len`,
  `get_vocab_size`, `get_n_layers`, `get_bos_id`, `get_eos_ids`, `use_kv_cache`, `enable_dynamic_shape`, ...
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from llmship.errors import ConfigError
from llmship.exporters import ExportJob, ExportResult, tensor_spec

PTE = "model.pte"
DEFAULT_GROUP = 32
# How torchao picks the scales: HQQ's scale-only search, as ExecuTorch's LLM export does by default.
QPARAMS_ALGORITHM = "hqq_scale_only"
# ExecuTorch's XNNPACK serializer stores group-wise scales as bf16; per-channel scales as fp32.
GROUP_SCALE_BYTES, CHANNEL_SCALE_BYTES = 2, 4


# ---------------------------------------------------------------- the model, in ExecuTorch's terms

def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The mean over the last dim is written as a keepdim mean over dims (2, 3) of a 4-D view: the only
    # mean XNNPACK lowers (global average pooling). Every view uses -1 for the dynamic length because
    # XNNPACK rejects symbolic reshape sizes.
    d = x.shape[-1]
    ms = (x * x).view(1, -1, d, 1).mean((2, 3), keepdim=True).view(1, -1, *x.shape[2:-1], 1)
    return norm.weight * (x * torch.rsqrt(ms + norm.eps))


def _rotate_half_matrix(head_dim: int) -> torch.Tensor:
    # rotate_half as a constant matmul: XNNPACK cannot slice a tensor of dynamic shape, it can multiply it.
    half = torch.arange(head_dim // 2)
    r = torch.zeros(head_dim, head_dim)
    r[half, half + head_dim // 2] = -1.0
    r[half + head_dim // 2, half] = 1.0
    return r


class ExecuTorchDecoder(nn.Module):
    """forward(tokens[1,T], input_pos[1]) -> logits[1,T,vocab]: the canonical model's function, with its
    weights (shared, not copied), caches as mutable buffers k_cache_i / v_cache_i [1, C, kv_heads, head_dim]."""

    def __init__(self, decoder):
        super().__init__()
        spec = decoder.spec
        self.spec, self.max_context = spec, decoder.max_context
        self.model, self.lm_head = decoder.model, decoder.lm_head
        self.register_buffer("rope_cos", decoder.rope_cos.clone(), persistent=False)
        self.register_buffer("rope_sin", decoder.rope_sin.clone(), persistent=False)
        self.register_buffer("rotate_half", _rotate_half_matrix(spec.head_dim), persistent=False)
        shape = (1, decoder.max_context, spec.num_kv_heads, spec.head_dim)
        for i in range(spec.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def _rope(self, x, cos, sin):
        return x * cos + F.linear(x, self.rotate_half) * sin

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        t, hd = tokens.shape[1], self.spec.head_dim
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + t <= self.max_context)
        positions = input_pos + torch.arange(t, dtype=torch.int64)
        cos = self.rope_cos[positions].view(1, -1, 1, hd)
        sin = self.rope_sin[positions].view(1, -1, 1, hd)
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            att, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(layer.input_layernorm, x)
            q = att.q_proj(h).view(1, -1, att.num_heads, hd)
            k = att.k_proj(h).view(1, -1, att.num_kv_heads, hd)
            v = att.v_proj(h).view(1, -1, att.num_kv_heads, hd)
            if att.q_norm is not None:
                q, k = _rms_norm(att.q_norm, q), _rms_norm(att.k_norm, k)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            torch.ops.llama.update_cache(k, k_cache, start)
            torch.ops.llama.update_cache(v, v_cache, start)
            # Causal from `start`: query i sees cache positions 0..start+i, what the canonical mask allows.
            o = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True)
            x = x + att.o_proj(o.view(1, -1, att.num_heads * hd))
            h = _rms_norm(layer.post_attention_layernorm, x)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return self.lm_head(_rms_norm(self.model.norm, x))


# ---------------------------------------------------------------- the recipe, as a quantization plan

@dataclass(frozen=True)
class WeightQuant:
    bits: int  # 4 or 8
    group: int | None  # None: one scale per output channel (row)


@dataclass(frozen=True)
class QuantPlan:
    """What each weight role becomes; None keeps it fp32. `linears` are the layers' projections."""

    linears: WeightQuant | None = None
    lm_head: WeightQuant | None = None  # dynamic int8 activations, like the linears
    embedding: WeightQuant | None = None  # weight-only (a table lookup has no activations)


def check(target, spec=None) -> None:
    """What XNNPACK's kernels hold: fp32, or int8 per channel / int4 in groups of a multiple of 32 with dynamic
    int8 activations (qd8 GEMMs); symmetric grids only (no zero points); an fp32 cache and fp32 compute."""
    r, name = target.recipe, target.name
    if target.kv_cache_dtype != "fp32":
        raise ConfigError(f"{name}: kv_cache_dtype must be fp32 on executorch (llama::custom_sdpa reads the cache in the query's dtype)")
    if r.compute != "fp32":
        raise ConfigError(f"{name}: recipe.compute must be fp32 on executorch (the XNNPACK path here computes in fp32)")
    if r.weights not in ("fp32", "int8", "int4"):
        raise ConfigError(f"{name}: recipe.weights {r.weights} is not available on executorch (fp32, int8, int4)")
    if r.symmetric is False:
        raise ConfigError(f"{name}: recipe.symmetric false: XNNPACK's int4/int8 weights are symmetric (no zero points)")
    if r.weights == "int4" and r.group_size is not None and r.group_size % 32:
        raise ConfigError(f"{name}: recipe.group_size {r.group_size}: XNNPACK's int4 kernels need a multiple of 32")
    if r.weights == "int8" and r.group_size is not None:
        raise ConfigError(f"{name}: recipe.group_size: int8 weights are per-channel on XNNPACK; group_size applies to int4 only")
    if r.weights == "fp32" and r.activations != "fp32":
        raise ConfigError(f"{name}: recipe.activations int8 needs int8 or int4 weights")
    if r.weights in ("int4", "int8") and r.activations != "int8":
        raise ConfigError(
            f"{name}: recipe.activations must be int8 with {r.weights} weights: XNNPACK keeps int4/int8 linear weights only "
            "with dynamic int8 activations (qd8 GEMMs); a weight-only linear is dequantized to fp32 at export, losing the size")
    if r.embedding not in ("same", "fp32", "int8", "int4"):
        raise ConfigError(f"{name}: recipe.embedding {r.embedding} is not available on executorch (fp32, int8, int4)")


def _weight_quant(precision: str, group_size: int | None) -> WeightQuant | None:
    if precision == "fp32":
        return None
    return WeightQuant(4, group_size or DEFAULT_GROUP) if precision == "int4" else WeightQuant(8, None)


def quant_plan(recipe, spec) -> QuantPlan:
    """Map a (checked) Recipe onto XNNPACK's kernels."""
    linears = _weight_quant(recipe.weights, recipe.group_size)
    emb_precision = recipe.weights if recipe.embedding == "same" else recipe.embedding
    embedding = _weight_quant(emb_precision, recipe.group_size)
    # The tied head has the embedding's precision; an untied head is one more linear.
    head = embedding if spec.tie_word_embeddings else linears
    return QuantPlan(linears, head, embedding)


def linear_quant(q: WeightQuant, in_features: int) -> WeightQuant:
    """What a linear of `in_features` inputs actually gets. XNNPACK's int4 kernels need whole groups (a
    "per-channel" int4 is a group of the whole row, which must be a multiple of 32 too), so a row the group
    does not divide falls back to int8 per channel rather than to fp32 as ExecuTorch's own export does."""
    if q.bits == 4 and in_features % q.group:
        return WeightQuant(8, None)
    return q


def _granularity(group: int | None):
    from torchao.quantization.granularity import PerAxis, PerGroup

    return PerGroup(group) if group is not None else PerAxis(0)


def apply_quant(model: ExecuTorchDecoder, plan: QuantPlan, algorithm: str = QPARAMS_ALGORITHM) -> dict:
    """Quantize `model` in place with torchao; returns what was done (for the manifest)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_

    done: dict = {"int8_fallback": []}

    def quantize_linear(module: nn.Linear, q: WeightQuant, name: str) -> None:
        actual = linear_quant(q, module.in_features)
        if actual != q:
            done["int8_fallback"].append(name)
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=getattr(torch, f"int{actual.bits}"),
                                                       weight_granularity=_granularity(actual.group),
                                                       intx_choose_qparams_algorithm=algorithm)
        quantize_(module, config, filter_fn=None)

    with torch.no_grad():
        if plan.linears is not None:
            for name, module in list(model.model.layers.named_modules()):
                if isinstance(module, nn.Linear):
                    quantize_linear(module, plan.linears, f"layers.{name}")
        if plan.lm_head is not None:
            quantize_linear(model.lm_head, plan.lm_head, "lm_head")
        if plan.embedding is not None:
            # quantize_ swaps in a new parameter, so a tied head left fp32 keeps the old one.
            emb, q = model.model.embed_tokens, plan.embedding
            group = q.group if q.group is not None and emb.embedding_dim % q.group == 0 else None
            config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{q.bits}"), granularity=_granularity(group),
                                          intx_choose_qparams_algorithm=algorithm)
            quantize_(emb, config, filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    return done


# ---------------------------------------------------------------- expected size

def _linear_bytes(out_f: int, in_f: int, q: WeightQuant | None) -> int:
    if q is None:
        return 4 * out_f * in_f
    q = linear_quant(q, in_f)
    scales = out_f * (in_f // q.group) * GROUP_SCALE_BYTES if q.group else out_f * CHANNEL_SCALE_BYTES
    return out_f * in_f * q.bits // 8 + scales


def _embedding_bytes(vocab: int, dim: int, q: WeightQuant | None) -> int:
    if q is None:
        return 4 * vocab * dim
    group = q.group if q.group is not None and dim % q.group == 0 else dim
    return vocab * dim * q.bits // 8 + 4 * vocab * (dim // group)  # fp32 scales, symmetric: no zero points


def expected_weight_bytes(spec, plan: QuantPlan, max_context: int) -> int:
    """Bytes the weights must take in the .pte for this plan: every linear once (methods share XNNPACK's
    content-addressed weights), the embedding table once, and the head once more even when tied (XNNPACK
    keeps its own copy, see the manifest's `tied_embedding`). Norms, biases, rope tables stay fp32."""
    d, hd = spec.hidden_size, spec.head_dim
    q, kv, f = spec.num_heads * hd, spec.num_kv_heads * hd, spec.intermediate_size
    shapes = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]
    per_layer = sum(_linear_bytes(o, i, plan.linears) for o, i in shapes)
    biases = (q + 2 * kv if spec.qkv_bias else 0) + (d if spec.o_bias else 0) + ((2 * f + d) if spec.mlp_bias else 0)
    norms = 2 * d + (2 * hd if spec.qk_norm else 0)
    per_layer += 4 * (biases + norms)
    head = _linear_bytes(spec.vocab_size, d, plan.lm_head)
    rest = _embedding_bytes(spec.vocab_size, d, plan.embedding) + 4 * d + 4 * (2 * max_context * hd + hd * hd)
    return spec.num_layers * per_layer + head + rest


def size_tolerance(spec, expected: int) -> int:
    """Allowed bytes beyond the weights: the program and delegate flatbuffers (a few KB per delegate,
    one delegate per layer per method) plus 2% for alignment padding."""
    return 24_000 * (spec.num_layers + 2) + expected // 50


def pte_weight_bytes(pte: bytes) -> int:
    """Bytes of weight data a .pte holds: XNNPACK's named data (content-addressed, so shared by methods)
    plus the program's own constants (embedding table, norms, rope tables)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    parsed = deserialize_pte_binary(pte)
    named = sum(len(b) for b in parsed.named_data.buffers) if parsed.named_data is not None else 0
    return named + sum(len(b.storage) for b in parsed.program.constant_buffer)


# ---------------------------------------------------------------- export

def metadata(spec, target) -> dict:
    """Constant methods named as ExecuTorch's LLM runner reads them (extension/llm/runner/constants.h)."""
    meta = {
        "get_max_seq_len": max(target.prefill_lengths),  # longest token chunk one call accepts
        "get_max_context_len": target.max_context,
        "get_vocab_size": spec.vocab_size,
        "get_n_layers": spec.num_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,  # ExecuTorch's name for custom_sdpa + update_cache
        "enable_dynamic_shape": max(target.prefill_lengths) > 1,
    }
    if spec.bos_token_id is not None:
        meta["get_bos_id"] = int(spec.bos_token_id)
    if spec.eos_token_ids:
        meta["get_eos_ids"] = [int(e) for e in spec.eos_token_ids]
    return meta


def _export_method(model: ExecuTorchDecoder, name: str, max_prefill: int):
    from torch.export import Dim

    def args(t):
        return torch.zeros((1, t), dtype=torch.int64), torch.zeros((1,), dtype=torch.int64)

    with torch.no_grad():
        if name == "prefill" and max_prefill > 1:
            seq = Dim("seq_len", min=1, max=max_prefill)
            return torch.export.export(model, args(2), dynamic_shapes=({1: seq}, None), strict=False)
        return torch.export.export(model, args(1), strict=False)


def build_pte(decoder, target, plan: QuantPlan, methods: tuple[str, ...] = ("prefill", "decode")) -> tuple[bytes, dict]:
    """Quantize a copy of `decoder` per `plan`, export `methods`, lower to XNNPACK; (pte bytes, notes)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama:: ops)

    model = ExecuTorchDecoder(copy.deepcopy(decoder)).eval()
    notes = apply_quant(model, plan)
    programs = {m: _export_method(model, m, max(target.prefill_lengths)) for m in methods}
    edge = to_edge_transform_and_lower(
        programs,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=metadata(decoder.spec, target),
    )
    et = edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,  # fuses dequantize + embedding into embedding_4bit / embedding_byte
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
        emit_mutable_buffer_names=True,
    ))
    notes["delegates"] = {m: sum(1 for n in edge.exported_program(m).graph.nodes if n.op == "call_function"
                                 and "call_delegate" in str(n.target)) for m in programs}
    return et.buffer, notes


def _entry_points(spec, target) -> dict:
    cache = [tensor_spec(f"{kv}_cache_{i}", "float32", [1, target.max_context, spec.num_kv_heads, spec.head_dim], "cache")
             for i in range(spec.num_layers) for kv in ("k", "v")]
    pos = tensor_spec("input_pos", "int64", [1], "positions")

    def entry(method: str, t) -> dict:
        return {"file": PTE, "method": method, "inputs": [tensor_spec("tokens", "int64", [1, t], "tokens"), pos],
                "outputs": [tensor_spec("logits", "float32", [1, t, spec.vocab_size], "logits")], "state": cache}

    return {"prefill": dict(entry("prefill", "T"), T=[1, max(target.prefill_lengths)]), "decode": entry("decode", 1)}


def export(job: ExportJob) -> ExportResult:
    target, spec = job.target, job.loaded.spec
    plan = quant_plan(target.recipe, spec)
    pte, notes = build_pte(job.decoder, target, plan)
    (job.out_dir / PTE).write_bytes(pte)
    expected = expected_weight_bytes(spec, plan, target.max_context)
    tied = None
    if spec.tie_word_embeddings:
        tied = {"stored": "twice", "why": (
            "the embedding lookup runs outside XNNPACK (aten.embedding / quantized_decomposed.embedding_*) while the "
            "head runs inside it, and an XNNPACK delegate serializes its own copy of its weights; ExecuTorch shares "
            "a tied table only through torchao's shared-embedding kernels, which exclude XNNPACK and are not in this runtime")}
    kv_shape = [1, target.max_context, spec.num_kv_heads, spec.head_dim]
    return ExportResult(
        entry_points=_entry_points(spec, target),
        kv_cache={"held_as": "state", "dtype": "float32", "layout": ["batch=1", "max_context", "num_kv_heads", "head_dim"],
                  "shape": kv_shape, "names": ["k_cache_{layer}", "v_cache_{layer}"],
                  "mechanism": "mutable buffers planned once and shared by every method (share_mutable_buffers)",
                  "reset": "start again at input_pos 0: attention reads only positions < input_pos + T, so stale "
                           "entries are never seen"},
        extra={"executorch": {
            "backend": "XnnpackBackend",
            "metadata_methods": metadata(spec, target),
            "kernels": ["llama::update_cache", "llama::custom_sdpa (extension/llm/custom_ops)"]
                       + (["quantized_decomposed::embedding_4bit / embedding_byte (kernels/quantized)"] if plan.embedding else []),
            "quantization": {"plan": asdict(plan), "activations": target.recipe.activations,
                             "int8_fallback": notes["int8_fallback"]},
            "delegates": notes["delegates"],
            "expected_weight_bytes": expected,
            "tied_embedding": tied,
        }},
    )
