"""Exporters: one module per format, named by the format registry (llmship/formats.py), imported only when used.

Each module defines
    check(target, spec=None) -> None     what its runtime can hold (bit widths, group sizes, grids, dtypes),
                                         raising ConfigError naming the field; cheap (no converter imported).
    weight_plan(target, spec) -> (grids, activations)
                                         the grid (llmship/compress/grids.py) every matrix of this model must
                                         land on for this runtime (None: stored in float), and how the runtime
                                         quantizes each quantized linear's input; the compression stage builds
                                         the record on these grids.
    export(job: ExportJob) -> ExportResult
                                         traces the model it is handed (never rebuilds it), writes the record's
                                         weights exactly in its runtime's own form, and writes the model file(s)
                                         into `job.out_dir`; with `adapters: {mode: separate}` (only for
                                         formats listing it in adapter_modes) also one adapter file per
                                         `job.loaded.lora` entry, named in ExportResult.adapters.
The pipeline adds tokenizer.json and manifest.json and makes the directory appear atomically. Exporters import
nothing from llmship.validation.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmship.compress.record import WeightRecord
    from llmship.config import TargetProfile
    from llmship.models.decoder import MobileDecoder
    from llmship.models.loaded import LoadedModel


@dataclass(frozen=True)
class ExportJob:
    decoder: "MobileDecoder"  # the canonical model, max_context and cache dtype already set from the target
    loaded: "LoadedModel"
    target: "TargetProfile"
    out_dir: Path  # write model files here (a temporary directory, renamed when all is done)
    record: "WeightRecord | None" = None  # the quantized weights to ship (None: every weight stays float)


@dataclass(frozen=True)
class ExportResult:
    entry_points: dict[str, dict]  # name -> {"file", "method"/"signature", "inputs": [...], "outputs": [...]}
    kv_cache: dict[str, Any]  # {"held_as": "state"|"inputs", "dtype", "layout", ...}
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific manifest fields
    # separate adapters (job.loaded.lora): {"files": {name: file}, "dtype": fp16|fp32, "select": how an app activates
    # one, "entries": {name: {more manifest fields}} (optional: e.g. the functions that run it, its bytes inside a
    # file it shares with the base)}
    adapters: dict[str, Any] = field(default_factory=dict)


ROLES = ("tokens", "positions", "logits", "cache")


def tensor_spec(name: str, dtype: str, shape: list, role: str) -> dict:
    """One input or output of an entry point. `role` tells a caller what to feed: token ids, positions (the
    first token's or every token's), the logits, or a KV-cache tensor."""
    assert role in ROLES, role
    return {"name": name, "dtype": dtype, "shape": list(shape), "role": role}


@contextlib.contextmanager
def _fd_to_devnull(fd: int):
    """Point file descriptor `fd` at /dev/null for the block: converters' C++ code (TFLite's converter, absl,
    oneDNN) writes its log lines to the process's stderr directly, past Python's sys.stderr."""
    import sys

    stream = sys.stderr if fd == 2 else sys.stdout
    with contextlib.suppress(Exception):
        stream.flush()
    saved = os.dup(fd)
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(sink)


@contextlib.contextmanager
def quiet():
    """The converters' chatter (deprecation warnings, optional kernels that did not load, passes logged at INFO,
    progress bars, C++ log lines) is not the user's business; errors still surface as exceptions, and `--debug`
    lets it all through."""
    loggers = [logging.getLogger(n) for n in ("", "torch", "torchao", "torch.onnx", "onnx_ir", "onnxruntime.quantization",
                                              "coremltools", "executorch", "ai_edge_quantizer", "absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        # Python-level stdout/stderr too: converters' own progress lines (coremltools' pass pipelines,
        # litert-torch's stage timings) are printed there. TF_CPP_MIN_LOG_LEVEL quiets the TFLite converter's
        # C++ INFO lines (it reads the variable when it logs); what it still writes goes to /dev/null.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), \
                contextlib.redirect_stdout(sink), _fd_to_devnull(1), _fd_to_devnull(2):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
