"""ExecuTorch runner: the artifact's `model.pte` on ExecuTorch's C++ runtime (Python bindings), XNNPACK backend."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import numpy as np

from llmship.adapters.inputs import read_inputs
from llmship.errors import ConfigError, ManifestError, require
from llmship.manifest import artifact_file
from llmship.validation.runners import EntryIO, adapter_entry, check_positions, max_tokens_per_call

INSTALL = "pip install executorch==1.5.1"


class ExecuTorchRunner:
    def __init__(self, artifact_dir: Path, manifest: dict, threads: int):
        runtime = require("executorch.runtime", "ExecuTorch", INSTALL)
        portable_lib = require("executorch.extension.pybindings.portable_lib", "ExecuTorch", INSTALL)
        # Importing these registers their kernels with the runtime: the program calls llama::update_cache,
        # llama::custom_sdpa and (quantized embeddings) quantized_decomposed::embedding_*.
        require("executorch.extension.llm.custom_ops.custom_ops", "ExecuTorch LLM custom ops", INSTALL)
        require("executorch.kernels.quantized", "ExecuTorch quantized kernels", INSTALL)
        import torch

        self._torch = torch
        # XNNPACK runs on the runtime's one process-wide threadpool; this is how its size is set from Python.
        portable_lib._unsafe_reset_threadpool(int(threads))
        self.threads = portable_lib._threadpool_get_thread_count()
        entry = manifest["entry_points"]
        self.max_prefill = max(manifest["prefill_lengths"])
        self.max_context = manifest["max_context"]
        self.max_tokens = max_tokens_per_call(manifest)
        # Inputs are positional in ExecuTorch: the manifest's order (tokens, positions) is the method's order.
        for name in ("prefill", "decode"):
            names = [t.get("role", default) for t, default in zip(entry[name]["inputs"], ("tokens", "positions"))]
            if names != ["tokens", "positions"] or len(entry[name]["inputs"]) != 2:
                raise ConfigError(f"{artifact_dir}: entry point {name} takes inputs {names}; this runner feeds (tokens, positions)")
            EntryIO.of(manifest, name)
        self._program = runtime.Runtime.get().load_program(artifact_file(artifact_dir, manifest, entry["prefill"]["file"]))
        self.manifest, self.dir, self.base_methods = manifest, artifact_dir, {name: entry[name]["method"] for name in ("prefill", "decode")}
        self.set_adapter(None)
        self.executor = f"executorch {version('executorch')} XnnpackBackend ({self.threads} threads)"

    def set_adapter(self, name: str | None) -> None:
        """Run the `_lora` methods (adapters.list[].methods) with separate adapter `name`'s file as more inputs
        (adapters/inputs.py), or the base's. Every method comes from one Program and shares its planned memory, the KV
        cache with it: a new sequence starts at input_pos 0."""
        methods, self.lora = self.base_methods, []
        if name is not None:
            entry = adapter_entry(self.manifest, name)
            methods = entry.get("methods")
            slots = (self.manifest["adapters"].get("inputs") or {}).get("slots")
            if not isinstance(methods, dict) or set(methods) != {"prefill", "decode"} or not isinstance(slots, list):
                raise ManifestError(f"manifest.json: adapter {name} must name its prefill and decode methods "
                                    "(adapters.list[].methods) and the inputs they take (adapters.inputs.slots)")
            try:
                tensors = read_inputs(artifact_file(self.dir, self.manifest, entry["file"]), slots)
            except ValueError as exc:
                raise ManifestError(f"adapter {name}: {exc}") from None
            self.lora = [self._torch.from_numpy(tensors[s[k]]) for s in slots for k in ("a", "b")]
        self._prefill = self._program.load_method(methods["prefill"])
        self._decode = self._program.load_method(methods["decode"])

    def _run(self, method, tokens: Sequence[int], input_pos: int) -> np.ndarray:
        check_positions(len(tokens), input_pos, self.max_context, self.max_tokens)
        torch = self._torch
        ids = torch.tensor([list(tokens)], dtype=torch.int64)
        (logits,) = method.execute([ids, torch.tensor([input_pos], dtype=torch.int64), *self.lora])
        return logits[0].numpy().astype(np.float32, copy=True)

    def prefill(self, tokens: Sequence[int], input_pos: int) -> np.ndarray:
        if not 1 <= len(tokens) <= self.max_prefill:
            raise ConfigError(f"prefill takes 1..{self.max_prefill} tokens, got {len(tokens)}")
        return self._run(self._prefill, tokens, input_pos)

    def decode(self, token: int, input_pos: int) -> np.ndarray:
        return self._run(self._decode, [int(token)], input_pos)[0]

    def reset(self) -> None:
        # Nothing to clear: attention reads only cache positions < input_pos + T, all written by this
        # sequence, so a new sequence starting at input_pos 0 never sees the old one's entries.
        pass

    def close(self) -> None:
        self._prefill = self._decode = self._program = None
