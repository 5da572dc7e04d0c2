"""The `executorch` format: one `model.pte` with `prefill` and `decode` over one KV cache, lowered to XNNPACK.

How it is built (the same route ExecuTorch's own LLM export takes, written against the canonical model):
- The canonical model's function is re-expressed for ExecuTorch (`ExecuTorchDecoder`, sharing its weights):
  the cache update and attention use ExecuTorch's LLM kernels `llama::update_cache` and `llama::custom_sdpa`
  (cache laid out [1, max_context, kv_heads, head_dim]; attention reads only positions < input_pos + T), and
  every reshape, norm and rotation is written in a form XNNPACK accepts with a dynamic length, so each layer
  lowers to one XNNPACK delegate instead of a dozen fragments.
- Weights come from the compression stage's record (llmship/compress/), on the grids `weight_plan` asks for:
  each recorded matrix becomes a torchao `IntxUnpackedToInt8Tensor` built from the record's codes and scales
  (no torchao parameter choice), which ExecuTorch lowers to XNNPACK's qd8 GEMMs (linears and the head: dynamic
  int8 activations, int4 group-wise or int8 per-channel weights) and, for the embedding's weight-only tensor,
  fuses into `quantized_decomposed::embedding_{4bit,byte}`. What each stores (verified by reading .pte files back):
    XNNPACK int4 (qb4w)        codes -8..7, one bf16 scale per group of a row: the grid's scales are bf16
    XNNPACK int8 (qc8w)        codes -128..127, one fp32 scale per output channel
    embedding_4bit / _byte     codes as the grid's, fp32 scales (so a tied matrix's bf16 scales stay exact)
  XNNPACK's lowering drops weight zero points silently, so every grid is symmetric. Its qd8 activation
  quantization is llmship.compress.activations.int8_per_token_asymmetric, bit for bit.
- Both entry points are exported with torch.export, lowered together with `to_edge_transform_and_lower`,
  and emitted with `share_mutable_buffers=True`: the caches are planned once (memory id 2) and every method
  reads and writes the same memory, so a prefill through one method is seen by decode through the other.
- Separate LoRA adapters (`adapters: {mode: separate}`) are two more methods of the same program, `prefill_lora` /
  `decode_lora`, whose inputs include every adapted linear's A^T and (s B)^T (adapters/inputs.py); each adapter
  ships as its own small file that an app passes to them. XNNPACK's named data is content-addressed, so the base
  weights every method reads are stored once.
- Metadata follows ExecuTorch's LLM runner: constant methods `get_max_seq_len`, `get_max_context_len`,
  `get_vocab_size`, `get_n_layers`, `get_bos_id`, `get_eos_ids`, `use_kv_cache`, `enable_dynamic_shape`, ...
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from llmship.adapters import inputs as lora_inputs
from llmship.adapters.branch import storage_dtype
from llmship.compress.grids import Grid, symmetric
from llmship.compress.plan import EMBEDDING, HEAD, matrix_shapes, module_rules, role, rule_variants
from llmship.errors import ConfigError
from llmship.exporters import ExportJob, ExportResult, tensor_spec
from llmship.models.decoder import causal_mask, ring_mask, windowed

PTE = "model.pte"
SELECT = ("ExecuTorch methods: \"prefill_lora\" / \"decode_lora\" (adapters.list[].methods) take the adapter's file as "
          "more inputs after (tokens, input_pos) (adapters.inputs.slots, A then B of each, padded with zeros to the "
          "slot's shape, zeros for a module the file lacks); \"prefill\" / \"decode\" run the bare base. Every method "
          "shares the KV cache, and XNNPACK's named data stores the base weights once for all of them.")
TIED_COPIES = 2  # a tied embedding/head is stored twice (the lookup's table and XNNPACK's head): what a budget counts
DEFAULT_GROUP = 32
INT4_GROUP_MULTIPLE = 32  # XNNPACK's int4 kernels read groups of a multiple of 32 inputs
# The activation scheme every quantized linear gets: XNNPACK's qd8 dynamic quantization (per token, asymmetric).
QD8 = {"scheme": "int8_per_token_asymmetric"}
# Bytes per scale in the .pte: XNNPACK stores int4 group scales as bf16 and int8 channel scales as fp32;
# the quantized embedding kernels keep fp32.
XNNPACK_SCALE_BYTES, EMBEDDING_SCALE_BYTES = {4: 2, 8: 4}, 4


# ---------------------------------------------------------------- the model, in ExecuTorch's terms

def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The mean over the last dim is written as a keepdim mean over dims (2, 3) of a 4-D view: the only
    # mean XNNPACK lowers (global average pooling). Every view uses -1 for the dynamic length because
    # XNNPACK rejects symbolic reshape sizes.
    d = x.shape[-1]
    ms = (x * x).view(1, -1, d, 1).mean((2, 3), keepdim=True).view(1, -1, *x.shape[2:-1], 1)
    return norm.scale() * (x * torch.rsqrt(ms + norm.eps))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # ExecuTorch 1.5's XNNPACK partitioner lowers gelu(approximate="tanh") to XNNPACK's exact (erf) GELU, up to 4.7e-4
    # off the function Gemma computes (measured here; fixed upstream by pytorch/executorch#22851, after the installed
    # release). Written out, the tanh form lowers to XNNPACK's tanh and is the function transformers computes.
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x))))


_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": _gelu_tanh}


def _rotate_half_matrix(head_dim: int, rope_dim: int) -> torch.Tensor:
    # rotate_half of the first rope_dim dims as a constant matmul: XNNPACK cannot slice a tensor of dynamic shape, it
    # can multiply it. The dims past rope_dim (Phi's partial rotary) map to zero, and the padded tables below give
    # them cos 1 and sin 0, so they pass through exactly.
    half = torch.arange(rope_dim // 2)
    r = torch.zeros(head_dim, head_dim)
    r[half, half + rope_dim // 2] = -1.0
    r[half + rope_dim // 2, half] = 1.0
    return r


def _padded(table: torch.Tensor, head_dim: int, value: float) -> torch.Tensor:
    pad = head_dim - table.shape[-1]
    return torch.cat((table, torch.full((table.shape[0], pad), value)), dim=-1) if pad else table.clone()


def _own_tables(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` with its own parameter, buffer and child tables: assigning a weight or a child
    on the copy leaves `module` as it was, and the tensors themselves are shared, not copied."""
    new = copy.copy(module)
    new._parameters, new._buffers, new._modules = dict(module._parameters), dict(module._buffers), dict(module._modules)
    return new


def _replaced(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """`root` with the submodules at these dotted paths replaced, `root` untouched: each module on a replaced path
    is an `_own_tables` copy, every other module is shared. (The job's decoder must not change, and a deep copy
    of a large model would double the export's memory for nothing.)"""
    if "" in replacements:
        return replacements[""]
    if not replacements:
        return root
    new = _own_tables(root)
    by_child: dict[str, dict[str, nn.Module]] = {}
    for path, module in replacements.items():
        child, _, rest = path.partition(".")
        by_child.setdefault(child, {})[rest] = module
    for child, below in by_child.items():
        new._modules[child] = _replaced(root._modules[child], below)
    for child, module in root._modules.items():  # a shared block at a second depth: the same replaced module
        owner = next((c for c in by_child if root._modules[c] is module), None)
        if owner is not None:
            new._modules[child] = new._modules[owner]
    return new


class ExecuTorchDecoder(nn.Module):
    """forward(tokens[1,T], input_pos[1]) -> logits[1,T,vocab]: the canonical model's function, with its
    weights (shared, not copied) except the modules in `replacements` (dotted path -> module, e.g. the quantized
    linears), caches as mutable buffers k_cache_i / v_cache_i [1, C, kv_heads, head_dim]."""

    def __init__(self, decoder, replacements: dict[str, nn.Module] | None = None):
        super().__init__()
        spec = decoder.spec
        self.spec, self.max_context = spec, decoder.max_context
        tree = _replaced(decoder, replacements or {})
        self.model, self.lm_head = tree.model, tree.lm_head
        self.register_buffer("rope_cos", _padded(decoder.rope_cos, spec.head_dim, 1.0), persistent=False)
        self.register_buffer("rope_sin", _padded(decoder.rope_sin, spec.head_dim, 0.0), persistent=False)
        self.local_rope = decoder.local_rope  # per layer: rotates by the local tables (Gemma 3's sliding layers)
        if any(self.local_rope):
            self.register_buffer("rope_cos_local", _padded(decoder.rope_cos_local, spec.head_dim, 1.0), persistent=False)
            self.register_buffer("rope_sin_local", _padded(decoder.rope_sin_local, spec.head_dim, 0.0), persistent=False)
        self.register_buffer("rotate_half", _rotate_half_matrix(spec.head_dim, spec.rope_dim), persistent=False)
        # per layer, the sliding window narrower than the cache (None: causal over the whole cache, custom_sdpa's own)
        self.windows = [w if w is not None and w < self.max_context else None for w in map(spec.window_of, range(spec.num_layers))]
        self.lengths = decoder.cache_lengths  # a sliding-window layer's ring buffer is shorter than max_context
        for i, rows in enumerate(self.lengths):
            self.register_buffer(f"k_cache_{i}", torch.zeros(1, rows, spec.num_kv_heads, spec.head_dim), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(1, rows, spec.num_kv_heads, spec.head_dim), persistent=False)

    def _rope(self, x, cos, sin):
        return x * cos + F.linear(x, self.rotate_half) * sin

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        t, hd = tokens.shape[1], self.spec.head_dim
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + t <= self.max_context)
        positions = input_pos + torch.arange(t, dtype=torch.int64)
        ropes = {False: (self.rope_cos[positions].view(1, -1, 1, hd), self.rope_sin[positions].view(1, -1, 1, hd))}
        if any(self.local_rope):
            ropes[True] = (self.rope_cos_local[positions].view(1, -1, 1, hd), self.rope_sin_local[positions].view(1, -1, 1, hd))
        causal = causal_mask(positions, self.max_context) if any(self.windows) else None  # only a windowed model needs it
        x = self.model.embed(tokens)
        rings = {}  # ring length -> (rows written, mask), computed once for the layers that share it
        for i, layer in enumerate(self.model.layers):
            cos, sin = ropes[self.local_rope[i]]
            att = layer.self_attn
            h = _rms_norm(layer.input_layernorm, x)
            q = att.q_proj(h).view(1, -1, att.num_heads, hd)
            k = att.k_proj(h).view(1, -1, att.num_kv_heads, hd)
            v = att.v_proj(h).view(1, -1, att.num_kv_heads, hd)
            if att.q_norm is not None:
                q, k = _rms_norm(att.q_norm, q), _rms_norm(att.k_norm, k)
            if att.q_scale is not None:
                q = q * att.q_scale
            if att.use_rope:
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            rows = self.lengths[i]
            if rows < self.max_context:  # a ring buffer: row = position mod rows, the mask from what each row holds
                if rows not in rings:
                    rings[rows] = (torch.remainder(positions, rows).view(1, -1), ring_mask(positions, rows, self.windows[i], torch.float32))
                slots, mask = rings[rows]
                torch.ops.llama.update_cache_with_indices(k, k_cache, 0, slots)
                torch.ops.llama.update_cache_with_indices(v, v_cache, 0, slots)
                o = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, 0, mask, 0, False)
            else:
                torch.ops.llama.update_cache(k, k_cache, start)
                torch.ops.llama.update_cache(v, v_cache, start)
                if self.windows[i] is None:
                    # Causal from `start`: query i sees cache positions 0..start+i, what the canonical mask allows.
                    o = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True)
                else:  # a window inside the cache: the canonical mask as an explicit [T, C] mask (start unused without is_causal)
                    o = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, windowed(causal, positions, self.windows[i]), 0, False)
            x = layer.attention_residual(x, att.o_proj(o.view(1, -1, att.num_heads * hd)), _rms_norm)
            x = layer.mlp_residual(x, _rms_norm, _ACTIVATIONS[self.spec.hidden_act])
        return self.lm_head(_rms_norm(self.model.norm, x))


# ---------------------------------------------------------------- the recipe: what XNNPACK holds, and the grids

def check(target, spec=None) -> None:
    """What XNNPACK's kernels hold: fp32, or int8 per channel / int4 in groups of a multiple of 32 with dynamic
    int8 activations (qd8 GEMMs); symmetric grids only (no zero points); an fp32 cache and fp32 compute. Every
    per-module rule is held to the same; with a spec, every rule must match a module of the model."""
    r, name = target.recipe, target.name
    if target.kv_cache_dtype != "fp32":
        raise ConfigError(f"{name}: kv_cache_dtype must be fp32 on executorch (llama::custom_sdpa reads the cache in the query's dtype)")
    if r.compute != "fp32":
        raise ConfigError(f"{name}: recipe.compute must be fp32 on executorch (the XNNPACK path here computes in fp32)")
    if r.activations not in ("fp32", "int8"):
        raise ConfigError(f"{name}: recipe.activations {r.activations} is not available on executorch "
                          "(fp32, or int8 with int8/int4 weights)")
    if r.weights == "int8" and r.group_size is not None:
        raise ConfigError(f"{name}: recipe.group_size: int8 weights are per-channel on XNNPACK; group_size applies to int4 only")
    variants = rule_variants(r)
    for kind, rule, where in variants:
        source = None if where == "recipe" else r.rules[int(where.split("[")[1].rstrip("]"))]
        weights_field = "recipe.embedding" if source is None and kind == "embedding" else f"{where}.weights"
        _check_rule(name, where, weights_field, rule)
        if kind == "linear" and rule.quantized and r.activations != "int8":
            raise ConfigError(
                f"{name}: recipe.activations must be int8 with {rule.weights} weights ({where}): XNNPACK keeps int4/int8 linear "
                "weights only with dynamic int8 activations (qd8 GEMMs); a weight-only linear is dequantized to fp32 at export, "
                "losing the size")
        # int8 is per channel here; a group size the user gives int8 weights is refused, one inherited from an
        # int4 recipe (a rule switching a module to int8) does not apply to it
        if kind == "linear" and rule.weights == "int8" and source is not None and "group_size" in source.model_fields_set \
                and source.group_size is not None:
            raise ConfigError(f"{name}: {where}.group_size: int8 weights are per-channel on XNNPACK; "
                              "group_size applies to int4 only")
    if r.activations == "int8" and not any(kind == "linear" and rule.quantized for kind, rule, _ in variants):
        raise ConfigError(f"{name}: recipe.activations int8 needs int8 or int4 weights")
    if spec is not None:
        for module, rule in module_rules(r, spec).items():  # rules combined on one module, which variants do not show
            _check_rule(name, f"recipe.rules (on {module})", f"recipe.rules (on {module}) weights", rule)


def _check_rule(name: str, where: str, weights_field: str, rule) -> None:
    if rule.weights not in ("fp32", "int8", "int4"):
        raise ConfigError(f"{name}: {weights_field} {rule.weights} is not available on executorch (fp32, int8, int4)")
    if rule.symmetric is False:
        raise ConfigError(f"{name}: {where}.symmetric false: XNNPACK's int4/int8 weights are symmetric (no zero points)")
    if rule.weights == "int4" and rule.group_size is not None and rule.group_size % INT4_GROUP_MULTIPLE:
        raise ConfigError(f"{name}: {where}.group_size {rule.group_size}: XNNPACK's int4 kernels need a multiple of "
                          f"{INT4_GROUP_MULTIPLE}")


def grid_for(rule, name: str, in_features: int, tied: bool) -> Grid | None:
    """The grid of one matrix (None: fp32). int8 is one scale per output channel (per row for the embedding):
    XNNPACK's qc8w, embedding_byte. int4 is groups of the rule's size (32 by default) with bf16 scales, XNNPACK's
    qb4w; a row the group does not divide falls back to int8 per channel (XNNPACK reads whole groups only), rather
    than to fp32 as ExecuTorch's own export does. An untied embedding is a lookup table only: fp32 scales
    (embedding_4bit), one group per row when the group does not divide it. A tied matrix is one tensor read by
    both the lookup and the XNNPACK head, so it gets the head's grid, whose bf16 scales the lookup holds exactly."""
    if not rule.quantized:
        return None
    if rule.weights == "int8":
        return symmetric(8, None)
    group = rule.group_size or DEFAULT_GROUP
    if name == EMBEDDING and not tied:
        return symmetric(4, group if in_features % group == 0 else None)
    if in_features % group:
        return symmetric(8, None)
    return symmetric(4, group, scale_dtype="bf16")


def weight_plan(target, spec) -> tuple[dict[str, Grid | None], dict[str, dict]]:
    """The grid of every matrix, and the activation quantization of every quantized linear (a tied head, which
    reads the embedding's tensor, is `lm_head`): XNNPACK's qd8 for all of them."""
    tied, shapes = spec.tie_word_embeddings, matrix_shapes(spec)
    grids = {name: grid_for(rule, name, shapes[name][1], tied) for name, rule in module_rules(target.recipe, spec).items()}
    activations = {name: dict(QD8) for name, grid in grids.items() if grid is not None and role(name) != "embedding"}
    if tied and grids[EMBEDDING] is not None:
        activations[HEAD] = dict(QD8)
    return grids, activations


def int8_fallbacks(recipe, spec, record) -> list[str]:
    """Linears whose rule asks for int4 but whose rows the group does not divide: int8 per channel instead."""
    rules = module_rules(recipe, spec)
    tensors = record.tensors if record is not None else {}
    return [name for name, t in tensors.items() if rules[name].weights == "int4" and t.grid.bits == 8]


# ---------------------------------------------------------------- the record, as torchao tensors

# The record's activation schemes in torchao's terms; "none" is a weight-only tensor (the embedding's lookup).
TORCHAO_ACTIVATIONS = {"int8_per_token_asymmetric": "int8_asym_per_token", "none": None}


def torchao_weight(t, activations: dict | None) -> torch.Tensor:
    """The record tensor `t` as the torchao tensor ExecuTorch lowers: its codes and scales as they are, zero
    points zero (symmetric grids), `activations` the record's scheme for the linear reading it (None: a lookup)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActivationQuantization,
    )

    grid, k = t.grid, t.shape[1]
    width = grid.group_width(k)
    signed = (-2 ** (grid.bits - 1), 2 ** (grid.bits - 1) - 1)
    if not grid.symmetric or grid.bits not in (4, 8) or k % width or grid.qmin < signed[0] or grid.qmax > signed[1]:
        raise RuntimeError(f"{t.name}: grid {grid.describe()} is not one ExecuTorch's quantized kernels hold "
                           "(weight_plan gives only those)")
    scheme = TORCHAO_ACTIVATIONS[(activations or {"scheme": "none"}).get("scheme", "none")]
    return IntxUnpackedToInt8Tensor(
        qdata=t.codes.to(torch.int8), scale=t.scale.float(), zero_point=torch.zeros(t.scale.shape, dtype=torch.int8),
        target_dtype=getattr(torch, f"int{grid.bits}"), block_size=(1, width), dtype=torch.float32,
        activation_quantization=None if scheme is None else ActivationQuantization(scheme))


def _check_xnnpack_scales(t) -> None:
    """XNNPACK rounds int4 group scales to bf16 when it serializes them: a record whose scales are not bf16 would
    not be what the runtime computes with, so refuse it instead of shipping something else."""
    if t.grid.bits == 4 and not torch.equal(t.scale, t.scale.to(torch.bfloat16).float()):
        raise RuntimeError(f"{t.name}: int4 scales are not bf16-representable; XNNPACK would store other weights "
                           "than the record's")


def _with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    new = _own_tables(module)
    new.weight = nn.Parameter(weight, requires_grad=False)
    return new


def quantized_modules(decoder, record) -> dict[str, nn.Module]:
    """Dotted path -> a copy of the decoder's module computing with the record's tensor: linears (and an untied
    head) with dynamic int8 activations, the embedding weight-only, and a tied head from the embedding's tensor."""
    if record is None:
        return {}

    def path(name: str) -> str:  # a linear with a separate adapter's branch beside it (adapters/inputs.py) is one level down
        return f"{name}.inner" if hasattr(decoder.get_submodule(name), "inner") else name

    out = {}
    for name, t in record.tensors.items():
        if name == EMBEDDING:
            out[name] = _with_weight(decoder.get_submodule(name), torchao_weight(t, None))
            if not decoder.spec.tie_word_embeddings:
                continue
            name = HEAD  # the tied head: the same record tensor, in XNNPACK
        _check_xnnpack_scales(t)
        out[path(name)] = _with_weight(decoder.get_submodule(path(name)), torchao_weight(t, record.activations.get(name)))
    return out


def quantization_notes(target, spec, record) -> dict:
    """What each role got, for the manifest (per-matrix grids are in the manifest's `compression`)."""
    def describe(t, activations: dict | None, kernel: str) -> str:
        g = t.grid
        scales = f"{'groups of ' + str(g.group_size) if g.group_size else 'one per row'}, {g.scale_dtype} scales"
        act = "weight-only" if activations is None else f"activations {activations.get('scheme', 'none')}"
        return f"int{g.bits} ({scales}), {act}: {kernel}"

    def kernel(t) -> str:
        return "XNNPACK qd8-f32-qb4w" if t.grid.bits == 4 else "XNNPACK qd8-f32-qc8w"

    tensors = record.tensors if record is not None else {}
    linears: dict[str, int] = {}
    for name in matrix_shapes(spec):
        if role(name) != "linear":
            continue
        t = tensors.get(name)
        key = "fp32 (XNNPACK f32 GEMM)" if t is None else describe(t, record.activations.get(name), kernel(t))
        linears[key] = linears.get(key, 0) + 1
    emb = tensors.get(EMBEDDING)
    embedding = "fp32 (aten.embedding)" if emb is None else describe(
        emb, None, f"quantized_decomposed::embedding_{'4bit' if emb.grid.bits == 4 else 'byte'} (stores fp32 scales)")
    head_t = emb if spec.tie_word_embeddings else tensors.get(HEAD)
    head = "fp32 (XNNPACK f32 GEMM)" if head_t is None else describe(head_t, record.activations.get(HEAD), kernel(head_t))
    if spec.tie_word_embeddings:
        head = f"tied: the embedding's record tensor ({EMBEDDING}); {head}"
    return {"from": "the compression record: codes and scales as recorded, no torchao parameter choice",
            "algorithm": record.algorithm if record is not None else None,
            "linears": linears, "lm_head": head, "embedding": embedding, "activations": target.recipe.activations,
            "int8_fallback": int8_fallbacks(target.recipe, spec, record)}


# ---------------------------------------------------------------- expected size

def _packed(n: int, k: int, bits: int) -> int:
    return n * ((k * bits + 7) // 8)  # rows packed separately (an odd int4 row ends in half a byte)


def _linear_bytes(n: int, k: int, t) -> int:
    if t is None:
        return 4 * n * k
    return _packed(n, k, t.grid.bits) + t.scale.numel() * XNNPACK_SCALE_BYTES[t.grid.bits]


def _embedding_bytes(n: int, k: int, t) -> int:
    if t is None:
        return 4 * n * k
    return _packed(n, k, t.grid.bits) + t.scale.numel() * EMBEDDING_SCALE_BYTES  # symmetric: no zero points


def expected_weight_bytes(spec, record, max_context: int) -> int:
    """Bytes the weights must take in the .pte for this record (None: all fp32): every linear once (methods
    share XNNPACK's content-addressed weights), the embedding table once, and the head once more even when
    tied (XNNPACK keeps its own copy, see the manifest's `tied_embedding`). Norms, biases, rope tables stay fp32."""
    tensors = record.tensors if record is not None else {}
    d, hd, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    shapes = matrix_shapes(spec)
    linears = sum(_linear_bytes(n, k, tensors.get(name)) for name, (n, k) in shapes.items() if name != EMBEDDING)
    if spec.tie_word_embeddings:
        linears += _linear_bytes(spec.vocab_size, d, tensors.get(EMBEDDING))
    biases = (q + 2 * kv if spec.qkv_bias else 0) + (d if spec.o_bias else 0) + ((2 * f + d) if spec.mlp_bias else 0)
    norms = (4 if spec.sandwich_norms else 2) * d + (2 * hd if spec.qk_norm else 0)
    tables = 2 if spec.local_rope_theta is not None and spec.sliding_window is not None else 1  # cos/sin per RoPE base
    rest = _embedding_bytes(spec.vocab_size, d, tensors.get(EMBEDDING)) + 4 * d + 4 * (tables * 2 * max_context * hd + hd * hd)
    return linears + len(spec.weight_layers) * 4 * (biases + norms) + rest


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


def _export_method(model: nn.Module, name: str, max_prefill: int, more: tuple = ()):
    """Method `name` of `model` (forward(tokens, input_pos, *more)): prefill with a dynamic length up to max_prefill."""
    from torch.export import Dim

    def args(t):
        return torch.zeros((1, t), dtype=torch.int64), torch.zeros((1,), dtype=torch.int64), *more

    with torch.no_grad():
        if name == "prefill" and max_prefill > 1:
            seq = Dim("seq_len", min=1, max=max_prefill)
            shapes = ({1: seq}, None, *(None for _ in more))
            shapes = (shapes,) if more else shapes  # WithLoraInputs takes (*args): one entry for all of them
            return torch.export.export(model, args(2), dynamic_shapes=shapes, strict=False)
        return torch.export.export(model, args(1), strict=False)


def build_pte(decoder, target, record, methods: tuple[str, ...] = ("prefill", "decode"), lora: list | None = None) -> tuple[bytes, dict]:
    """`decoder` with the record's tensors on its quantized modules (`decoder` itself unchanged), `methods`
    exported and lowered to XNNPACK, and with `lora` (adapters/inputs.py slots) the same methods again as
    `<method>_lora`, taking the slots' tensors as more inputs after (tokens, input_pos); (pte bytes, notes)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama:: ops)

    longest = max(target.prefill_lengths)
    model = ExecuTorchDecoder(decoder, quantized_modules(decoder, record)).eval()
    programs = {m: _export_method(model, m, longest) for m in methods}
    if lora:
        branched, fed = lora_inputs.with_inputs(decoder, lora)
        model = lora_inputs.taking_inputs(ExecuTorchDecoder(branched, quantized_modules(branched, record)), fed, lora).eval()
        more = tuple(lora_inputs.sample(lora).values())
        programs.update({lora_inputs.entry(m): _export_method(model, m, longest, more) for m in methods})
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
    delegates = {m: sum(1 for n in edge.exported_program(m).graph.nodes if n.op == "call_function"
                        and "call_delegate" in str(n.target)) for m in programs}
    return et.buffer, {"delegates": delegates}


def _entry_points(spec, target, lengths: list[int]) -> dict:
    cache = [tensor_spec(f"{kv}_cache_{i}", "float32", [1, rows, spec.num_kv_heads, spec.head_dim], "cache")
             for i, rows in enumerate(lengths) for kv in ("k", "v")]
    pos = tensor_spec("input_pos", "int64", [1], "positions")

    def entry(method: str, t) -> dict:
        return {"file": PTE, "method": method, "inputs": [tensor_spec("tokens", "int64", [1, t], "tokens"), pos],
                "outputs": [tensor_spec("logits", "float32", [1, t, spec.vocab_size], "logits")], "state": cache}

    return {"prefill": dict(entry("prefill", "T"), T=[1, max(target.prefill_lengths)]), "decode": entry("decode", 1)}


def export(job: ExportJob) -> ExportResult:
    target, spec, record = job.target, job.loaded.spec, job.record
    slots = lora_inputs.slots(job.decoder, job.loaded.lora) if job.loaded.lora else None
    pte, notes = build_pte(job.decoder, target, record, lora=slots)
    (job.out_dir / PTE).write_bytes(pte)
    adapters = {}
    if slots:
        dtype = storage_dtype(job.loaded.adapters["dtype"], target)
        adapters = {"files": lora_inputs.write_files(job.out_dir, job.loaded.lora, dtype), "dtype": dtype, "select": SELECT,
                    "inputs": {"rank": slots[0].rank, "slots": [s.manifest() for s in slots],
                               "order": "after tokens and input_pos, A then B of each slot in this order"},
                    "entries": {a.name: {"methods": {m: lora_inputs.entry(m) for m in ("prefill", "decode")}}
                                for a in job.loaded.lora}}
    expected = expected_weight_bytes(spec, record, target.max_context)
    tied = None
    if spec.tie_word_embeddings:
        tied = {"stored": "twice", "why": (
            "the embedding lookup runs outside XNNPACK (aten.embedding / quantized_decomposed.embedding_*) while the "
            "head runs inside it, and an XNNPACK delegate serializes its own copy of its weights; ExecuTorch shares "
            "a tied table only through torchao's shared-embedding kernels, which exclude XNNPACK and are not in this runtime")}
    kv_shape = [1, target.max_context, spec.num_kv_heads, spec.head_dim]
    return ExportResult(
        entry_points=_entry_points(spec, target, job.decoder.cache_lengths),
        kv_cache={"held_as": "state", "dtype": "float32", "layout": ["batch=1", "max_context", "num_kv_heads", "head_dim"],
                  "shape": kv_shape, "names": ["k_cache_{layer}", "v_cache_{layer}"],
                  "mechanism": "mutable buffers planned once and shared by every method (share_mutable_buffers)",
                  "reset": "start again at input_pos 0: attention reads only positions < input_pos + T, so stale "
                           "entries are never seen"},
        extra={"executorch": {
            "backend": "XnnpackBackend",
            "methods": ["prefill", "decode", *(lora_inputs.entry(m) for m in ("prefill", "decode") if slots)],
            "metadata_methods": metadata(spec, target),
            "kernels": ["llama::update_cache", "llama::custom_sdpa (extension/llm/custom_ops)"]
                       + (["quantized_decomposed::embedding_4bit / embedding_byte (kernels/quantized)"]
                          if record is not None and EMBEDDING in record.tensors else []),
            "quantization": quantization_notes(target, spec, record),
            "delegates": notes["delegates"],
            "expected_weight_bytes": expected,
            "tied_embedding": tied,
        }},
        adapters=adapters,
    )
