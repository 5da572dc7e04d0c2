"""PEFT LoRA adapter directories: adapter_config.json + adapter_model.safetensors (never pickle).

What is read: `r`, `lora_alpha`, `use_rslora`, `rank_pattern` / `alpha_pattern` (per-module overrides, matched the
way PEFT matches them: the key is a regex that must match the end of the module name at a `.` boundary), and one
(A [r, in], B [out, r]) pair per adapted linear. What a LoRA variant adds beyond W + s * B @ A (DoRA, LoRA biases,
trained bias or embedding rows, replicated layers) is refused with the field that asks for it, not approximated.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmship.errors import ModelError

if TYPE_CHECKING:
    import torch

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
# Fields whose non-default value asks for more than W + s * B @ A: (field, its neutral values).
UNSUPPORTED = (("use_dora", (False, None)), ("lora_bias", (False, None)), ("bias", ("none", None)),
               ("fan_in_fan_out", (False, None)), ("modules_to_save", (None, [])), ("trainable_token_indices", (None, [], {})),
               ("layer_replication", (None, [])), ("use_qalora", (False, None)), ("alora_invocation_tokens", (None, [])),
               ("target_parameters", (None, [])))


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    sha256: str  # of adapter_config.json and the weights: what the manifest records and the build hash covers
    lora: "dict[str, tuple[torch.Tensor, torch.Tensor, float]]" = field(repr=False)  # module -> (A, B, scale)

    @property
    def params(self) -> int:
        return sum(a.numel() + b.numel() for a, b, _ in self.lora.values())

    def entry(self) -> dict:
        """The manifest's description of this adapter."""
        ranks = sorted({a.shape[0] for a, _, _ in self.lora.values()})
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "modules": len(self.lora),
                "ranks": ranks, "params": self.params}


def adapter_digest(path: Path) -> str:
    """sha256 over the sha256 of adapter_config.json and of the weights."""
    from llmship.manifest import sha256_file

    return hashlib.sha256("".join(sha256_file(path / name) for name in (CONFIG, WEIGHTS)).encode()).hexdigest()


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_config(path: Path) -> dict:
    from llmship.models.hf_dir import read_json_object

    cfg_file = path / CONFIG
    if not path.is_dir():
        raise ModelError(f"adapter directory not found: {path}")
    config = read_json_object(cfg_file, f"{path} has no {CONFIG}: not a PEFT adapter directory")
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{cfg_file}: peft_type {config.get('peft_type')!r}; llmship reads LoRA adapters (peft_type LORA)")
    for key, neutral in UNSUPPORTED:
        if config.get(key) not in neutral:
            raise ModelError(f"{cfg_file}: {key}={config[key]!r} is not supported (llmship merges and ships plain LoRA: "
                             "W + scale * B @ A)")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ModelError(f"{cfg_file}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ModelError(f"{cfg_file}: {key} must be an object of module pattern -> number")
    return config


def read_adapter(path: str | Path, name: str) -> Adapter:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser().resolve()
    config = read_config(path)
    weights_file = path / WEIGHTS
    if not weights_file.is_file():
        pickles = [p for p in PICKLE if (path / p).is_file()]
        if pickles:
            raise ModelError(f"{path} has only pickle weights ({', '.join(pickles)}); llmship refuses them because unpickling "
                             "can run arbitrary code. Save the adapter with safe_serialization=True")
        raise ModelError(f"{path} has no {WEIGHTS}")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot read adapter weights {weights_file}: {str(exc).splitlines()[0]}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ModelError(f"{weights_file}: tensor {key} is not a LoRA A/B matrix (llmship reads plain LoRA only)")
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise ModelError(f"{weights_file}: {key} must be a 2-D float matrix, got {tensor.dtype} {tuple(tensor.shape)}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor.float()
    if not pairs:
        raise ModelError(f"{weights_file} holds no LoRA matrices")
    rslora = bool(config.get("use_rslora"))
    lora = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ModelError(f"{weights_file}: {module} has lora_{''.join(ab)} without its partner")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if b.shape[1] != r:
            raise ModelError(f"{weights_file}: {module}: lora_A is rank {r} but lora_B is {tuple(b.shape)}")
        expected_r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if r != expected_r:
            raise ModelError(f"{weights_file}: {module} has rank {r} but adapter_config.json says r={expected_r}")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        lora[module] = (a, b, alpha / (r ** 0.5 if rslora else r))
    return Adapter(name, path, adapter_digest(path), lora)
