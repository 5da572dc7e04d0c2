"""Architecture hyper-parameters of a supported model, read from a Hugging Face config dict."""
from __future__ import annotations

from dataclasses import dataclass, field

from llmship.errors import ModelError

# model_type -> family quirks. SmolLM and MobileLLM checkpoints use model_type "llama".
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


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
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

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
        norms = 2 * d + (2 * hd if self.qk_norm else 0)
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + norms) + d + embed


def _rope_settings(cfg: dict) -> tuple[float, dict | None]:
    # transformers 5 writes `rope_parameters`; older checkpoints write rope_theta + rope_scaling.
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or None
    if params and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind not in ("llama3", "linear"):
            raise ModelError(f"rope scaling '{kind}' is not supported (supported: default, linear, llama3)")
        else:
            scaling = dict(scaling, rope_type=kind)
    return float(theta), scaling


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def spec_from_config(cfg: dict) -> ModelSpec:
    """Validate a config.json dict and turn it into a ModelSpec; unsupported models raise ModelError."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        archs = ", ".join(cfg.get("architectures") or []) or "unknown"
        raise ModelError(
            f"unsupported architecture '{model_type}' ({archs}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"unsupported activation '{act}' for {model_type}; the canonical model implements SwiGLU (silu)")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        theta, scaling = _rope_settings(cfg)
        attention_bias = bool(cfg.get("attention_bias", False))
        spec = ModelSpec(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 biases q/k/v (never o); Llama's `attention_bias` covers all four projections.
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type in ("qwen2", "qwen3") else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            sliding_window=_sliding_window(cfg),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"config.json for {model_type} is missing or has a bad field: {exc}") from None
    if spec.num_heads % spec.num_kv_heads:
        raise ModelError(f"num_attention_heads {spec.num_heads} is not a multiple of num_key_value_heads {spec.num_kv_heads}")
    return spec


def _sliding_window(cfg: dict) -> int | None:
    if cfg.get("model_type") == "mistral" or cfg.get("use_sliding_window"):
        window = cfg.get("sliding_window")
        return int(window) if window else None
    return None
