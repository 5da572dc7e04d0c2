"""ONNX Runtime (CPU execution provider) behind the runner protocol.

The KV cache lives in numpy arrays wrapped as OrtValues (no copy). Through I/O binding each past input and
its present output are bound to the same OrtValue, as onnxruntime-genai's past_present_share_buffer mode
does: the graph's ScatterElements then writes the new rows in place, and nothing is copied between steps.
Only the logits are allocated per call.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from llmship.validation.runners import check_positions, require


class OnnxRunner:
    def __init__(self, artifact_dir: Path, manifest: dict, threads: int = 2):
        ort = require("onnxruntime", "ONNX Runtime", "pip install onnxruntime==1.31.1")
        entry = manifest["entry_points"]["prefill"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(Path(artifact_dir) / entry["file"]), options, providers=["CPUExecutionProvider"])
        self.executor = f"onnxruntime {ort.__version__} CPUExecutionProvider"
        self.max_context = int(manifest["max_context"])
        cache = manifest["kv_cache"]
        shape = tuple(cache["shape"])
        past_names, present_names = cache["inputs"], cache["outputs"]
        self.caches = []  # (past name, present name, numpy buffer, OrtValue over that buffer)
        for layer in range(cache["num_layers"]):
            for past, present in zip(past_names, present_names):
                buffer = np.zeros(shape, dtype=np.float32)
                self.caches.append((past % layer, present % layer, buffer, ort.OrtValue.ortvalue_from_numpy(buffer)))
        self.binding = self.session.io_binding()
        self.binding.bind_output("logits", "cpu")  # first, so it stays output 0
        for past, present, _, value in self.caches:
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)

    def prefill(self, tokens: Sequence[int], input_pos: int) -> np.ndarray:
        t = len(tokens)
        check_positions(t, input_pos, self.max_context)
        self.binding.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        self.binding.bind_cpu_input("position_ids", np.arange(input_pos, input_pos + t, dtype=np.int64)[None])
        self.binding.bind_output("logits", "cpu")  # unallocated again: T varies between calls
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()[0]

    def decode(self, token: int, input_pos: int) -> np.ndarray:
        return self.prefill([int(token)], input_pos)[0]

    def reset(self) -> None:
        for _, _, buffer, _ in self.caches:
            buffer.fill(0.0)

    def close(self) -> None:
        self.binding = self.session = None
        self.caches = []
