"""Runners: one per runtime, each opening an artifact directory from its manifest (the format registry,
llmship/formats.py, names each format's runner).

Protocol (what every runner implements; the evaluation only talks to this):
    executor: str                                     e.g. "onnxruntime 1.31.1 CPUExecutionProvider"
    prefill(tokens: Sequence[int], input_pos) -> np.ndarray[T, vocab] float32 (logits at every position)
    decode(token: int, input_pos) -> np.ndarray[vocab] float32
    reset() -> None                                   forget the KV cache
    close() -> None
    set_adapter(name | None) -> None                  only runners of formats with adapter mode `separate`: run
                                                      with that shipped adapter active, as its manifest entry
                                                      (`adapter_entry`) says (None: the bare base); resets the cache
`prefill` takes 1 <= T <= max(prefill_lengths) tokens; a runner whose format has fixed lengths pads.
Runners open only files the manifest lists (`llmship.manifest.artifact_file`) and call each entry point by the
input and output names its manifest entry gives (`EntryIO`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from llmship.errors import ConfigError, LlmshipError, ManifestError, StepFailed


class Runner(Protocol):
    executor: str

    def prefill(self, tokens: Sequence[int], input_pos: int) -> np.ndarray: ...

    def decode(self, token: int, input_pos: int) -> np.ndarray: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EntryIO:
    """An entry point's tensor names by role, read from its manifest entry."""

    tokens: str
    positions: str
    logits: str
    cache_inputs: tuple[str, ...]
    cache_outputs: tuple[str, ...]
    cache_specs: tuple[dict, ...]  # the cache inputs' tensor specs (name, dtype, shape)

    @classmethod
    def of(cls, manifest: dict, entry: str) -> "EntryIO":
        ep = manifest["entry_points"].get(entry)
        if not isinstance(ep, dict):
            raise ManifestError(f"manifest: field entry_points.{entry} is missing")

        def roles(kind: str) -> list[str]:
            # Manifests written before tensors carried roles list tokens, positions (inputs) and logits (outputs)
            # first, the caches after them.
            tensors = ep.get(kind, [])
            first = ["tokens", "positions"] if kind == "inputs" else ["logits"]
            return [t.get("role") or (first[i] if i < len(first) else "cache") for i, t in enumerate(tensors)]

        def by_role(kind: str, role: str) -> list[dict]:
            tensors = ep.get(kind, [])
            if not isinstance(tensors, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tensors):
                raise ManifestError(f"manifest: field entry_points.{entry}.{kind} must be a list of named tensors")
            return [t for t, r in zip(tensors, roles(kind)) if r == role]

        def one(kind: str, role: str) -> str:
            found = by_role(kind, role)
            if len(found) != 1:
                raise ManifestError(f"manifest: entry_points.{entry}.{kind} needs exactly one tensor with role '{role}'")
            return found[0]["name"]

        caches_in = by_role("inputs", "cache")
        return cls(one("inputs", "tokens"), one("inputs", "positions"), one("outputs", "logits"),
                   tuple(t["name"] for t in caches_in), tuple(t["name"] for t in by_role("outputs", "cache")), tuple(caches_in))


def adapter_entry(manifest: dict, name: str) -> dict:
    """The manifest's entry of separate adapter `name`: its file, and whatever else activates it (e.g. functions)."""
    info = manifest.get("adapters") if isinstance(manifest.get("adapters"), dict) else {}
    for entry in info.get("list") or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            if not isinstance(entry.get("file"), str):
                raise ManifestError(f"manifest.json: adapter {name} names no file (adapters.list[].file)")
            return entry
    raise ManifestError(f"manifest.json: no separate adapter named {name!r} (adapters.list)")


def max_tokens_per_call(manifest: dict) -> int | None:
    """How many tokens one call may write (a ring-buffer cache's rows assume no more); None: any that fit."""
    return (manifest.get("kv_cache") or {}).get("max_tokens_per_call")


def check_positions(t: int, input_pos: int, max_context: int, max_tokens: int | None = None) -> None:
    """Every runner's range check: T >= 1 tokens at positions input_pos.. inside the KV cache, and no more tokens in
    one call than the artifact's ring buffers allow."""
    if t < 1:
        raise ConfigError("prefill needs at least one token")
    if max_tokens is not None and t > max_tokens:
        raise ConfigError(f"{t} tokens in one call: this artifact's ring-buffer caches take at most {max_tokens}")
    if input_pos < 0 or input_pos + t > max_context:
        raise ConfigError(f"positions {input_pos}..{input_pos + t - 1} do not fit the KV cache of max_context {max_context}")


def open_runner(artifact_dir: str | Path, manifest: dict, threads: int | None = None) -> Runner:
    from llmship.formats import format_of_runtime, runner_factory

    entry = format_of_runtime(manifest["runtime"])
    if entry.name != manifest["format"]:
        raise ManifestError(f"{artifact_dir}: manifest says format {manifest['format']} but runtime {manifest['runtime']} "
                            f"runs format {entry.name}")
    factory = runner_factory(entry.name)
    try:
        return factory(Path(artifact_dir), manifest, threads or manifest.get("threads", 2))
    except LlmshipError:
        raise
    except Exception as exc:  # the runtime refuses the file: say so in one line (exit 4), it is not the user's input
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        raise StepFailed(f"{artifact_dir}: {entry.runtime} cannot open the artifact: {type(exc).__name__}: {detail}") from None
