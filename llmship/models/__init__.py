"""Model sources and the canonical static-KV-cache decoder."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from llmship.models.decoder import MobileDecoder
    from llmship.models.loaded import LoadedModel

CACHE_DTYPES = ("fp32", "fp16")


def load_model(source: str) -> "LoadedModel":
    from llmship.models.sources import load_model as _load

    return _load(source)


def build_decoder(loaded: "LoadedModel", max_context: int, cache_dtype: str = "fp32",
                  weights: "dict[str, torch.Tensor] | None" = None) -> "MobileDecoder":
    """The canonical model for `loaded` with a KV cache of `cache_dtype` ("fp32" or "fp16"); its weights are
    `loaded.weights` (or `weights`, e.g. a compressed reference's), shared, not copied: a tied matrix stays one tensor."""
    import torch

    from llmship.errors import ModelError
    from llmship.models.decoder import MobileDecoder

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[cache_dtype]
    decoder = MobileDecoder(loaded.spec, max_context, dtype)
    missing, unexpected = decoder.load_state_dict(weights if weights is not None else loaded.weights, strict=False, assign=True)
    if loaded.spec.tie_word_embeddings:
        decoder.lm_head.weight = decoder.model.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"{loaded.source}: weights do not fit the canonical model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return decoder.eval()
