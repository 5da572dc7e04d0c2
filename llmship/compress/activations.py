"""The activation quantization a runtime applies at run time to a quantized linear's input, simulated in PyTorch.

The compressed reference runs these on the inputs of the linears the record quantized, so that comparing an
artifact with it isolates the converter: what is left is kernel rounding (summation order, fp16 storage), not
the recipe. Each scheme is written after the runtime's own formula and checked against the runtime in tests.

  int8_per_token_asymmetric    XNNPACK's qd8 dynamic quantization (ExecuTorch 8da4w/8da8w, LiteRT dynamic
                               range): per row, range widened to include 0, 255 levels, zero point chosen
                               from the side with the smaller rounding error, fp32 arithmetic, ties to even.
  int8_per_block_symmetric     ONNX Runtime MatMulNBits at accuracy_level 4: per row and per block of
                               `block` inputs, scale = max|x| / 127.
  uint8_per_tensor_asymmetric  ONNX Runtime DynamicQuantizeLinear (MatMulInteger): one scale and zero point for
                               the whole input tensor of the call.
"""
from __future__ import annotations

import torch


def int8_per_token_asymmetric(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    rmin = torch.clamp(x.amin(-1, keepdim=True), max=0.0)
    rmax = torch.clamp(x.amax(-1, keepdim=True), min=0.0)
    same = rmin == rmax
    mult = torch.where(same, torch.ones_like(rmin), 255.0 / torch.where(same, torch.ones_like(rmin), rmax - rmin))
    dmin, dmax = rmin * mult, rmax * mult
    zero = torch.round(torch.where((-128.0 + dmin) + (127.0 + dmax) > 0, -128.0 - dmin, 127.0 - dmax).clamp(-128, 127))
    q = torch.clamp(torch.round(x * mult) + zero, -128, 127)
    return (q - zero) * (1.0 / mult)


def int8_per_block_symmetric(x: torch.Tensor, block: int) -> torch.Tensor:
    x = x.float()
    k = x.shape[-1]
    pad = (-k) % block
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    blocks = xp.reshape(*xp.shape[:-1], -1, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    q = torch.clamp(torch.round(blocks * inv), -127, 127)
    return (q * scale).reshape(xp.shape)[..., :k]


def uint8_per_tensor_asymmetric(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    if scale == 0:
        return torch.zeros_like(x)
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return (q - zero) * scale


SCHEMES = {
    "none": None,
    "int8_per_token_asymmetric": int8_per_token_asymmetric,
    "int8_per_block_symmetric": int8_per_block_symmetric,
    "uint8_per_tensor_asymmetric": uint8_per_tensor_asymmetric,
}


def simulate(scheme: dict, x: torch.Tensor) -> torch.Tensor:
    """Apply `scheme` ({"scheme": name, **params}) to a linear's input x."""
    name = scheme.get("scheme", "none")
    fn = SCHEMES[name]
    if fn is None:
        return x
    params = {k: v for k, v in scheme.items() if k != "scheme"}
    return fn(x, **params).to(x.dtype)
