"""The compressed reference: the canonical model computing with the record's weights and the runtime's activation
quantization, in PyTorch. Comparing an artifact with it measures the converter alone (is the file right?);
comparing with the FP32 reference measures what the user gets (is the recipe good enough?)."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from llmship.compress.activations import simulate
from llmship.compress.record import WeightRecord


class FakeQuantLinear(nn.Module):
    """A linear whose input is quantized the way the runtime quantizes it, then multiplied by its (record) weight."""

    def __init__(self, linear: nn.Linear, scheme: dict):
        super().__init__()
        self.linear, self.scheme = linear, scheme

    def forward(self, x):
        return F.linear(simulate(self.scheme, x), self.linear.weight, self.linear.bias)


def compressed_reference(loaded, record: WeightRecord, max_context: int, cache_dtype: str = "fp32"):
    """A MobileDecoder with the record's dequantized weights; the linears the runtime runs with quantized inputs
    (record.activations names them: projections, the head) fake-quantize their inputs the same way."""
    from llmship.models import build_decoder

    decoder = build_decoder(loaded, max_context, cache_dtype, weights=record.dequantized_weights(loaded.weights))
    for name in record.activations:
        scheme = linear_scheme(record, name)
        if scheme.get("scheme", "none") == "none":
            continue
        parent, _, attr = name.rpartition(".")
        owner = decoder.get_submodule(parent) if parent else decoder
        setattr(owner, attr, FakeQuantLinear(getattr(owner, attr), scheme))
    return decoder


def linear_scheme(record: WeightRecord, name: str) -> dict:
    """The activation scheme of one linear: `block: "group"` means the block of that linear's own weight grid
    (a tied head's is the embedding's)."""
    scheme = dict(record.activations[name])
    if scheme.get("block") == "group":
        t = record.tensors.get(name) or record.tensors["model.embed_tokens"]
        scheme["block"] = t.grid.group_size or t.shape[1]
    return scheme
