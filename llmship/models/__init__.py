"""Model sources and the canonical static-KV-cache decoder."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from llmship.models.decoder import MobileDecoder
    from llmship.models.loaded import LoadedModel

CACHE_DTYPES = ("fp32", "fp16")
# A static cache this large would not fit a phone (or the build machine): refuse before allocating it.
MAX_CACHE_BYTES = 8 << 30


def load_model(source: str) -> "LoadedModel":
    from llmship.models.sources import load_model as _load

    return _load(source)


def build_decoder(loaded: "LoadedModel", max_context: int, cache_dtype: str = "fp32",
                  weights: "dict[str, torch.Tensor] | None" = None, chunk: int | None = None) -> "MobileDecoder":
    """The canonical model for `loaded` with a KV cache of `cache_dtype` ("fp32" or "fp16"); its weights are
    `loaded.weights` (or `weights`, e.g. a compressed reference's), shared, not copied: a tied matrix stays one tensor.
    `chunk`: the most tokens a call writes, which lets sliding-window layers hold ring buffers (what artifacts are
    exported from; None, the reference: every layer's cache holds max_context positions)."""
    import torch

    from llmship.errors import ModelError
    from llmship.models.decoder import MobileDecoder

    from llmship.errors import ConfigError

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[cache_dtype]
    spec = loaded.spec
    cache_bytes = 2 * spec.num_layers * spec.num_kv_heads * max_context * spec.head_dim * dtype.itemsize
    if cache_bytes > MAX_CACHE_BYTES:
        raise ConfigError(f"max_context {max_context}: the KV cache would take {cache_bytes / 2**30:.1f} GiB for this model "
                          f"(limit {MAX_CACHE_BYTES / 2**30:.0f} GiB); choose a smaller max_context")
    decoder = MobileDecoder(loaded.spec, max_context, dtype, chunk)
    missing, unexpected = decoder.load_state_dict(weights if weights is not None else loaded.weights, strict=False, assign=True)
    if loaded.spec.tie_word_embeddings:
        decoder.lm_head.weight = decoder.model.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if spec.shared_layers is not None:  # a layer that runs another's block has no tensors of its own
        sharers = tuple(f"model.layers.{i}." for i in range(spec.num_layers) if spec.owner_of(i) != i)
        missing = [m for m in missing if not m.startswith(sharers)]
    if missing or unexpected:
        raise ModelError(f"{loaded.source}: weights do not fit the canonical model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return decoder.eval()
