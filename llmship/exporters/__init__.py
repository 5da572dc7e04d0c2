"""Exporters: one module per format, registered by name and imported only when used.

Each module defines `export(job: ExportJob) -> ExportResult`: it traces the canonical model, applies the
target's recipe with its runtime's own toolchain and writes the model file(s) into `job.out_dir`. The
pipeline adds tokenizer.json and manifest.json and makes the directory appear atomically.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmship.errors import ConfigError

if TYPE_CHECKING:
    from llmship.config import TargetProfile
    from llmship.models.decoder import MobileDecoder
    from llmship.models.sources import LoadedModel

EXPORTERS = {
    "pytorch": "llmship.exporters.pytorch",
    "onnx": "llmship.exporters.onnx",
    "tflite": "llmship.exporters.tflite",
    "coreml": "llmship.exporters.coreml",
    "executorch": "llmship.exporters.executorch",
}


@dataclass(frozen=True)
class ExportJob:
    decoder: "MobileDecoder"  # FP32 canonical model, max_context already set from the target
    loaded: "LoadedModel"
    target: "TargetProfile"
    out_dir: Path  # write model files here (a temporary directory, renamed when all is done)


@dataclass(frozen=True)
class ExportResult:
    entry_points: dict[str, dict]  # name -> {"file", "method"/"signature", "inputs": [...], "outputs": [...]}
    kv_cache: dict[str, Any]  # {"held_as": "state"|"inputs", "dtype", "layout", ...}
    toolchain: tuple[str, ...] = ()  # package names whose versions go into the manifest
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific manifest fields


def get_exporter(fmt: str):
    if fmt not in EXPORTERS:
        raise ConfigError(f"unknown format '{fmt}'; known formats: {', '.join(EXPORTERS)}")
    return importlib.import_module(EXPORTERS[fmt])


def tensor_spec(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape)}


@contextlib.contextmanager
def quiet():
    """The converters' chatter (deprecation warnings, optional kernels that did not load, passes logged at INFO,
    progress bars) is not the user's business; errors still surface as exceptions, and `--debug` lets it all
    through."""
    loggers = [logging.getLogger(n) for n in ("", "torch", "torchao", "torch.onnx", "onnx_ir", "onnxruntime.quantization",
                                              "coremltools", "executorch", "ai_edge_quantizer", "absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        # Python-level stdout/stderr too: converters' own progress lines (coremltools' pass pipelines,
        # litert-torch's stage timings) are printed there. TF_CPP_MIN_LOG_LEVEL quiets the TFLite converter's
        # C++ INFO lines (it reads the variable when it logs).
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), \
                contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
