"""What a source resolves to: the config, its spec, FP32 weights with Hugging Face names, and the tokenizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers
    import torch

    from llmship.models.spec import ModelSpec


@dataclass(frozen=True)
class LoadedModel:
    source: str
    config: dict  # the Hugging Face config dict the spec was read from
    spec: "ModelSpec"
    weights: "dict[str, torch.Tensor]"  # fp32, Hugging Face names; a tied lm_head is absent
    tokenizer: "tokenizers.Tokenizer"
    files: tuple[Path, ...] = ()  # the source files, for content hashing
