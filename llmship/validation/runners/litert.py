"""The LiteRT runner: ai-edge-litert's Interpreter calling the artifact's `prefill_<T>` / `decode` signatures.

The interpreter is created with the default op resolver, which applies LiteRT's default CPU delegate,
XNNPACK, to every subgraph when tensors are first allocated; `executor` says how many partitions it took
in the first signature (counted from the interpreter's node list, where each delegated partition is one
DELEGATE node). Ops XNNPACK does not take (the cache's dynamic_update_slice, the rope-table gather, the
mask comparisons) run on LiteRT's builtin kernels.
The KV cache lives in this object as numpy arrays: each call passes them in and keeps what comes out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from llmship.adapters.inputs import read_inputs
from llmship.errors import ConfigError, ManifestError, require
from llmship.manifest import artifact_file
from llmship.validation.runners import EntryIO, adapter_entry, check_positions

PAD_TOKEN = 0  # any valid id: padded rows are never attended before being overwritten


def plan_chunks(n: int, input_pos: int, lengths: Sequence[int], max_context: int) -> list[tuple[int, int]]:
    """Split n tokens starting at input_pos into (signature length, real tokens) calls: the smallest
    prefill length that holds the rest, padded, when it fits in the cache; otherwise the longest length
    that needs no padding; otherwise one decode step (length 1). No call writes past max_context."""
    calls, pos = [], input_pos
    while n > 0:
        fits = [t for t in lengths if pos + t <= max_context]
        padded = [t for t in fits if t >= n]
        exact = [t for t in fits if t <= n]
        t = min(padded) if padded else max(exact) if exact else 1
        calls.append((t, min(t, n)))
        n, pos = n - min(t, n), pos + min(t, n)
    return calls


class LiteRTRunner:
    def __init__(self, artifact_dir: Path, manifest: dict, threads: int = 2):
        interpreter_mod = require("ai_edge_litert.interpreter", "LiteRT (ai-edge-litert)", "pip install ai-edge-litert==2.3.0")
        from importlib.metadata import version

        entries = manifest["entry_points"]
        self.path = artifact_file(artifact_dir, manifest, entries["decode"]["file"])
        self.max_context = int(manifest["max_context"])
        self.lengths = sorted(int(t) for t in manifest["prefill_lengths"])
        self.interpreter = interpreter_mod.Interpreter(model_path=str(self.path), num_threads=threads)
        # The default delegate (XNNPACK) is applied lazily, by the first allocation; this must come before
        # signature runners exist (they hold references the interpreter's safety check refuses).
        self.interpreter.allocate_tensors()
        delegated = sum(op["op_name"] == "DELEGATE" for op in self.interpreter._get_ops_details())
        available = set(self.interpreter.get_signature_list())
        wanted = {f"prefill_{t}" for t in self.lengths} | {"decode"}
        if not wanted <= available:
            raise ConfigError(f"{self.path} lacks signatures {sorted(wanted - available)} named in its manifest")
        self.manifest, self.available, self.dir = manifest, available, artifact_dir
        self.io = {name: EntryIO.of(manifest, name) for name in wanted}
        self.cache_specs = {t["name"]: t for t in self.io["decode"].cache_specs}
        self.set_adapter(None)
        self.executor = (f"ai-edge-litert {version('ai-edge-litert')} CPU, {threads} threads, "
                         + (f"XNNPACK delegate ({delegated} partitions in the first signature)" if delegated else "builtin kernels (no delegate)"))

    def set_adapter(self, name: str | None) -> None:
        """Call the `_lora` signatures (adapters.list[].signatures: base name -> its own) with separate adapter `name`'s
        file as more inputs (adapters/inputs.py), or the plain ones; the cache starts empty."""
        names, self.lora = {n: n for n in self.io}, {}
        if name is not None:
            entry = adapter_entry(self.manifest, name)
            names = entry.get("signatures")
            if not isinstance(names, dict) or set(names) != set(self.io) or not set(names.values()) <= self.available:
                raise ManifestError(f"manifest.json: adapter {name} must map every signature to one in {self.path.name} "
                                    "(adapters.list[].signatures)")
            slots = (self.manifest["adapters"].get("inputs") or {}).get("slots")
            if not isinstance(slots, list):
                raise ManifestError("manifest.json: adapters.inputs.slots is missing")
            try:
                self.lora = read_inputs(artifact_file(self.dir, self.manifest, entry["file"]), slots)
            except ValueError as exc:
                raise ManifestError(f"adapter {name}: {exc}") from None
        self.signatures = {base: self.interpreter.get_signature_runner(own) for base, own in names.items()}
        self.reset()

    def reset(self) -> None:
        self.cache = {name: np.zeros(s["shape"], dtype=np.dtype(s["dtype"])) for name, s in self.cache_specs.items()}

    def _call(self, length: int, tokens: list[int], input_pos: int) -> np.ndarray:
        name = "decode" if length == 1 else f"prefill_{length}"
        padded = np.full((1, length), PAD_TOKEN, dtype=np.int32)
        padded[0, :len(tokens)] = tokens
        positions = np.arange(input_pos, input_pos + length, dtype=np.int32)
        io = self.io[name]
        out = self.signatures[name](**{io.tokens: padded, io.positions: positions}, **self.cache, **self.lora)
        logits = out.pop(io.logits)
        self.cache = out
        return logits[0, :len(tokens)].astype(np.float32, copy=False)

    def prefill(self, tokens: Sequence[int], input_pos: int) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        check_positions(len(tokens), input_pos, self.max_context)
        out, done = [], 0
        for length, n in plan_chunks(len(tokens), input_pos, self.lengths, self.max_context):
            out.append(self._call(length, tokens[done:done + n], input_pos + done))
            done += n
        return np.concatenate(out, axis=0)

    def decode(self, token: int, input_pos: int) -> np.ndarray:
        check_positions(1, input_pos, self.max_context)
        return self._call(1, [int(token)], input_pos)[0]

    def close(self) -> None:
        self.signatures.clear()
        self.interpreter = None
