"""The compressed reference: the canonical model computing with the record's weights and the runtime's activation
quantization, in PyTorch. Comparing an artifact with it measures the converter alone (is the file right?);
comparing with the FP32 reference measures what the user gets (is the recipe good enough?)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from llmship.compress.activations import simulate
from llmship.compress.record import WeightRecord


class FakeQuantLinear(nn.Module):
    """A linear whose input is quantized the way the runtime quantizes it, then multiplied by its (record) weight.

    With `split` (ONNX Runtime's integer kernel plus fp32 correction for float zero points, exporters/onnx_weights)
    only the integer part sees the quantized input: y = q(x) @ ((c - zi) s)^T - x @ (zr s)^T with z = zi + zr."""

    def __init__(self, linear: nn.Linear, scheme: dict, split: tuple | None = None, noise=None):
        super().__init__()
        self.linear, self.scheme, self.noise = linear, scheme, noise
        if split is not None:
            self.register_buffer("whole", split[0], persistent=False)
            self.register_buffer("remainder", split[1], persistent=False)
        self.split = split is not None

    def forward(self, x):
        if self.noise is not None:  # (relative size, generator): the kernel-rounding perturbation of `noise_floor`
            size, gen = self.noise
            x = x * (1 + size * torch.randn(x.shape, generator=gen))
        if self.split:
            return F.linear(simulate(self.scheme, x), self.whole, self.linear.bias) - F.linear(x, self.remainder)
        return F.linear(simulate(self.scheme, x), self.linear.weight, self.linear.bias)


def split_float_zero(t) -> tuple:
    """(integer-zero-point weight, remainder weight) of a record tensor with float zero points."""
    whole = torch.clamp(torch.round(t.zero), t.grid.qmin, t.grid.qmax)
    k = t.shape[1]
    expand = lambda v: v.repeat_interleave(t.grid.group_size, dim=1)[:, :k]  # noqa: E731
    w_int = (t.codes.float() - expand(whole)) * expand(t.scale)
    w_rem = expand((t.zero - whole) * t.scale)
    return w_int, w_rem


# Relative perturbation standing for what two correct kernels differ by before quantizing an input (fp32
# summation order, fused multiply-adds: ~1e-7 per term). Dynamic activation quantization turns such differences
# into whole-step code flips, which grow through the layers: the artifact cannot match the compressed reference
# more closely than the compressed reference matches itself under this perturbation (the noise floor).
KERNEL_NOISE = 1e-6


def has_dynamic_activations(record: WeightRecord) -> bool:
    return any(s.get("scheme", "none") != "none" for s in record.activations.values())


def compressed_reference(loaded, record: WeightRecord, max_context: int, cache_dtype: str = "fp32", noise_seed: int | None = None):
    """A MobileDecoder with the record's dequantized weights; the linears the runtime runs with quantized inputs
    (record.activations names them: projections, the head) fake-quantize their inputs the same way. With
    `noise_seed`, their inputs are first perturbed by KERNEL_NOISE (the noise-floor measurement)."""
    from llmship.models import build_decoder

    decoder = build_decoder(loaded, max_context, cache_dtype, weights=record.dequantized_weights(loaded.weights))
    for name in record.activations:
        scheme = linear_scheme(record, name)
        if scheme.get("scheme", "none") == "none":
            continue
        parent, _, attr = name.rpartition(".")
        owner = decoder.get_submodule(parent) if parent else decoder
        t = record.tensors.get(name) or record.tensors.get("model.embed_tokens")
        split = split_float_zero(t) if scheme.pop("split_float_zero", False) else None
        noise = None if noise_seed is None else (KERNEL_NOISE, torch.Generator().manual_seed(noise_seed))
        setattr(owner, attr, FakeQuantLinear(getattr(owner, attr), scheme, split, noise))
    return decoder


def linear_scheme(record: WeightRecord, name: str) -> dict:
    """The activation scheme of one linear: `block: "group"` means the block of that linear's own weight grid
    (a tied head's is the embedding's)."""
    scheme = dict(record.activations[name])
    if scheme.get("block") == "group":
        t = record.tensors.get(name) or record.tensors["model.embed_tokens"]
        scheme["block"] = t.grid.group_size or t.shape[1]
    return scheme
