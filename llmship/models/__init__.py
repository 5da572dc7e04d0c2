"""Model sources and the canonical static-KV-cache decoder."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmship.models.decoder import MobileDecoder
    from llmship.models.sources import LoadedModel


def load_model(source: str) -> "LoadedModel":
    from llmship.models.sources import load_model as _load

    return _load(source)


def build_decoder(loaded: "LoadedModel", max_context: int, cache_dtype=None) -> "MobileDecoder":
    """The FP32 canonical model for `loaded`, weights shared with it (a tied matrix stays one tensor)."""
    import torch

    from llmship.models.decoder import MobileDecoder

    decoder = MobileDecoder(loaded.spec, max_context, cache_dtype or torch.float32)
    missing, unexpected = decoder.load_state_dict(loaded.weights, strict=False, assign=True)
    if loaded.spec.tie_word_embeddings:
        decoder.lm_head.weight = decoder.model.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        from llmship.errors import ModelError

        raise ModelError(f"{loaded.source}: weights do not fit the canonical model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return decoder.eval()
