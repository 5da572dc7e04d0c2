"""A separate adapter as it ships: per adapted linear, A^T [in, r] and (scale * B)^T [r, out] in fp16 or fp32
(`storage_dtype`), so a runtime computes y = x W^T + (x A^T)(s B)^T beside the base weights, whatever grid those
are on.

`stored_pair` is the one place that rounding happens: exporters write its tensors and the compressed reference
(`with_branches`) computes with the same tensors, so the conversion check compares like with like; the FP32
reference (`adapters.merged`) keeps the adapter exact, so parity includes the rounding a user gets.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def storage_dtype(setting: str, target) -> str:
    """`adapters.dtype` for one target: auto is fp32 beside fp32 weights, fp16 beside anything smaller."""
    if setting != "auto":
        return setting
    return "fp32" if target.recipe.weights == "fp32" and target.recipe.compute == "fp32" else "fp16"


def stored_pair(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A^T [in, r], (scale * B)^T [r, out]) as a runtime stores them: `dtype`, contiguous."""
    return a.t().contiguous().to(DTYPES[dtype]), (b * scale).t().contiguous().to(DTYPES[dtype])


def input_names(module: str) -> tuple[str, str]:
    """The names an adapter's two tensors for `module` carry in the artifact and in its adapter files."""
    return f"{module}.lora_A", f"{module}.lora_B"


class LoraBranch(nn.Module):
    """`inner(x) + (x @ A^T) @ (s B)^T` with the stored tensors, computed in fp32."""

    def __init__(self, inner: nn.Module, a_t: torch.Tensor, b_t: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("a_t", a_t.float(), persistent=False)
        self.register_buffer("b_t", b_t.float(), persistent=False)

    def forward(self, x):
        return self.inner(x) + F.linear(F.linear(x, self.a_t.t()), self.b_t.t())


def with_branches(decoder: nn.Module, adapter, dtype: str) -> nn.Module:
    """`decoder` with `adapter`, stored in `dtype`, running beside its linears (in place; returns it)."""
    for module, (a, b, scale) in adapter.lora.items():
        parent, _, attr = module.rpartition(".")
        owner = decoder.get_submodule(parent)
        setattr(owner, attr, LoraBranch(getattr(owner, attr), *stored_pair(a, b, scale, dtype)))
    return decoder
