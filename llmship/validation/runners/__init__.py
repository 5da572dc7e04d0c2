"""Runners: one per runtime, each opening an artifact directory from its manifest.

Protocol (what every runner implements; the evaluation only talks to this):
    executor: str                                     e.g. "onnxruntime 1.31.1 CPUExecutionProvider"
    prefill(tokens: Sequence[int], input_pos) -> np.ndarray[T, vocab] float32 (logits at every position)
    decode(token: int, input_pos) -> np.ndarray[vocab] float32
    reset() -> None                                   forget the KV cache
    close() -> None
`prefill` takes 1 <= T <= max(prefill_lengths) tokens; a runner whose format has fixed lengths pads.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from llmship.errors import ConfigError, RuntimeMissing

RUNNERS = {
    "pytorch": "llmship.validation.runners.reference:ReferenceRunner",
    "onnxruntime": "llmship.validation.runners.onnx:OnnxRunner",
    "litert": "llmship.validation.runners.litert:LiteRTRunner",
    "coreml": "llmship.validation.runners.coreml:open_coreml_runner",
    "executorch": "llmship.validation.runners.executorch:ExecuTorchRunner",
}


class Runner(Protocol):
    executor: str

    def prefill(self, tokens: Sequence[int], input_pos: int) -> np.ndarray: ...

    def decode(self, token: int, input_pos: int) -> np.ndarray: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


def require(module: str, runtime: str, install: str):
    """Import a runtime's Python package or raise RuntimeMissing (exit 5) saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeMissing(f"{runtime} is not installed ({exc}); install it with: {install}") from None


def check_positions(t: int, input_pos: int, max_context: int) -> None:
    """Every runner's range check: T >= 1 tokens at positions input_pos.. inside the KV cache."""
    if t < 1:
        raise ConfigError("prefill needs at least one token")
    if input_pos < 0 or input_pos + t > max_context:
        raise ConfigError(f"positions {input_pos}..{input_pos + t - 1} do not fit the KV cache of max_context {max_context}")


def open_runner(artifact_dir: str | Path, manifest: dict, threads: int | None = None) -> Runner:
    runtime = manifest.get("runtime")
    if runtime not in RUNNERS:
        raise ConfigError(f"{artifact_dir}: unknown runtime '{runtime}' in manifest; known: {', '.join(RUNNERS)}")
    module, _, name = RUNNERS[runtime].partition(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(Path(artifact_dir), manifest, threads or manifest.get("threads", 2))
