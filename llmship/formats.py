"""The format registry: one entry per artifact format and the runtime that runs it.

An entry names everything llmship knows about a format, in one place:
- `exporter`: the module that writes the artifact. It defines `check(target, spec=None)` (what its runtime can
  hold, raising ConfigError naming the field; cheap: no converter is imported) and `export(job) -> ExportResult`.
- `runner`: `module:factory` of the runner that opens the artifact on its runtime (validation/runners/).
- `toolchain`: the packages whose versions the manifest records and the incremental-build hash covers.
- `install`: how a user gets the toolchain when it is missing (exit 5).
- `profiles`: the YAML file of its target profiles (in llmship/targets/, or an absolute path).
- `adapter_modes`: how it carries LoRA adapters (llmship/adapters/): "merge" (folded into the weights before
  export: every format) and, where llmship writes the runtime's own mechanism, "separate".

Adding a runtime is one entry here plus its exporter module, its runner module and its YAML file.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from llmship.errors import ConfigError, RuntimeMissing


@dataclass(frozen=True)
class FormatEntry:
    name: str  # a target's `format`
    runtime: str  # a target's `runtime`, recorded in the manifest
    exporter: str
    runner: str
    toolchain: tuple[str, ...]
    install: str
    profiles: str
    description: str = ""
    adapter_modes: tuple[str, ...] = ("merge",)


FORMATS: dict[str, FormatEntry] = {e.name: e for e in (
    FormatEntry("executorch", "executorch", "llmship.exporters.executorch",
                "llmship.validation.runners.executorch:ExecuTorchRunner", ("executorch", "torchao"),
                "pip install executorch==1.5.1 torchao==0.18.0", "executorch.yaml", "ExecuTorch .pte, XNNPACK", ("merge", "separate")),
    FormatEntry("onnx", "onnxruntime", "llmship.exporters.onnx", "llmship.validation.runners.onnx:OnnxRunner",
                ("onnx", "onnxruntime", "onnxscript", "onnx-ir", "onnxruntime-genai"),
                "pip install onnx==1.23.2 onnxruntime==1.31.1 onnxscript==0.7.2 onnxruntime-genai==0.18.0", "onnx.yaml",
                "ONNX Runtime (CPU), also an onnxruntime-genai model folder", ("merge", "separate")),
    FormatEntry("tflite", "litert", "llmship.exporters.tflite", "llmship.validation.runners.litert:LiteRTRunner",
                ("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "litert-converter"),
                "pip install litert-torch==0.10.0 ai-edge-litert==2.3.0 ai-edge-quantizer==0.10.0", "tflite.yaml",
                "LiteRT (TFLite) with prefill/decode signatures", ("merge", "separate")),
    FormatEntry("coreml", "coreml", "llmship.exporters.coreml", "llmship.validation.runners.coreml:open_coreml_runner",
                ("coremltools", "numpy"), "pip install coremltools==9.0", "coreml.yaml",
                "Core ML ML program (iOS 18), stateful KV cache", ("merge", "separate")),
    FormatEntry("pytorch", "pytorch", "llmship.exporters.pytorch", "llmship.validation.runners.reference:ReferenceRunner",
                ("safetensors",), "pip install torch==2.13.0 safetensors", "pytorch.yaml",
                "the canonical model itself (the reference)"),
)}


def get_format(name: str) -> FormatEntry:
    if name not in FORMATS:
        raise ConfigError(f"unknown format '{name}'; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of_runtime(runtime: str) -> FormatEntry:
    for entry in FORMATS.values():
        if entry.runtime == runtime:
            return entry
    raise ConfigError(f"unknown runtime '{runtime}'; known: {', '.join(e.runtime for e in FORMATS.values())}")


def profile_files() -> list[Path]:
    here = Path(__file__).parent / "targets"
    return [Path(e.profiles) if Path(e.profiles).is_absolute() else here / e.profiles for e in FORMATS.values()]


def _import(module: str, entry: FormatEntry):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeMissing(f"the {entry.name} toolchain is not installed ({exc}); install it with: {entry.install}") from None


def exporter(name: str):
    """The exporter module of a format (imports its toolchain lazily; a missing one is exit 5)."""
    entry = get_format(name)
    return _import(entry.exporter, entry)


def runner_factory(name: str):
    """The callable that opens an artifact of a format: factory(artifact_dir, manifest, threads) -> Runner."""
    entry = get_format(name)
    module, _, attr = entry.runner.partition(":")
    return getattr(_import(module, entry), attr)


def toolchain_packages(name: str) -> tuple[str, ...]:
    """What a format's manifest records and its build hash covers: llmship, torch, the model loaders'
    packages and the format's own toolchain."""
    from llmship.models.sources import LOADER_PACKAGES

    return ("llmship", "torch", *LOADER_PACKAGES, *get_format(name).toolchain)
