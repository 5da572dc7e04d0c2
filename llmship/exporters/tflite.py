"""The `tflite` format: one LiteRT model `model.tflite` with signatures `prefill_<T>` (one per prefill length)
and `decode`, the KV cache passed in and out of every signature.

How it is built:
1. The canonical model's functional entry point (`MobileDecoder.forward_with_cache`: caches in, caches out)
   is wrapped so each signature has named inputs `tokens` [1, T] int32, `input_pos` [T] int32,
   `k_cache_<i>`/`v_cache_<i>` and named outputs `logits` [1, T, vocab] plus the updated caches under the
   same names. An app feeds a signature's cache outputs straight into the next call's cache inputs.
2. litert_torch traces every signature with its own static shapes (`signature(...).signature(...)`), lowers
   them into one flatbuffer and merges them: the weights are constants shared by every signature's
   subgraph, so they are stored once however many prefill lengths there are.
3. The weights are the compression record's (llmship/compress/), written by ai-edge-quantizer with the op configs
   litert-torch's generative `quant_recipes` use, but with the record's codes and scales instead of parameters
   the quantizer would choose (`tflite_weights`, which also says which grids LiteRT holds): int8 per channel
   (dynamic range, or weight-only when activations stay fp32), int4 per block (dynamic range; a linear layer
   whose input width is not a multiple of the block falls back to int8 per channel), fp16 weights cast by the
   quantizer. Per-module rules give a layer its own precision. A tied embedding stays one (quantized) buffer
   read by the embedding lookup and the LM head.

Why fixed-length prefill signatures rather than one dynamic-length one: TFLite plans memory and XNNPACK
packs weights per static shape, and LiteRT-LM (the on-device LLM runtime) expects exactly this layout
(`prefill_<T>` + `decode`, external KV cache), so the artifact is what the runtime's own tools emit.
A prompt chunk shorter than T is padded; see `extra.litert.padding` in the manifest.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from llmship.adapters import inputs as lora_inputs
from llmship.adapters.branch import storage_dtype
from llmship.compress.plan import module_rules
from llmship.errors import ConfigError
from llmship.exporters import ExportJob, ExportResult, tensor_spec
from llmship.exporters import tflite_weights as tw
from llmship.exporters.tflite_weights import weight_plan  # noqa: F401  (the registry's entry point)
from llmship.models.decoder import CacheIODecoder, MobileDecoder, cache_names, with_attention

MODEL_FILE = "model.tflite"
SELECT = ("LiteRT signatures, LiteRT-LM's LoRA layout: call \"<signature>_lora\" (adapters.list[].signatures) with the "
          "adapter's file as more inputs (adapters.inputs.slots: each tensor padded with zeros to the slot's shape, "
          "zeros for a module the file lacks), the plain signatures for the bare base; every signature takes and "
          "returns the same caches. The base weights are one buffer that every signature reads.")
INT4_BLOCK_SIZES = (32, 64, 128, 256)  # what litert-torch's generative recipes (and XNNPACK) support


def prefill_signature(length: int) -> str:
    return f"prefill_{length}"


def check(target, spec=None) -> None:
    """What LiteRT holds with litert-torch's quantization recipes: fp32, fp16 weights, int8 per channel (dynamic
    range or weight-only), int4 in blocks of 32/64/128/256 (dynamic range); symmetric grids only. Every
    per-module rule is held to the same; with the model's spec every rule must match a module."""
    from llmship.compress.plan import rule_variants

    recipe, name = target.recipe, target.name
    if recipe.compute != "fp32":
        raise ConfigError(f"{name}: recipe.compute fp16 is a runtime (delegate) choice in LiteRT, not part of the model "
                          "file; use compute fp32 (fp16 weights are recipe.weights fp16)")
    if recipe.embedding not in ("same", recipe.weights):
        raise ConfigError(f"{name}: recipe.embedding {recipe.embedding} is not supported on tflite; the embedding follows "
                          "recipe.weights (use 'same')")
    w, act = recipe.weights, recipe.activations
    if act not in ("fp32", "int8") or (w in ("fp32", "fp16") and act != "fp32"):
        raise ConfigError(f"{name}: recipe.activations {act} is not available with {w} weights on tflite")
    for _, rule, where in rule_variants(recipe):
        _check_rule(name, where, rule, act, spec)
    if spec is not None:
        module_rules(recipe, spec)  # every rule must match a module of this model


def _check_rule(name: str, where: str, rule, act: str, spec) -> None:
    """One (role, rule) variant of the recipe: the precision, grid and block size a module would get."""
    w = rule.weights
    if w == "pal4":
        raise ConfigError(f"{name}: {where}.weights pal4 (palettization) has no LiteRT recipe; use int4 or int8")
    if rule.symmetric is False and w in ("int8", "int4"):
        raise ConfigError(f"{name}: {where}.symmetric false: LiteRT's int8/int4 weights are symmetric (no zero points)")
    if w == "int8" and rule.group_size is not None:
        raise ConfigError(f"{name}: {where}.group_size: int8 weights are quantized per output channel on tflite; remove it")
    if w == "int4":
        if act != "int8":
            raise ConfigError(f"{name}: recipe.activations: int4 weights exist only as dynamic-range quantization; set int8")
        block = rule.group_size or tw.DEFAULT_BLOCK
        if block not in INT4_BLOCK_SIZES:
            raise ConfigError(f"{name}: {where}.group_size {rule.group_size} is not a LiteRT int4 block size "
                              f"({', '.join(map(str, INT4_BLOCK_SIZES))})")
        if spec is not None and spec.hidden_size % block:  # the embedding and q/k/v/gate/up read hidden_size inputs
            raise ConfigError(f"tflite: hidden_size {spec.hidden_size} is not a multiple of {where}.group_size {block}; "
                              f"choose a block size that divides it ({', '.join(map(str, INT4_BLOCK_SIZES))})")


def recipe_description(recipe) -> str:
    return {
        "fp32": "fp32 weights",
        "fp16": "fp16 weights (XNNPACK dequantizes them to fp32 when it loads the model)",
        "int8": "int8 weights per output channel, "
                + ("dynamic range: activations quantized to int8 per row at run time"
                   if recipe.activations == "int8" else "weight-only: dequantized to fp32 at run time"),
        "int4": f"int4 weights per block of {recipe.group_size or 32} input channels, dynamic range: activations "
                "quantized to int8 per row at run time",
    }[recipe.weights]


def litert_decoder(decoder: MobileDecoder) -> MobileDecoder:
    """The canonical model computed with each layer's attention as `LiteRTAttention` (weights shared, `decoder` unchanged)."""
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

    return with_attention(decoder, lambda attn: LiteRTAttention(attn, dynamic_update_slice))


class LiteRTAttention(nn.Module):
    """The canonical attention computed the way LiteRT's kernels run it fast; the same function.

    Two rewrites, measured here (one layer, SmolLM2 shapes, one decode step, XNNPACK):
    - grouped-query attention groups the query heads per KV head instead of expanding the cache to every
      query head: `expand` lowers to BROADCAST_TO, which XNNPACK does not take and LiteRT's kernel runs at
      ~0.4 ms per layer even on builtin:tiny's 64 KB cache (decode went from 2.4 ms to 0.12 ms);
    - the cache write is litert-torch's `dynamic_update_slice` at row input_pos (what its own generative
      layers use: 14 us) instead of `index_copy`, which lowers to STABLEHLO_SCATTER (41 us). DUS clamps a
      start that does not fit, so callers keep input_pos + T <= max_context (the runner does; the
      manifest says so).
    """

    def __init__(self, attn: nn.Module, dynamic_update_slice):
        super().__init__()
        self.attn = attn
        self.dynamic_update_slice = dynamic_update_slice

    def forward(self, x, cos, sin, positions, mask, k_cache, v_cache, inplace: bool):
        if inplace:
            raise ValueError("LiteRTAttention serves the functional entry point (forward_with_cache) only")
        a = self.attn
        b, t, _ = x.shape
        q, k, v = a.project(x, cos, sin)
        ring = k_cache.shape[2] < mask.shape[-1]
        rows, mask = a.rows_and_mask(positions, mask, k_cache.shape[2])
        if ring:  # a ring buffer's rows wrap around the end: a scatter writes them (no single slice would)
            k_cache = k_cache.index_copy(2, rows, k.to(k_cache.dtype))
            v_cache = v_cache.index_copy(2, rows, v.to(v_cache.dtype))
        else:
            zero = torch.zeros([], dtype=torch.int32)
            start = [zero, zero, positions[0].to(torch.int32).reshape([]), zero]
            k_cache = self.dynamic_update_slice(k_cache, k.to(k_cache.dtype), start)
            v_cache = self.dynamic_update_slice(v_cache, v.to(v_cache.dtype), start)
        # Query head h reads KV head h // group, as the canonical expand does: the group's query heads
        # become group * t rows against their one KV head, each block of t rows with the same mask rows.
        group = a.num_heads // a.num_kv_heads
        q = q.reshape(b, a.num_kv_heads, group * t, a.head_dim)
        if a.use_rope:
            out = F.scaled_dot_product_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), attn_mask=mask.repeat(group, 1))
        else:
            # A NoPE layer (SmolLM3): SDPA's scaling of q would be folded into q_proj's weight by the converter (no RoPE
            # op stands between them), and that weight then matches no matrix of the model or of the compression
            # record. Scaling the scores instead keeps q_proj's weight as it is; the same function.
            scores = torch.matmul(q, k_cache.to(q.dtype).transpose(-1, -2)) * (1.0 / math.sqrt(a.head_dim))
            out = torch.matmul(torch.softmax(scores + mask.repeat(group, 1), dim=-1), v_cache.to(q.dtype))
        out = out.reshape(b, a.num_heads, t, a.head_dim).transpose(1, 2).reshape(b, t, a.num_heads * a.head_dim)
        return a.o_proj(out), k_cache, v_cache


def sample_inputs(decoder: MobileDecoder, length: int) -> dict[str, torch.Tensor]:
    """A signature's named inputs (litert-torch names its tensors after the keyword arguments): tokens [1, T] int32,
    input_pos [T] int32 (every token's position, LiteRT-LM's convention), and the caches."""
    dtype = decoder.k_cache_0.dtype
    shapes = [shape for shape in decoder.cache_shapes for _ in ("k", "v")]
    caches = {n: torch.zeros(shape, dtype=dtype) for n, shape in zip(cache_names(decoder.spec.num_layers), shapes)}
    return {"tokens": torch.zeros((1, length), dtype=torch.int32), "input_pos": torch.arange(length, dtype=torch.int32), **caches}


def signatures(target) -> dict[str, int]:
    """The bare base's signatures: name -> tokens per call."""
    return {**{prefill_signature(t): t for t in target.prefill_lengths}, "decode": 1}


def convert(decoder: MobileDecoder, target, lora: list | None = None) -> bytes:
    """The float model: every signature of `decoder`, and with `lora` (adapters/inputs.py slots) every signature again
    as `<signature>_lora` taking the slots' tensors as more inputs, traced by litert-torch and merged into one
    flatbuffer; the weights the signatures share are stored once."""
    import litert_torch

    variants = [(None, CacheIODecoder(litert_decoder(decoder)).eval(), {})]
    if lora:
        branched, fed = lora_inputs.with_inputs(decoder, lora)
        module = lora_inputs.taking_inputs(CacheIODecoder(litert_decoder(branched)), fed, lora).eval()
        variants.append((lora_inputs.entry, module, lora_inputs.sample(lora)))
    converter = None
    for rename, module, extra in variants:
        for name, length in signatures(target).items():
            add = litert_torch.signature if converter is None else converter.signature
            kwargs = {**sample_inputs(decoder, length), **extra}
            converter = add(rename(name) if rename else name, module, sample_kwargs=kwargs)
    with torch.no_grad():
        return bytes(converter.convert().model_content())


def export(job: ExportJob) -> ExportResult:
    recipe, spec, target = job.target.recipe, job.loaded.spec, job.target
    slots = lora_inputs.slots(job.decoder, job.loaded.lora) if job.loaded.lora else None
    content = convert(job.decoder, target, slots)
    if job.record is not None or any(r.weights == "fp16" for r in module_rules(recipe, spec).values()):
        content = tw.quantize(content, job.decoder, spec, recipe, job.record)
    (job.out_dir / MODEL_FILE).write_bytes(content)
    adapters = {}
    if slots:
        dtype = storage_dtype(job.loaded.adapters["dtype"], target)
        adapters = {"files": lora_inputs.write_files(job.out_dir, job.loaded.lora, dtype), "dtype": dtype, "select": SELECT,
                    "inputs": {"rank": slots[0].rank, "slots": [s.manifest() for s in slots]},
                    "entries": {a.name: {"signatures": {s: lora_inputs.entry(s) for s in signatures(target)}}
                                for a in job.loaded.lora}}
    return _result(job, adapters)


def _result(job: ExportJob, adapters: dict) -> ExportResult:
    spec, target, recipe = job.loaded.spec, job.target, job.target.recipe
    cache_dtype = "float16" if target.kv_cache_dtype == "fp16" else "float32"
    shapes = [list(shape) for shape in job.decoder.cache_shapes for _ in ("k", "v")]
    caches = [tensor_spec(n, cache_dtype, shape, "cache") for n, shape in zip(cache_names(spec.num_layers), shapes)]

    def entry(signature: str, t: int) -> dict:
        return {"file": MODEL_FILE, "signature": signature,
                "inputs": [tensor_spec("tokens", "int32", [1, t], "tokens"), tensor_spec("input_pos", "int32", [t], "positions"),
                           *caches],
                "outputs": [tensor_spec("logits", "float32", [1, t, spec.vocab_size], "logits"), *caches]}

    entries = {name: entry(name, t) for name, t in signatures(target).items()}
    return ExportResult(
        entry_points=entries,
        adapters=adapters,
        kv_cache={"held_as": "inputs", "dtype": cache_dtype,
                  "inputs": ["k_cache_{layer}", "v_cache_{layer}"], "outputs": ["k_cache_{layer}", "v_cache_{layer}"],
                  "how": "every signature takes all caches and returns them updated under the same names; pass the "
                         "outputs of one call as the inputs of the next (any signature); zeros to start over"},
        extra={"litert": {
            "model_file": MODEL_FILE,
            "signatures": [*entries, *(lora_inputs.entry(s) for s in entries if adapters)],
            "prefill_signatures": {str(t): prefill_signature(t) for t in target.prefill_lengths},
            "input_pos": "the position of every token, input_pos[0] + arange(T) (LiteRT-LM's convention); the model reads "
                         "input_pos[0] and writes cache rows input_pos[0] .. input_pos[0] + T - 1",
            "padding": "a chunk of n < T tokens is padded to T with any token id and the logits of its first n rows are "
                       "used; the padded rows write junk cache entries that later calls overwrite before attending "
                       "them (the mask hides positions after the current one). input_pos + T must not exceed "
                       "max_context (no row beyond the cache is written): near the end use a shorter signature or decode",
            "weights": recipe_description(recipe),
            "int8_fallback_layers": tw.int8_fallbacks(target, spec),
            "quantized_weights": "the compression record's codes and scales as they are" if job.record else None,
            "delegate": "XNNPACK (LiteRT's default CPU delegate); ops it does not take run on LiteRT's builtin kernels",
        }},
    )
