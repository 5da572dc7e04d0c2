"""The canonical model: an export-friendly Llama-family decoder with a static KV cache.

Module and parameter names mirror Hugging Face's (`model.layers.N.self_attn.q_proj.weight`, ...), so
a checkpoint's state dict loads as it is. Every shape is static except the prefill length T; a layer's cache
holds `max_context` positions (or, for a sliding-window layer of an artifact, a ring buffer: `cache_lengths`)
and attention always spans the whole cache under a positional mask, which is what lets all four converters
trace it. Cache writes use `index_copy` at `input_pos + arange(T)` (mod the ring's rows), so no data-dependent
slicing appears in the graph. The family differences (Gemma's norms, GeGLU, embedding scale, softmax scale and
second RoPE base; Phi's partial rotary; SmolLM3's NoPE layers) are read from the spec where each module is built.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from llmship.errors import ConfigError
from llmship.models.spec import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def scale(self) -> torch.Tensor:
        """What the normalised input is multiplied by: the weight, or (offset + weight) where the checkpoint stores
        it shifted (Gemma's `1 + weight`; kept as stored so the tensors stay the checkpoint's)."""
        return self.weight + self.offset if self.offset else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.scale() * x32.to(x.dtype)


def rope_inv_freq(spec: ModelSpec, max_context: int) -> torch.Tensor:
    """The frequencies RoPE rotates the first `spec.rope_dim` dims of each head by, for a cache of `max_context`."""
    hd = spec.rope_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "longrope":
        # Phi's LongRoPE: per-frequency divisors, the long ones past the pretraining context. transformers picks them
        # per forward call from the sequence length; a static cache picks once from its length, so an artifact whose
        # max_context exceeds original_max_position_embeddings uses the long factors at every position.
        long = max_context > scaling["original_max_position_embeddings"]
        return inv_freq / torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"])
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


def rope_attention_factor(spec: ModelSpec) -> float:
    """What LongRoPE multiplies cos and sin by (1 for every other RoPE): its `attention_factor`, or
    sqrt(1 + ln(s) / ln(original context)) with s = factor, or max_position_embeddings / original context."""
    scaling = spec.rope_scaling
    if scaling is None or scaling["rope_type"] != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = float(scaling.get("factor") or spec.max_position_embeddings / original)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_tables(spec: ModelSpec, max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_context, rope_dim] of every cache position (times LongRoPE's attention factor)."""
    freqs = torch.outer(torch.arange(max_context, dtype=torch.int64).float(), rope_inv_freq(spec, max_context))
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = rope_attention_factor(spec)
    return emb.cos() * scale, emb.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of x (all of them, or Phi's partial rotary); the rest pass through."""
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, passed = x[..., :dim], x[..., dim:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)


def causal_mask(positions: torch.Tensor, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive mask [T, length] of a static cache: a query at position p sees cache rows 0..p."""
    rows = torch.arange(length, dtype=torch.int64)[None, :]
    return torch.zeros((positions.shape[0], length), dtype=dtype).masked_fill(rows > positions[:, None], float("-inf"))


def windowed(mask: torch.Tensor, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """The causal mask [T, cache] narrowed to a sliding window: a query at position p also stops seeing cache rows
    at or before p - window (transformers' sliding-window mask). `window` None, or one that spans the whole cache:
    the mask as it is (no extra op in the graph)."""
    if window is None or window >= mask.shape[-1]:
        return mask
    rows = torch.arange(mask.shape[-1], dtype=torch.int64)[None, :]
    return mask.masked_fill(rows <= positions[:, None] - window, float("-inf"))


def cache_lengths(spec: ModelSpec, max_context: int, chunk: int | None) -> list[int]:
    """Per layer, the positions its KV cache holds: `max_context`, or for a sliding-window layer a ring buffer of
    window + chunk - 1 rows when that is shorter. A chunk of T <= `chunk` tokens is written before it is attended
    to, so its first query still needs the window - 1 positions before the chunk: window + T - 1 rows. `chunk`
    None: every layer holds `max_context` (the eager reference)."""
    out = []
    for i in range(spec.num_layers):
        window = spec.window_of(i)
        ring = None if window is None or chunk is None else window + chunk - 1
        out.append(max_context if ring is None or ring >= max_context else ring)
    return out


def max_tokens_per_call(lengths: list[int], max_context: int, chunk: int | None) -> int:
    """The most tokens one call may write into caches of these `cache_lengths`: `chunk` when a layer holds a ring
    buffer (its rows assume no more), else max_context."""
    return chunk if any(n < max_context for n in lengths) else max_context


def ring_mask(positions: torch.Tensor, length: int, window: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [T, length] of a ring-buffer cache once the chunk at `positions` is written. Row r holds the
    latest position p <= last with p = r (mod length), p = last - ((last - r) mod length); a query at q sees it when
    it is written (p >= 0), not ahead of q and inside q's window (q - window < p <= q)."""
    last = positions[-1]
    held = (last - torch.remainder(last - torch.arange(length, dtype=torch.int64), length))[None, :]
    q = positions[:, None]
    mask = torch.zeros((positions.shape[0], length), dtype=dtype)
    # three fills rather than one of a combined condition: Core ML's converter has no boolean `and`
    return mask.masked_fill(held > q, float("-inf")).masked_fill(held <= q - window, float("-inf")).masked_fill(held < 0, float("-inf"))


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        d, hd = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, hd
        self.use_rope = spec.rope_layers is None or spec.rope_layers[layer]  # False: a NoPE layer (SmolLM3)
        self.window = spec.window_of(layer)  # a sliding-window layer (Mistral, Qwen2, SmolLM3, Phi-3, Gemma 3); None: global
        # Gemma's softmax scale, folded into q: SDPA then applies its own head_dim ** -0.5 (None: that one alone)
        self.q_scale = None if spec.attn_scale is None else spec.attn_scale * math.sqrt(hd)
        self.q_proj = nn.Linear(d, spec.num_heads * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * hd, d, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(hd, spec.rms_norm_eps, spec.norm_offset)
            self.k_norm = RMSNorm(hd, spec.rms_norm_eps, spec.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x, cos, sin):
        """q, k, v for the new tokens, [b, heads, t, head_dim], with q/k norm and RoPE applied."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.q_scale is not None:
            q = q * self.q_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return (apply_rope(q, cos, sin), apply_rope(k, cos, sin), v) if self.use_rope else (q, k, v)

    def rows_and_mask(self, positions, mask, length: int):
        """Where the new keys go in a cache of `length` rows, and the additive mask [T, length] to attend with: the
        cache rows at the positions themselves (a full cache, narrowed to the window, if any), or a ring buffer's
        rows (positions mod length) when the cache is shorter than the context."""
        if length < mask.shape[-1]:
            return torch.remainder(positions, length), ring_mask(positions, length, self.window, mask.dtype)
        return positions, windowed(mask, positions, self.window)

    def forward(self, x, cos, sin, positions, mask, k_cache, v_cache, inplace: bool):
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        length, ring = k_cache.shape[2], k_cache.shape[2] < mask.shape[-1]
        rows, mask = self.rows_and_mask(positions, mask, length)
        if inplace:
            k_cache.index_copy_(2, rows, k.to(k_cache.dtype))
            v_cache.index_copy_(2, rows, v.to(v_cache.dtype))
        else:
            k_cache = k_cache.index_copy(2, rows, k.to(k_cache.dtype))
            v_cache = v_cache.index_copy(2, rows, v.to(v_cache.dtype))
        group = self.num_heads // self.num_kv_heads
        if not torch.compiler.is_exporting():
            # Eager (the reference, calibration): the same function without its export-friendly form. Attend only
            # to the positions written so far (the mask hides the rest anyway) and let SDPA share each KV head
            # across its query group instead of copying the cache per query head every step: most of the
            # reference's time at SmolLM2's shapes went into that copy.
            end = length if ring else int(positions[-1]) + 1  # in a ring every row may be live
            out = F.scaled_dot_product_attention(q, k_cache[:, :, :end].to(q.dtype), v_cache[:, :, :end].to(q.dtype),
                                                 attn_mask=mask[:, :end], enable_gqa=group > 1)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)), k_cache, v_cache
        keys, values = k_cache.to(q.dtype), v_cache.to(q.dtype)
        if group > 1:
            c = keys.shape[2]
            keys = keys[:, :, None].expand(b, self.num_kv_heads, group, c, self.head_dim).reshape(b, self.num_heads, c, self.head_dim)
            values = values[:, :, None].expand(b, self.num_kv_heads, group, c, self.head_dim).reshape(b, self.num_heads, c, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out), k_cache, v_cache


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        d, f = spec.hidden_size, spec.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=spec.mlp_bias)
        self.act = ACTIVATIONS[spec.hidden_act]

    def forward(self, x, act=None):
        """`act` replaces the gate's activation by an equal function an exporter lowers better."""
        return self.down_proj((act or self.act)(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). With `spec.sandwich_norms` (Gemma) each branch's
    output is normalised too, and the norms take Gemma's names: post_attention_layernorm is then the attention's
    output norm, pre_feedforward_layernorm the MLP's input norm."""

    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        d, eps, offset = spec.hidden_size, spec.rms_norm_eps, spec.norm_offset
        self.input_layernorm = RMSNorm(d, eps, offset)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(d, eps, offset)
        self.mlp = MLP(spec)
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(d, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(d, eps, offset)
        self.sandwich = spec.sandwich_norms

    def attention_residual(self, x, h, norm=None):
        """x plus the attention's output h (normalised first in a sandwich block); `norm(module, x)` computes a norm
        (default: the module itself; ExecuTorch passes its own lowering-friendly form)."""
        return x + (self._norm(self.post_attention_layernorm, h, norm) if self.sandwich else h)

    def mlp_residual(self, x, norm=None, act=None):
        """x plus the MLP branch (`act`: see MLP.forward)."""
        mlp = lambda h: self.mlp(h, act)  # noqa: E731
        if not self.sandwich:
            return x + mlp(self._norm(self.post_attention_layernorm, x, norm))
        return x + self._norm(self.post_feedforward_layernorm, mlp(self._norm(self.pre_feedforward_layernorm, x, norm)), norm)

    @staticmethod
    def _norm(module, x, norm):
        return module(x) if norm is None else norm(module, x)

    def forward(self, x, cos, sin, positions, mask, k_cache, v_cache, inplace: bool):
        h, k_cache, v_cache = self.self_attn(self.input_layernorm(x), cos, sin, positions, mask, k_cache, v_cache, inplace)
        return self.mlp_residual(self.attention_residual(x, h)), k_cache, v_cache


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_scale = spec.embed_scale
        layers: list[DecoderLayer] = []
        for i in range(spec.num_layers):  # a shared block is one module at two depths (each keeps its own cache)
            layers.append(layers[spec.owner_of(i)] if spec.owner_of(i) != i else DecoderLayer(spec, i))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token embeddings the first layer reads (Gemma scales them; a tied head uses the unscaled matrix)."""
        x = self.embed_tokens(tokens)
        return x if self.embed_scale is None else x * self.embed_scale


class MobileDecoder(nn.Module):
    """prefill(tokens[1,T], input_pos) and decode(token[1,1], input_pos) over one static KV cache.

    `forward` is the stateful entry point (cache in buffers, updated in place): what ExecuTorch and
    Core ML hold as runtime state. `forward_with_cache` is the functional one (caches in, caches out):
    what ONNX and TFLite carry as inputs and outputs. Both compute the same function.
    """

    def __init__(self, spec: ModelSpec, max_context: int, cache_dtype: torch.dtype = torch.float32, chunk: int | None = None):
        super().__init__()
        if max_context < 1:
            raise ConfigError(f"max_context must be positive, got {max_context}")
        self.spec, self.max_context = spec, max_context
        # per layer, the rows of its cache (`cache_lengths`): a sliding-window layer of an artifact that never writes
        # more than `chunk` tokens at once holds a ring buffer; `chunk` None (the reference): every layer max_context
        self.chunk = chunk
        self.cache_lengths = cache_lengths(spec, max_context, chunk)
        self.model = Backbone(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(spec, max_context)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_context, spec.rope_dim]
        self.register_buffer("rope_sin", sin, persistent=False)
        # Gemma 3's sliding-window layers rotate with their own base (no scaling): a second pair of tables
        self.local_rope = tuple(spec.local_rope_theta is not None and spec.window_of(i) is not None for i in range(spec.num_layers))
        if any(self.local_rope):
            local = dataclasses.replace(spec, rope_theta=spec.local_rope_theta, rope_scaling=None)
            cos, sin = rope_tables(local, max_context)
            self.register_buffer("rope_cos_local", cos, persistent=False)
            self.register_buffer("rope_sin_local", sin, persistent=False)
        for i, shape in enumerate(self.cache_shapes):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape, dtype=cache_dtype), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape, dtype=cache_dtype), persistent=False)

    @property
    def max_chunk(self) -> int:
        return max_tokens_per_call(self.cache_lengths, self.max_context, self.chunk)

    @property
    def cache_shapes(self) -> list[tuple[int, int, int, int]]:
        """Per layer, its K (and V) cache's shape [1, kv_heads, rows, head_dim]."""
        return [(1, self.spec.num_kv_heads, n, self.spec.head_dim) for n in self.cache_lengths]

    def caches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        n = self.spec.num_layers
        return [getattr(self, f"k_cache_{i}") for i in range(n)], [getattr(self, f"v_cache_{i}") for i in range(n)]

    def rope(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the (cos, sin) rows [T, rope_dim] at `positions` it rotates by (each table indexed once)."""
        rows = {False: (self.rope_cos[positions], self.rope_sin[positions])}
        if any(self.local_rope):
            rows[True] = (self.rope_cos_local[positions], self.rope_sin_local[positions])
        return [rows[local] for local in self.local_rope]

    def _run(self, tokens, input_pos, k_caches, v_caches, inplace: bool):
        t = tokens.shape[1]
        positions = input_pos.reshape(1).to(torch.int64) + torch.arange(t, dtype=torch.int64)
        mask = causal_mask(positions, self.max_context, self.rope_cos.dtype)
        x = self.model.embed(tokens)
        new_k, new_v = [], []
        for layer, (cos, sin), kc, vc in zip(self.model.layers, self.rope(positions), k_caches, v_caches):
            x, kc, vc = layer(x, cos, sin, positions, mask, kc, vc, inplace)
            new_k.append(kc)
            new_v.append(vc)
        return self.lm_head(self.model.norm(x)), new_k, new_v

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        k_caches, v_caches = self.caches()
        return self._run(tokens, input_pos, k_caches, v_caches, inplace=True)[0]

    def forward_with_cache(self, tokens, input_pos, k_caches, v_caches):
        return self._run(tokens, input_pos, k_caches, v_caches, inplace=False)

    # Eager conveniences with argument checks; export traces `forward` / `forward_with_cache`.
    def _check(self, t: int, input_pos: int) -> None:
        if t < 1:
            raise ConfigError("prefill needs at least one token")
        if t > self.max_chunk:
            raise ConfigError(f"{t} tokens in one call: the ring-buffer caches of this model take at most {self.max_chunk}")
        if input_pos < 0 or input_pos + t > self.max_context:
            raise ConfigError(
                f"positions {input_pos}..{input_pos + t - 1} do not fit the KV cache of max_context {self.max_context}"
            )

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, input_pos: int) -> torch.Tensor:
        self._check(tokens.shape[-1], input_pos)
        return self(tokens.reshape(1, -1), torch.tensor([input_pos], dtype=torch.int64))[0]

    @torch.no_grad()
    def decode(self, token: int, input_pos: int) -> torch.Tensor:
        self._check(1, input_pos)
        return self(torch.tensor([[token]], dtype=torch.int64), torch.tensor([input_pos], dtype=torch.int64))[0, -1]

    def reset_cache(self) -> None:
        for cache in (*self.caches()[0], *self.caches()[1]):
            cache.zero_()


def cache_names(num_layers: int) -> list[str]:
    """The canonical cache tensor names, in the order the cache-I/O entry point takes and returns them."""
    return [f"{kv}_cache_{i}" for i in range(num_layers) for kv in ("k", "v")]


class CacheIODecoder(nn.Module):
    """The functional entry point as a module, for the formats that carry the cache as inputs and outputs
    (ONNX, TFLite): forward(tokens[1,T], input_pos, k_0, v_0, ..., k_{L-1}, v_{L-1}) -> (logits, k_0', v_0', ...).

    `input_pos` holds every token's position ([T] or [1, T]; the model reads the first and writes and attends
    at input_pos[0] + arange(T)). Called with the caches as keyword arguments named `cache_names` (how
    litert-torch names a signature's tensors), it returns a dict {"logits": ..., name: updated cache}.
    """

    def __init__(self, decoder: MobileDecoder):
        super().__init__()
        self.decoder = decoder
        self.names = cache_names(decoder.spec.num_layers)

    def forward(self, tokens, input_pos, *caches, **named_caches):
        if named_caches:
            caches = tuple(named_caches[n] for n in self.names)
        logits, ks, vs = self.decoder.forward_with_cache(tokens, input_pos.reshape(-1)[:1], list(caches[0::2]), list(caches[1::2]))
        updated = [t for kv in zip(ks, vs) for t in kv]
        return {"logits": logits, **dict(zip(self.names, updated))} if named_caches else (logits, *updated)


def with_attention(decoder: MobileDecoder, wrap) -> MobileDecoder:
    """A decoder that computes like `decoder` with each layer's attention replaced by `wrap(attention)`, sharing
    every weight and buffer; `decoder` itself is left as it was (exporters do not change the model they are given)."""
    import copy

    clone = copy.copy(decoder)
    clone._modules = dict(decoder._modules)
    clone.model = copy.copy(decoder.model)
    clone.model._modules = dict(decoder.model._modules)
    layers = []
    for layer in decoder.model.layers:
        new = copy.copy(layer)
        new._modules = dict(layer._modules)
        new.self_attn = wrap(layer.self_attn)
        layers.append(new)
    clone.model.layers = nn.ModuleList(layers)
    return clone
