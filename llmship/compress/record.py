"""The quantized-weight record: what the compression stage decided, tensor by tensor, for every exporter to ship.

For each quantized matrix (a linear, the embedding, an untied head) it holds the grid (bits, group size,
symmetric or asymmetric, code range, scale storage dtype), the integer codes, the scales (already rounded to
the storage dtype) and the zero points, so `dequantize()` is exactly the weight the runtime computes with.
A tied embedding/head is one entry (`model.embed_tokens`) whose grid both uses hold. The activation scheme the
runtime applies at run time is part of the record too: together they define the compressed reference.

The record is serializable (safetensors for the tensors, JSON for the rest) and has a digest over its
content, which goes into the manifest and the incremental-build hash.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmship.compress.grids import Grid

RECORD_VERSION = 1


@dataclass(frozen=True)
class QuantizedTensor:
    name: str  # the module, e.g. "model.layers.0.self_attn.q_proj" or "model.embed_tokens"
    grid: Grid
    codes: torch.Tensor  # int16 [N, K], in [grid.qmin, grid.qmax]
    scale: torch.Tensor  # float32 [N, G], exactly representable in grid.scale_dtype
    zero: torch.Tensor | None  # float32 [N, G] (integers for an "int" zero point) or None

    def dequantize(self) -> torch.Tensor:
        return self.grid.dequantize(self.codes, self.scale, self.zero)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def stored_bytes(self) -> int:
        """Bytes a runtime stores for it: codes at `bits` each, plus scales and zero points."""
        n, k = self.shape
        groups = self.scale.numel() // (2 ** self.grid.bits if self.grid.palette else 1)
        scale_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}[self.grid.scale_dtype]
        zero_bytes = 0 if self.zero is None else (self.grid.bits / 8 if self.grid.zero_point == "int" else 2)
        per_group = scale_bytes * 2 ** self.grid.bits if self.grid.palette else scale_bytes + zero_bytes
        return int(n * k * self.grid.bits / 8 + groups * per_group)


@dataclass(frozen=True)
class WeightRecord:
    tensors: dict[str, QuantizedTensor]
    activations: dict  # linear module -> how the runtime quantizes its input, e.g. {"scheme": "int8_per_token_asymmetric"}
    algorithm: str
    notes: dict = field(default_factory=dict)  # per-tensor facts worth reporting (fallbacks, source grids kept)

    def weight_name(self, module: str) -> str:
        return f"{module}.weight"

    def dequantized_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`weights` (Hugging Face names) with every recorded matrix replaced by its dequantized value."""
        out = dict(weights)
        for name, t in self.tensors.items():
            out[self.weight_name(name)] = t.dequantize()
        return out

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(self._meta(), sort_keys=True).encode())
        for name in sorted(self.tensors):
            t = self.tensors[name]
            for part in (t.codes.to(torch.int16), t.scale.float(), t.zero):
                if part is not None:
                    h.update(part.contiguous().numpy().tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        """What the manifest and the report show: each tensor's grid, and the bytes the codes and scales take."""
        return {"algorithm": self.algorithm, "activations": self.activations, "notes": self.notes,
                "tensors": {n: {**t.grid.describe(), "shape": list(t.shape), "bytes": t.stored_bytes()}
                            for n, t in sorted(self.tensors.items())}}

    # ---- serialization --------------------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {"record_version": RECORD_VERSION, "algorithm": self.algorithm, "activations": self.activations,
                "notes": self.notes, "grids": {n: _grid_dict(t.grid) for n, t in sorted(self.tensors.items())}}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, t in self.tensors.items():
            tensors[f"{name}.codes"] = t.codes.to(torch.int16).contiguous()
            tensors[f"{name}.scale"] = t.scale.float().contiguous()
            if t.zero is not None:
                tensors[f"{name}.zero"] = t.zero.float().contiguous()
        from llmship.outputs import write_atomically

        write_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"llmship_record": json.dumps(self._meta())}))

    @classmethod
    def load(cls, path: Path) -> "WeightRecord":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["llmship_record"])
            tensors = {}
            for name, grid in meta["grids"].items():
                zero = f.get_tensor(f"{name}.zero") if f"{name}.zero" in f.keys() else None
                tensors[name] = QuantizedTensor(name, Grid(**grid), f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scale"), zero)
        return cls(tensors, meta["activations"], meta["algorithm"], meta["notes"])


def _grid_dict(grid: Grid) -> dict:
    from dataclasses import asdict

    return asdict(grid)
