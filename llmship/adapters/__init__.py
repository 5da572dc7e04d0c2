"""LoRA / PEFT adapters over a source model.

    load (peft_dir.py: adapter_config.json + adapter_model.safetensors) -> check against the base -> merge or ship

`adapters: {mode: merge, list: {name: dir}}` folds the one adapter into the FP32 weights before compression and
export (W + scale * B @ A, scale = lora_alpha / r, or lora_alpha / sqrt(r) with rslora): everything after the
loader sees a plain model, and the FP32 reference is the merged model.
`mode: separate` (runtimes whose registry entry lists it, llmship/formats.py `adapter_modes`) leaves the weights the
base's, so the base is compressed and exported once, and hands the adapters on as `loaded.lora`: the exporter writes
one adapter file per name in its runtime's own mechanism (branch.py: what is stored), and validation runs each
against the base with that adapter merged in FP32.
The manifest records each adapter's path and digest, so `llmship validate` rebuilds the same references and
refuses an adapter that changed since.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from llmship.adapters.peft_dir import Adapter, adapter_digest, read_adapter
from llmship.errors import ManifestError, ModelError

__all__ = ["Adapter", "read_adapter", "merged", "load_source", "digests", "from_manifest"]
MODES = ("merge", "separate")


def fit_base(loaded, adapter: Adapter) -> Adapter:
    """The adapter on the base's canonical modules: a LoRA on a fused projection (Phi-3's qkv_proj, gate_up_proj)
    becomes one per part, sharing A and taking B's rows of that part (the same W + s B A, row by row). Every adapted
    module must be a linear of the base with the adapter's shapes (exit 3 naming the module)."""
    from llmship.models.weights import fused_parts

    lora = {}
    for module, (a, b, scale) in adapter.lora.items():
        parts = fused_parts(loaded.spec, module)
        if parts is None:
            lora[module] = (a, b, scale)
        elif b.shape[0] != sum(parts.values()):
            raise ModelError(f"adapter {adapter.name}: {module} has {b.shape[0]} output rows, not the "
                             f"{sum(parts.values())} of {loaded.source}'s fused projection: the adapter was trained for another base")
        else:
            lora.update({part: (a, rows, scale) for part, rows in zip(parts, b.split(list(parts.values())))})
    adapter = dataclasses.replace(adapter, lora=lora)
    for module, (a, b, _) in adapter.lora.items():
        w = loaded.weights.get(f"{module}.weight")
        if w is None or w.dim() != 2 or module.endswith(("embed_tokens", "lm_head")):
            raise ModelError(f"adapter {adapter.name}: {module} is not a linear projection of {loaded.source} "
                             "(LoRA targets the attention and MLP projections)")
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ModelError(f"adapter {adapter.name}: {module} is {tuple(w.shape)} in {loaded.source} but the adapter's "
                             f"B @ A is {(b.shape[0], a.shape[1])}: the adapter was trained for another base")
    return adapter


def merged(loaded, adapter: Adapter):
    """`loaded` with the adapter folded into its weights (new tensors; the base's are untouched)."""
    adapter = fit_base(loaded, adapter)
    weights = dict(loaded.weights)
    for module, (a, b, scale) in adapter.lora.items():
        w = weights[f"{module}.weight"]
        weights[f"{module}.weight"] = w + (b @ a) * scale  # fp32, in PEFT's order: the same merged weights as PEFT's
    # a merged matrix is no longer on the source's grid: its blocks go (`algorithm: source` keeps the others)
    blocks = {k: v for k, v in loaded.source_blocks.items() if k not in adapter.lora}
    return dataclasses.replace(loaded, weights=weights, adapters={"mode": "merge", "list": [adapter.entry()]}, source_blocks=blocks)


def separate(loaded, adapters: list[Adapter], dtype: str = "auto"):
    """`loaded` (weights untouched) carrying `adapters` to ship beside it, stored as `dtype` (adapters.dtype)."""
    adapters = [fit_base(loaded, adapter) for adapter in adapters]
    return dataclasses.replace(loaded, adapters={"mode": "separate", "dtype": dtype, "list": [a.entry() for a in adapters]},
                               lora=tuple(adapters))


def load_source(model: str, settings=None):
    """The source model with its configured adapters: merged into the weights, or carried beside them (separate);
    without adapters, the source as it is."""
    from llmship.models import load_model

    loaded = load_model(model)
    if settings is None or not settings.list:
        return loaded
    if settings.mode == "separate":
        return separate(loaded, [read_adapter(path, name) for name, path in sorted(settings.list.items())], settings.dtype)
    (name, path), = settings.list.items()  # merge mode holds one (config.Adapters checks it)
    return merged(loaded, read_adapter(path, name))


def digests(settings) -> dict | None:
    """{mode, sha256 by name} of the configured adapters (for the incremental-build hash); a missing one is exit 3."""
    from llmship.adapters.peft_dir import read_config

    if settings is None or not settings.list:
        return None
    paths = {name: Path(path).expanduser().resolve() for name, path in settings.list.items()}
    for p in paths.values():
        read_config(p)
    return {"mode": settings.mode, "dtype": settings.dtype,
            "sha256": {name: adapter_digest(p) for name, p in sorted(paths.items())}}


def from_manifest(loaded, manifest: dict):
    """The reference model for an artifact: its base with the manifest's adapters merged in again (merge mode) or
    carried beside it (separate), after checking each adapter on disk is the one the artifact was built from."""
    info = manifest.get("adapters")
    if not info:
        return loaded
    entries = info.get("list") if isinstance(info, dict) else None
    mode = info.get("mode") if isinstance(info, dict) else None
    if not isinstance(entries, list) or mode not in MODES or not entries or (mode == "merge" and len(entries) != 1) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("name", "path", "sha256")) for e in entries):
        raise ManifestError("manifest.json: adapters must be {mode: merge|separate, list: [{name, path, sha256, ...}]} "
                            "(merge holds one)")
    dtype = info.get("dtype")
    if mode == "separate" and dtype not in ("fp16", "fp32"):
        raise ManifestError(f"manifest.json: adapters.dtype must be fp16 or fp32 (how the adapter files store A and B), got {dtype!r}")
    if loaded.adapters:  # built in this process from the same config: check it is the same adapters
        if loaded.adapters.get("mode") != mode or [a["sha256"] for a in loaded.adapters["list"]] != [a["sha256"] for a in entries]:
            raise ManifestError("the artifact was built with other adapters than the model given for its reference")
        return loaded if mode == "merge" else dataclasses.replace(loaded, adapters={**loaded.adapters, "dtype": dtype})
    adapters = [_recorded(entry) for entry in entries]
    return merged(loaded, adapters[0]) if mode == "merge" else separate(loaded, adapters, dtype)


def _recorded(entry: dict) -> Adapter:
    """The adapter a manifest entry names, read again from its path once its digest is checked."""
    path = Path(entry["path"])
    try:
        digest = adapter_digest(path)
    except OSError:
        raise ModelError(f"adapter {entry['name']}: {path} (recorded in the manifest) is missing; the FP32 reference "
                         "is the base with this adapter merged") from None
    if digest != entry["sha256"]:
        raise ManifestError(f"adapter {entry['name']}: {path} changed since the artifact was exported "
                            f"(sha256 {digest[:12]}, manifest {entry['sha256'][:12]})")
    return read_adapter(path, entry["name"])
