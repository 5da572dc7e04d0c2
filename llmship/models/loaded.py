"""What a source resolves to: the config, its spec, FP32 weights with Hugging Face names, and the tokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field
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
    # A source already quantized in blocks (GGUF Q4_0/Q4_1/Q8_0): its own codes, by module name, so the
    # compression stage can ship that exact grid where a runtime holds it (`recipe.algorithm: source`).
    source_blocks: dict = field(default_factory=dict)
    # Adapters as the manifest records them (llmship/adapters/): {"mode": "merge", "list": [entry]} when folded into
    # `weights`; {"mode": "separate", "list": [entry, ...]} when shipped beside the base, which is then `lora`.
    adapters: dict | None = None
    lora: tuple = ()  # separate mode: the adapters.Adapter objects (the weights stay the base's)
    # A pruned (and healed) student of the source (compress/structure.py): what was kept and its weights' digest, as
    # the manifest records it. The spec and weights are then the student's; the source's FP32 model is the reference.
    structure: dict | None = None


@dataclass(frozen=True)
class SourceBlocks:
    """One matrix [N, K] as its source stores it: `kind` Q4_0 (w = d * (q - 8)), Q4_1 (w = d * q + m) or Q8_0
    (w = d * q), blocks of `block` inputs; codes int8 [N, K], d and m float32 [N, K / block]."""

    kind: str
    block: int
    codes: "torch.Tensor"
    d: "torch.Tensor"
    m: "torch.Tensor | None" = None
