"""Separate adapters as inputs of the model (LiteRT-LM's LoRA mechanism): the artifact gains one more set of entry
points, `<entry>_lora`, whose inputs include, for every linear some adapter touches, A^T [in, R] and (s B)^T [R, out]
(adapters/branch.py: `stored_pair`) at R, the largest rank among the adapters; each adapter ships as one small
safetensors file of its own tensors at its own rank, in adapters.dtype. To run one, an app reads its file, pads each
tensor with zeros to R (exact: padded columns of A^T meet zero rows of (s B)^T), gives every module the file lacks
zeros, and passes them with the usual inputs. However many adapters ship, the model file holds one copy of the
base and one copy of the `_lora` programs; an adapter costs its file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmship.adapters.branch import input_names, stored_pair

ENTRY_SUFFIX = "lora"
DIR = "adapters"
SUFFIX = ".safetensors"


def entry(name: str) -> str:
    """The entry point that runs `name` with the adapter passed as inputs."""
    return f"{name}_{ENTRY_SUFFIX}"


@dataclass(frozen=True)
class Slot:
    """One adapted linear as the `_lora` entry points take it: the file's tensor names and the model's input names."""

    module: str
    in_features: int
    out_features: int
    rank: int

    @property
    def files(self) -> tuple[str, str]:  # names in an adapter file
        return input_names(self.module)

    @property
    def inputs(self) -> tuple[str, str]:  # names of the entry points' inputs (identifiers: every converter takes them)
        return tuple(re.sub(r"\W", "_", n) for n in self.files)

    @property
    def shapes(self) -> tuple[list[int], list[int]]:
        return [self.in_features, self.rank], [self.rank, self.out_features]

    def manifest(self) -> dict:
        (a, b), (sa, sb) = self.inputs, self.shapes
        return {"module": self.module, "a": a, "b": b, "a_shape": sa, "b_shape": sb,
                "file_names": list(self.files)}


def slots(decoder: nn.Module, adapters) -> list[Slot]:
    """Every linear some adapter touches, at the largest rank of all (sorted by module)."""
    rank = max(a.shape[0] for adapter in adapters for a, _, _ in adapter.lora.values())
    modules = sorted({m for adapter in adapters for m in adapter.lora})
    return [Slot(m, decoder.get_submodule(m).in_features, decoder.get_submodule(m).out_features, rank) for m in modules]


def sample(slots_: list[Slot]) -> dict[str, torch.Tensor]:
    """Zero inputs for every slot (the shapes converters trace with)."""
    return {name: torch.zeros(shape) for s in slots_ for name, shape in zip(s.inputs, s.shapes)}


class Fed:
    """The tensors of the call in progress, by input name (a plain object, not module state: exporters trace the
    branches' reads of it as reads of the entry point's inputs)."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}


class InputBranch(nn.Module):
    """`inner(x) + (x @ A^T) @ (s B)^T`, with A^T and (s B)^T the entry point's inputs named `names`."""

    def __init__(self, inner: nn.Module, fed: Fed, names: tuple[str, str]):
        super().__init__()
        self.inner, self.fed, self.names = inner, fed, names

    def forward(self, x):
        a, b = (self.fed.tensors[n] for n in self.names)
        return self.inner(x) + torch.matmul(torch.matmul(x, a), b)


class _TakesLora:
    """Mixed into an entry-point module's class by `taking_inputs`: forward takes the slots' tensors as keyword
    inputs (or, when none is given by name, as the last positional ones, in slot order), hands them to the
    branches for the call, and passes everything else on as it came."""

    lora_names: list[str]
    lora_fed: Fed

    def forward(self, *args, **kwargs):
        names = self.lora_names
        if names[0] in kwargs:
            self.lora_fed.tensors = {name: kwargs.pop(name) for name in names}
        else:
            args, lora = args[:-len(names)], args[-len(names):]
            self.lora_fed.tensors = dict(zip(names, lora))
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.lora_fed.tensors = {}


def taking_inputs(module: nn.Module, fed: Fed, slots_: list[Slot]) -> nn.Module:
    """`module` (an entry point over a decoder from `with_inputs`, made for this export) taking the slots' tensors as
    more inputs. Its class changes rather than a wrapper going around it, so its buffers (a stateful model's KV cache)
    keep the names they have in the bare entry points, which runtimes share state by."""
    module.__class__ = type(f"Lora{type(module).__name__}", (_TakesLora, type(module)), {})
    module.lora_names, module.lora_fed = [n for s in slots_ for n in s.inputs], fed
    return module


def with_inputs(decoder: nn.Module, slots_: list[Slot]) -> tuple[nn.Module, Fed]:
    """A copy of `decoder` sharing every weight, with an `InputBranch` beside each slot's linear; and the dict those
    branches read their tensors from (`WithLoraInputs` fills it per call)."""
    import copy

    shared = {id(t): t for t in (*decoder.parameters(), *decoder.buffers())}
    clone, fed = copy.deepcopy(decoder, memo=shared), Fed()
    for s in slots_:
        parent, _, attr = s.module.rpartition(".")
        owner = clone.get_submodule(parent)
        setattr(owner, attr, InputBranch(getattr(owner, attr), fed, s.inputs))
    return clone, fed


def write_files(out_dir: Path, adapters, dtype: str) -> dict[str, str]:
    """One safetensors file per adapter under out_dir/adapters (its tensors at its own rank, in `dtype`); returns
    name -> file relative to out_dir."""
    from safetensors.torch import save_file

    (out_dir / DIR).mkdir(exist_ok=True)
    files = {}
    for adapter in adapters:
        tensors = {}
        for module, (a, b, scale) in sorted(adapter.lora.items()):
            tensors.update(zip(input_names(module), stored_pair(a, b, scale, dtype)))
        files[adapter.name] = f"{DIR}/{adapter.name}{SUFFIX}"
        save_file(tensors, str(out_dir / files[adapter.name]), metadata={"format": "llmship-lora", "dtype": dtype})
    return files


def read_inputs(path: Path, slots_: list[dict]) -> dict[str, np.ndarray]:
    """The `_lora` entry points' inputs for the adapter file at `path`, padded as the module docstring says
    (`slots_`: the manifest's adapters.inputs.slots). Raises ValueError when the file does not fit the slots."""
    from safetensors.numpy import load_file

    tensors, out = load_file(str(path)), {}
    for s in slots_:
        for key, name, shape in ((s["file_names"][0], s["a"], s["a_shape"]), (s["file_names"][1], s["b"], s["b_shape"])):
            full = np.zeros(shape, dtype=np.float32)
            if key in tensors:
                t = tensors.pop(key)
                rank_axis = 1 if name == s["a"] else 0  # A^T [in, r], (s B)^T [r, out]
                if t.ndim != 2 or t.shape[1 - rank_axis] != shape[1 - rank_axis] or t.shape[rank_axis] > shape[rank_axis]:
                    raise ValueError(f"{path.name}: {key} has shape {list(t.shape)}; the model takes {shape} "
                                     f"(rank up to {shape[rank_axis]})")
                full[:t.shape[0], :t.shape[1]] = t
            out[name] = full
    if tensors:
        raise ValueError(f"{path.name}: tensor {sorted(tensors)[0]} adapts no module the model takes an adapter on")
    return out
