"""Core ML runners: Apple's Core ML runtime on macOS, the MIL reference executor everywhere else.

`open_coreml_runner` (the registry entry) chooses: on macOS coremltools' MLModel (Core ML itself, with
an MLState for the KV cache); on other systems, where Core ML does not exist, `MilReferenceRunner`
executes the saved ML program op by op with numpy. Both take the artifact's own `model.mlpackage`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from llmship.adapters.inputs import read_inputs
from llmship.errors import ManifestError, require
from llmship.manifest import artifact_file
from llmship.validation.runners import EntryIO, adapter_entry, check_positions, max_tokens_per_call

REFERENCE_NOTE = ("Apple's Core ML runtime was not run (it exists only on Apple platforms): the reference executor "
                  "proves the serialized ML program computes the right function; it does not prove what Apple's "
                  "runtime outputs on a device.")


def open_coreml_runner(artifact_dir: Path, manifest: dict, threads: int):
    if sys.platform == "darwin":
        return CoreMLRunner(artifact_dir, manifest, threads)
    return MilReferenceRunner(artifact_dir, manifest, threads)


class _CoreMLBase:
    """Chunking and range checks shared by both runners; subclasses implement `_call`."""

    def __init__(self, artifact_dir: Path, manifest: dict):
        entries = manifest["entry_points"]
        self.package = artifact_file(artifact_dir, manifest, entries["decode"]["file"])
        self.manifest, self.dir, self.lora = manifest, artifact_dir, {}
        self.functions = self.base_functions = {name: entries[name].get("function", name) for name in ("prefill", "decode")}
        self.io = {name: EntryIO.of(manifest, name) for name in ("prefill", "decode")}
        self.max_context = int(manifest["max_context"])
        self.max_tokens = max_tokens_per_call(manifest)
        self.max_prefill = int(max(manifest["prefill_lengths"]))

    def prefill(self, tokens: Sequence[int], input_pos: int) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        check_positions(len(tokens), input_pos, self.max_context, self.max_tokens)
        # A prompt longer than the prefill function's range goes in chunks, as an app would feed it.
        chunks = []
        for start in range(0, len(tokens), self.max_prefill):
            chunk = tokens[start:start + self.max_prefill]
            chunks.append(self._call("prefill", chunk, input_pos + start))
        return np.concatenate(chunks, axis=0)

    def decode(self, token: int, input_pos: int) -> np.ndarray:
        check_positions(1, input_pos, self.max_context)
        return self._call("decode", [int(token)], input_pos)[0]

    def set_adapter(self, name: str | None) -> None:
        """Call the `_lora` functions (adapters.list[].functions) with separate adapter `name`'s file as more inputs
        (adapters/inputs.py), or the base's; a new state."""
        functions, self.lora = self.base_functions, {}
        if name is not None:
            entry = adapter_entry(self.manifest, name)
            functions, inputs = entry.get("functions"), self.manifest["adapters"].get("inputs") or {}
            if not isinstance(functions, dict) or set(functions) != {"prefill", "decode"} or not isinstance(inputs.get("slots"), list):
                raise ManifestError(f"manifest.json: adapter {name} must name its prefill and decode functions "
                                    "(adapters.list[].functions) and the inputs they take (adapters.inputs.slots)")
            try:
                tensors = read_inputs(artifact_file(self.dir, self.manifest, entry["file"]), inputs["slots"])
            except ValueError as exc:
                raise ManifestError(f"adapter {name}: {exc}") from None
            self.lora = {k: v.astype(np.dtype(inputs.get("dtype", "float32"))) for k, v in tensors.items()}
        self.functions = dict(functions)
        self._functions_changed()
        self.reset()

    def _functions_changed(self) -> None:
        pass

    def _inputs(self, entry: str, tokens: list[int], input_pos: int) -> dict[str, np.ndarray]:
        io = self.io[entry]
        return {io.tokens: np.array([tokens], dtype=np.int32), io.positions: np.array([input_pos], dtype=np.int32), **self.lora}

    def close(self) -> None:
        pass


class MilReferenceRunner(_CoreMLBase):
    """The saved ML program run by llmship's numpy MIL executor (Linux, CI)."""

    def __init__(self, artifact_dir: Path, manifest: dict, threads: int = 2):
        ct = require("coremltools", "coremltools", "pip install coremltools==9.0")
        from llmship.validation.runners.mil_executor import MilExecutor

        super().__init__(artifact_dir, manifest)
        # One BLAS thread whatever `threads` says: at decode sizes OpenBLAS's thread hand-off costs more than
        # the work (a 1536x576 matrix-vector product: 0.05 ms on 1 thread, 15-20 ms on 2 on a busy 2-core
        # machine). The executor's latency is not a device's anyway.
        self.executor_impl = MilExecutor(self.package, threads=1)
        precision = manifest.get("recipe", {}).get("compute", "fp16")
        self.executor = (f"llmship MIL reference executor (numpy {np.__version__}, 1 BLAS thread; program loaded by "
                         f"coremltools {ct.__version__}), {precision} ML program; Apple's Core ML runtime was not run")
        self.executor_note = REFERENCE_NOTE
        self.state = self.executor_impl.make_state()

    def _call(self, entry: str, tokens: list[int], input_pos: int) -> np.ndarray:
        out = self.executor_impl.predict(self.functions[entry], self._inputs(entry, tokens, input_pos), self.state)
        return out[self.io[entry].logits][0].astype(np.float32)

    def reset(self) -> None:
        self.state = self.executor_impl.make_state()


class CoreMLRunner(_CoreMLBase):
    """Apple's Core ML runtime through coremltools (macOS): one MLModel per function, one shared MLState."""

    def __init__(self, artifact_dir: Path, manifest: dict, threads: int = 2):
        ct = require("coremltools", "coremltools", "pip install coremltools==9.0")
        super().__init__(artifact_dir, manifest)
        # Core ML picks its own threads and compute units; ALL is what an app gets by default.
        self.ct = ct
        self._functions_changed()
        self.executor = f"Core ML (coremltools {ct.__version__} MLModel, compute units ALL) on {sys.platform}"
        self.executor_note = "Apple's Core ML runtime ran the artifact; threads are chosen by Core ML, not by --threads."
        self.state = self.models["decode"].make_state()

    def _functions_changed(self) -> None:
        self.models = {name: self.ct.models.MLModel(str(self.package), function_name=fn, compute_units=self.ct.ComputeUnit.ALL)
                       for name, fn in self.functions.items()}

    def _call(self, entry: str, tokens: list[int], input_pos: int) -> np.ndarray:
        out = self.models[entry].predict(self._inputs(entry, tokens, input_pos), state=self.state)
        return np.asarray(out[self.io[entry].logits])[0].astype(np.float32)

    def reset(self) -> None:
        self.state = self.models["decode"].make_state()
