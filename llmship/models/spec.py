"""Architecture hyper-parameters of a supported model, read from a Hugging Face config dict."""
from __future__ import annotations

from dataclasses import dataclass, field

from llmship.errors import ModelError

# model_type -> family quirks. SmolLM and MobileLLM checkpoints use model_type "llama"; SmolLM3 ("smollm3") is
# Llama with RoPE left out of some layers (NoPE); Phi-3 and Phi-4-mini ("phi3") fuse q/k/v and gate/up (split on
# load, weights.py), may rotate only part of each head (partial_rotary_factor) and scale RoPE with LongRoPE. Gemma 3's
# text model ("gemma3_text") interleaves local (windowed) and global layers with a RoPE base each, normalises with
# (1 + weight), wraps attention and MLP in norms on both sides, gates with GELU (tanh), scales the embedding by
# sqrt(hidden) and the attention by query_pre_attn_scalar.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
ROPE_SCALINGS = ("linear", "llama3", "longrope")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # the window of the layers that have one (see `window_of`)
    sliding_layers: tuple[bool, ...] | None = None  # per layer, whether it attends within the window; None: all
    rope_layers: tuple[bool, ...] | None = None  # per layer, whether it applies RoPE (SmolLM3's NoPE layers); None: all
    rotary_dim: int | None = None  # how many leading dims of each head RoPE rotates (Phi's partial rotary); None: all
    # per layer, the layer whose weights it runs (MobileLLM's block sharing, compress/share.py); None: each its own
    shared_layers: tuple[int, ...] | None = None
    hidden_act: str = "silu"  # the MLP's gate: SwiGLU (silu) or GeGLU (gelu_pytorch_tanh, Gemma)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    sandwich_norms: bool = False  # Gemma: attention and MLP outputs normalised too (post_attention, pre/post_feedforward)
    embed_scale: float | None = None  # the embedding lookup times this (Gemma: sqrt(hidden_size)); the tied head is not
    attn_scale: float | None = None  # the attention's softmax scale (Gemma: query_pre_attn_scalar ** -0.5); None: head_dim ** -0.5
    local_rope_theta: float | None = None  # the RoPE base of the sliding-window layers (Gemma 3); None: rope_theta
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def window_of(self, layer: int) -> int | None:
        """How far back layer `layer` attends (a query at p sees p - window + 1 .. p), or None: the whole cache."""
        if self.sliding_window is None or (self.sliding_layers is not None and not self.sliding_layers[layer]):
            return None
        return self.sliding_window

    def owner_of(self, layer: int) -> int:
        """The layer whose weights `layer` runs: itself, or the layer it shares a block with."""
        return layer if self.shared_layers is None else self.shared_layers[layer]

    @property
    def weight_layers(self) -> list[int]:
        """The layers that hold weights (a shared block's are stored once, under its first layer)."""
        return [i for i in range(self.num_layers) if self.owner_of(i) == i]

    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * q + 2 * d * kv + q * d
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += d
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        norms = (4 if self.sandwich_norms else 2) * d + (2 * hd if self.qk_norm else 0)
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return len(self.weight_layers) * (attn + mlp + norms) + d + embed


def _rope_settings(cfg: dict) -> tuple[float, dict | None]:
    # transformers 5 writes `rope_parameters`; older checkpoints write rope_theta + rope_scaling.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ModelError(f"config.json field {key} must be an object, not {type(value).__name__} ({value!r:.40})")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if params and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        kind = "longrope" if kind == "su" else kind  # Phi-3's first checkpoints called LongRoPE "su"
        if kind == "default":
            scaling = None
        elif kind not in ROPE_SCALINGS:
            raise ModelError(f"rope scaling '{kind}' is not supported (supported: default, {', '.join(ROPE_SCALINGS)})")
        else:
            scaling = dict(scaling, rope_type=kind)
            if kind == "longrope" and "original_max_position_embeddings" not in scaling:
                scaling["original_max_position_embeddings"] = cfg.get("original_max_position_embeddings",
                                                                      cfg.get("max_position_embeddings", 2048))
    return float(theta), scaling


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ModelError(f"config.json: token ids must be integers, got {value!r:.40}")
    return tuple(values)


# Bounds a config must respect before anything is allocated from it: a 1 KB config.json must not be able to
# ask for a billion layers. Far beyond any model a phone runs (the largest on-device LLMs are a few billion
# parameters), tight enough that a typo fails in milliseconds.
LIMITS = {"vocab_size": 1 << 20, "hidden_size": 1 << 15, "intermediate_size": 1 << 17, "num_layers": 512,
          "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024}
MAX_PARAMS = 20_000_000_000


def _check_sizes(spec: "ModelSpec") -> None:
    for name, limit in LIMITS.items():
        value = getattr(spec, name)
        if not 1 <= value <= limit:
            raise ModelError(f"config.json: {name} {value} is out of range (1..{limit})")
    if spec.num_params > MAX_PARAMS:
        raise ModelError(f"config.json describes {spec.num_params:,} parameters, more than llmship handles ({MAX_PARAMS:,})")
    for name, ids in (("bos_token_id", () if spec.bos_token_id is None else (spec.bos_token_id,)), ("eos_token_id", spec.eos_token_ids)):
        bad = [i for i in ids if not 0 <= i < spec.vocab_size]
        if bad:
            raise ModelError(f"config.json: {name} {bad[0]} is outside the vocabulary (0..{spec.vocab_size - 1})")
    if not (spec.rms_norm_eps > 0 and spec.rope_theta > 0):
        raise ModelError("config.json: rms_norm_eps and rope_theta must be positive")


def _integer(cfg: dict, key: str, default=None) -> int:
    value = cfg.get(key, default) if default is not None else cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ModelError(f"config.json field {key} must be an integer, not {value!r:.40}")
    return int(value)


def spec_from_config(cfg: dict) -> ModelSpec:
    """Validate a config.json dict and turn it into a ModelSpec; unsupported models raise ModelError."""
    if not isinstance(cfg, dict):
        raise ModelError(f"config.json must hold a JSON object, not a {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        archs = ", ".join(cfg.get("architectures") or []) or "unknown"
        raise ModelError(
            f"unsupported architecture '{model_type}' ({archs}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    gemma = model_type == "gemma3_text"
    act = cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh")) if gemma else cfg.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ModelError(f"unsupported activation '{act}' for {model_type}; the canonical model gates with {' or '.join(ACTIVATIONS)}")
    if gemma:
        _check_gemma(cfg)
    try:
        heads = _integer(cfg, "num_attention_heads")
        hidden = _integer(cfg, "hidden_size")
        if heads < 1 or hidden < 1:
            raise ModelError(f"config.json: num_attention_heads ({heads}) and hidden_size ({hidden}) must be positive")
        theta, scaling = _rope_settings(_gemma_global_rope(cfg) if gemma else cfg)
        attention_bias = bool(cfg.get("attention_bias", False))
        spec = ModelSpec(
            model_type=model_type,
            vocab_size=_integer(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_integer(cfg, "intermediate_size"),
            num_layers=_integer(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_integer(cfg, "num_key_value_heads") if cfg.get("num_key_value_heads") else heads,
            head_dim=_integer(cfg, "head_dim") if cfg.get("head_dim") else hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 biases q/k/v (never o); Llama's `attention_bias` covers all four projections.
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type in ("qwen2", "qwen3") else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            sliding_window=(window := _sliding_window(cfg)),
            sliding_layers=_sliding_layers(cfg) if window is not None else None,
            rope_layers=_rope_layers(cfg) if model_type == "smollm3" else None,
            rotary_dim=_rotary_dim(cfg, hidden // heads) if model_type == "phi3" else None,
            hidden_act=act,
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            embed_scale=hidden ** 0.5 if gemma else None,
            attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
            local_rope_theta=_local_rope_theta(cfg) if gemma else None,
            bos_token_id=None if cfg.get("bos_token_id") is None else _as_ids(cfg["bos_token_id"])[0],
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ModelError(f"config.json for {model_type} is missing or has a bad field: {exc}") from None
    _check_sizes(spec)
    if spec.num_heads % spec.num_kv_heads:
        raise ModelError(f"num_attention_heads {spec.num_heads} is not a multiple of num_key_value_heads {spec.num_kv_heads}")
    if spec.rope_scaling and spec.rope_scaling["rope_type"] == "longrope":
        _check_longrope(spec)
    return spec


def _rotary_dim(cfg: dict, default_head_dim: int) -> int | None:
    """Phi's `partial_rotary_factor` (top level, or in transformers 5's rope_parameters) as a count of head dims."""
    factor = cfg.get("partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ModelError(f"config.json field partial_rotary_factor must be in (0, 1], got {factor!r:.40}")
    head_dim = _integer(cfg, "head_dim") if cfg.get("head_dim") else default_head_dim
    dim = int(head_dim * factor)  # transformers truncates the same way
    if dim < 2 or dim % 2:
        raise ModelError(f"partial_rotary_factor {factor} of head_dim {head_dim} rotates {dim} dims; RoPE needs an even number")
    return None if dim == head_dim else dim


def _check_longrope(spec: ModelSpec) -> None:
    scaling = spec.rope_scaling
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, list) or len(factors) != spec.rope_dim // 2 or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors):
            raise ModelError(f"config.json: longrope {key} must list {spec.rope_dim // 2} positive numbers "
                             f"(one per rotated frequency), got {factors!r:.60}")
    original = scaling["original_max_position_embeddings"]
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ModelError(f"config.json: longrope original_max_position_embeddings must be a positive integer, got {original!r:.40}")


def _rope_layers(cfg: dict) -> tuple[bool, ...]:
    """SmolLM3's `no_rope_layers` (1: the layer uses RoPE, 0: NoPE), or one NoPE layer every
    `no_rope_layer_interval` layers (the last of each group), as transformers derives it."""
    n = _integer(cfg, "num_hidden_layers")
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = _integer(cfg, "no_rope_layer_interval") if "no_rope_layer_interval" in cfg else 4
        if interval < 1:
            raise ModelError(f"config.json field no_rope_layer_interval must be positive, got {interval}")
        return tuple((i + 1) % interval != 0 for i in range(n))
    if not isinstance(flags, list) or len(flags) != n or any(f not in (0, 1) or isinstance(f, float) for f in flags):
        raise ModelError(f"config.json field no_rope_layers must list 0 or 1 for each of the {n} layers, got {flags!r:.60}")
    return tuple(bool(f) for f in flags)


def _sliding_window(cfg: dict) -> int | None:
    if cfg.get("model_type") in ("mistral", "phi3", "gemma3_text") or cfg.get("use_sliding_window"):
        window = cfg.get("sliding_window")
        if window is None:
            return None
        window = _integer(cfg, "sliding_window")
        if window < 1:
            raise ModelError(f"config.json field sliding_window must be positive, got {window}")
        return window
    return None


def _sliding_layers(cfg: dict) -> tuple[bool, ...] | None:
    """Which layers use the window: `layer_types` where the config lists them (transformers 5 writes it), else
    transformers' rule for the family: Qwen2 from max_window_layers (default 28) on, SmolLM3 its NoPE layers, every
    layer for Mistral and Phi-3."""
    n = _integer(cfg, "num_hidden_layers")
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n or any(t not in ("sliding_attention", "full_attention") for t in types):
            raise ModelError(f"config.json field layer_types must name sliding_attention or full_attention for each of the "
                             f"{n} layers, got {types!r:.60}")
        return tuple(t == "sliding_attention" for t in types)
    if cfg.get("model_type") == "qwen2":
        first = _integer(cfg, "max_window_layers", 28)
        return tuple(i >= first for i in range(n))
    if cfg.get("model_type") == "smollm3":
        return tuple(not rope for rope in _rope_layers(cfg))
    if cfg.get("model_type") == "gemma3_text":  # every `sliding_window_pattern`-th layer global, the rest local
        pattern = _integer(cfg, "sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
        if pattern < 1:
            raise ModelError(f"config.json field sliding_window_pattern must be positive, got {pattern}")
        return tuple((i + 1) % pattern != 0 for i in range(n))
    return None


def _check_gemma(cfg: dict) -> None:
    """What of Gemma 3's text model the canonical model does not compute: refused, not approximated."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ModelError(f"config.json: {key} {cfg[key]!r:.20} is not supported (Gemma 3 checkpoints leave it null)")
    if cfg.get("use_bidirectional_attention"):
        raise ModelError("config.json: use_bidirectional_attention is set (an embedding model, not a causal LM)")


def _gemma_global_rope(cfg: dict) -> dict:
    """The config as `_rope_settings` reads it for Gemma 3's global layers: transformers 5 nests their RoPE under
    rope_parameters.full_attention; checkpoints give rope_theta (1,000,000 by default) and rope_scaling."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        return dict(cfg, rope_parameters=params["full_attention"])
    return {**cfg, "rope_theta": cfg.get("rope_theta", 1_000_000.0)}


def _local_rope_theta(cfg: dict) -> float:
    """Gemma 3's RoPE base for its sliding-window layers: transformers 5's rope_parameters.sliding_attention, or the
    checkpoints' rope_local_base_freq (10,000 when neither is given). Local layers rotate without scaling."""
    local = (cfg.get("rope_parameters") or {}).get("sliding_attention")
    if local is not None:
        if not isinstance(local, dict) or local.get("rope_type", "default") != "default":
            raise ModelError(f"config.json: rope_parameters.sliding_attention must be default RoPE, got {local!r:.60}")
        theta = local.get("rope_theta", 10000.0)
    else:
        theta = cfg.get("rope_local_base_freq", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ModelError(f"config.json: the local RoPE base must be a positive number, got {theta!r:.40}")
    return float(theta)
