"""ONNX Runtime (CPU execution provider) behind the runner protocol.

The KV cache lives in numpy arrays wrapped as OrtValues (no copy). Through I/O binding each past input and
its present output are bound to the same OrtValue, as onnxruntime-genai's past_present_share_buffer mode
does: the graph's ScatterElements then writes the new rows in place, and nothing is copied between steps.
Only the logits are allocated per call.

A separate adapter (`set_adapter`) is read from its shipped file by ONNX Runtime's own adapter reader
(AdapterFormat.read_adapter) and its tensors are bound by name, in place of the graph's rank-0 defaults: that is
what RunOptions.add_active_adapter does for `run`, which ONNX Runtime ignores for run_with_iobinding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from llmship.errors import require
from llmship.manifest import artifact_file
from llmship.validation.runners import EntryIO, adapter_entry, check_positions, max_tokens_per_call


class OnnxRunner:
    def __init__(self, artifact_dir: Path, manifest: dict, threads: int = 2):
        ort = require("onnxruntime", "ONNX Runtime", "pip install onnxruntime==1.31.1")
        self.io = io = EntryIO.of(manifest, "prefill")
        self.artifact_dir, self.manifest = artifact_dir, manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # an adapter's overridable initializers are logged as a warning otherwise
        model = artifact_file(artifact_dir, manifest, manifest["entry_points"]["prefill"]["file"])
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.executor = f"onnxruntime {ort.__version__} CPUExecutionProvider"
        self.max_context = int(manifest["max_context"])
        self.max_tokens = max_tokens_per_call(manifest)
        self.caches = []  # (past name, present name, numpy buffer, OrtValue over that buffer)
        for past, present, spec in zip(io.cache_inputs, io.cache_outputs, io.cache_specs):
            buffer = np.zeros(spec["shape"], dtype=np.dtype(spec["dtype"]))
            self.caches.append((past, present, buffer, ort.OrtValue.ortvalue_from_numpy(buffer)))
        self.ort, self.adapter = ort, None
        self.binding = self.session.io_binding()
        self.binding.bind_output(io.logits, "cpu")  # first, so it stays output 0
        self._bind_caches()

    def _bind_caches(self) -> None:
        for past, present, _, value in self.caches:
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)

    def set_adapter(self, name: str | None) -> None:
        """Run with separate adapter `name` (its .onnx_adapter file in the artifact), or with none."""
        path = None if name is None else artifact_file(self.artifact_dir, self.manifest, adapter_entry(self.manifest, name)["file"])
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self.binding.bind_output(self.io.logits, "cpu")
        self._bind_caches()
        self.adapter = None if path is None else self.ort.AdapterFormat.read_adapter(str(path))  # owns the tensors
        if self.adapter is not None:
            for name, value in self.adapter.get_parameters().items():
                self.binding.bind_ortvalue_input(name, value)
        self.reset()

    def prefill(self, tokens: Sequence[int], input_pos: int) -> np.ndarray:
        t = len(tokens)
        check_positions(t, input_pos, self.max_context, self.max_tokens)
        self.binding.bind_cpu_input(self.io.tokens, np.asarray([tokens], dtype=np.int64))
        self.binding.bind_cpu_input(self.io.positions, np.arange(input_pos, input_pos + t, dtype=np.int64)[None])
        self.binding.bind_output(self.io.logits, "cpu")  # unallocated again: T varies between calls
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()[0]

    def decode(self, token: int, input_pos: int) -> np.ndarray:
        return self.prefill([int(token)], input_pos)[0]

    def reset(self) -> None:
        for _, _, buffer, _ in self.caches:
            buffer.fill(0.0)

    def close(self) -> None:
        self.binding = self.session = self.ort = self.adapter = None
        self.caches = []
