"""The fixed pipeline for one target: load -> canonical model -> (transform -> compress) -> export -> validate -> gate.

`export_artifact` is the export stage: it builds the canonical model the target asks for (max_context, cache
dtype) once, hands it to the format's exporter, and writes the artifact directory atomically with its
tokenizer and manifest. The validate stage lives in llmship/validation/stage.py; gates in validation/gates.py.
"""
from __future__ import annotations

import traceback
from pathlib import Path

from llmship.errors import ExportError, LlmshipError
from llmship.progress import stage


def toolchain_versions(packages: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def ring_chunk(target) -> int | None:
    """The most tokens one call writes, which sizes the ring buffers of sliding-window layers (None: no ring)."""
    return max(target.prefill_lengths) if target.kv_cache_ring else None


def manifest_body(loaded, target, result) -> dict:
    from llmship.formats import toolchain_packages

    from llmship.models.decoder import cache_lengths, max_tokens_per_call

    spec = loaded.spec
    lengths = cache_lengths(spec, target.max_context, ring_chunk(target))
    return {
        "target": target.name,
        "format": target.format,
        "runtime": target.runtime,
        "source": loaded.source,
        "threads": target.threads,
        "target_profile": target.model_dump(mode="json"),
        "recipe": target.recipe.model_dump(),
        "max_context": target.max_context,
        "prefill_lengths": list(target.prefill_lengths),
        "model": {
            "architecture": spec.model_type,
            "params": spec.num_params,
            "vocab_size": spec.vocab_size,
            "num_layers": spec.num_layers,
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_heads": spec.num_heads,
            "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim,
            "rotary_dim": spec.rope_dim,
            "shared_layers": list(spec.shared_layers) if spec.shared_layers else None,  # the layer whose block each runs
            "tie_word_embeddings": spec.tie_word_embeddings,
            "bos_token_id": spec.bos_token_id,
            "eos_token_ids": list(spec.eos_token_ids),
            "config": loaded.config,
        },
        "kv_cache": {
            "layout": ["batch=1", "num_kv_heads", "max_context", "head_dim"],
            "shape": [1, spec.num_kv_heads, target.max_context, spec.head_dim],
            "num_layers": spec.num_layers,
            # the rows each layer's cache holds: max_context, or for a sliding-window layer a ring buffer of
            # window + max(prefill_lengths) - 1 rows where that is shorter (row = position mod rows); a sliding-window
            # layer attends to its last `window` positions (null: the whole cache)
            "length_per_layer": lengths,
            "max_tokens_per_call": max_tokens_per_call(lengths, target.max_context, ring_chunk(target)),
            "bytes": 2 * sum(lengths) * spec.num_kv_heads * spec.head_dim * (2 if result.kv_cache.get("dtype") == "float16" else 4),
            "window_per_layer": [spec.window_of(i) for i in range(spec.num_layers)],
            **result.kv_cache,
        },
        "logits": "prefill returns logits for every input position [1, T, vocab]; decode for its one token",
        "entry_points": result.entry_points,
        "tokenizer": "tokenizer.json",
        "toolchain": toolchain_versions(toolchain_packages(target.format)),
        **({"adapters": adapters_manifest(target.name, loaded.adapters, result.adapters)} if loaded.adapters else {}),
        **result.extra,
    }


def adapters_manifest(target: str, recorded: dict, shipped: dict) -> dict:
    """The manifest's adapters: what was merged, or each separate adapter with the file the exporter wrote for it
    and how an app activates one."""
    if recorded["mode"] != "separate":
        return recorded
    files = shipped.get("files") or {}
    missing = [e["name"] for e in recorded["list"] if e["name"] not in files]
    if missing:
        raise ExportError(target, "separate adapters", f"the exporter wrote no file for adapter {missing[0]}")
    more = shipped.get("entries") or {}  # how each is activated beyond its file (e.g. Core ML's function names)
    return {**recorded, **{k: v for k, v in shipped.items() if k not in ("files", "entries")},  # dtype, select, ...
            "list": [{**e, "file": files[e["name"]], **more.get(e["name"], {})} for e in recorded["list"]]}


def compression_record(loaded, target, module, config, eval_text: str | None = None):
    """The compression stage for one target: (the record of every matrix the runtime quantizes, or None; what a
    budget allocated, or None; the target as compressed: its recipe with the allocation's and the source's per-module
    rules, which is what the exporter must be given)."""
    from llmship.compress import build_record

    allocation = None
    if target.recipe.budget is not None:
        from llmship.compress.mixed import allocation as allocate

        with stage(f"{target.name}: allocating bits under the budget"):
            target, allocation = allocate(loaded, target, module, config.calibration, config.evaluation)
    if target.recipe.algorithm == "source":
        target = with_source_grids(loaded, target, module)
    grids, activations = module.weight_plan(target, loaded.spec)
    grids = {name: g for name, g in grids.items() if g is not None}
    if not grids:
        return None, allocation, target
    with stage(f"{target.name}: compressing ({target.recipe.algorithm})"):
        record = build_record(loaded, grids, activations, target.recipe.algorithm, config.calibration, config.evaluation, eval_text)
    return record, allocation, target


def with_source_grids(loaded, target, module):
    """For `algorithm: source`: the target with one more rule per kind of block the source stores (its bits and
    block size, Q4_1 asymmetric), each kept only where this runtime can hold it (its `check` accepts it)."""
    from llmship.config import Recipe, Rule
    from llmship.errors import ConfigError

    kinds: dict[str, list[str]] = {}
    for name, blocks in loaded.source_blocks.items():
        kinds.setdefault(blocks.kind, []).append(name)
    rules = list(target.recipe.rules)
    for kind, names in sorted(kinds.items()):
        rule = Rule(match="^(" + "|".join(n.replace(".", r"\.") for n in sorted(names)) + ")$",
                    weights="int8" if kind == "Q8_0" else "int4", group_size=32, symmetric=kind != "Q4_1")
        candidate = target.model_copy(update={"recipe": target.recipe.model_copy(update={"rules": (*rules, rule)})})
        try:
            module.check(candidate, loaded.spec)
        except ConfigError:
            continue  # the runtime cannot hold this kind of block: the recipe's grid, and the record notes why
        rules.append(rule)
    return target.model_copy(update={"recipe": Recipe.model_validate({**target.recipe.model_dump(), "rules": [
        r.model_dump(exclude_unset=True) for r in rules]})})


def compression_manifest(record, config, allocation: dict | None = None) -> dict | None:
    """What validation needs to rebuild the same record, what a budget allocated, and what an app may want to know."""
    from dataclasses import asdict

    from llmship.compress.algorithms import NEEDS_CALIBRATION

    if record is None:
        return None
    return {"algorithm": record.algorithm, "digest": record.digest(), "activations": record.activations,
            "calibration": config.calibration.model_dump(mode="json") if record.algorithm in NEEDS_CALIBRATION else None,
            "evaluation_seed": config.evaluation.seed, "notes": record.notes,
            "stored_bytes": sum(t.stored_bytes() for t in record.tensors.values()), "allocation": allocation,
            "grids": {n: asdict(t.grid) for n, t in sorted(record.tensors.items())}}


def export_artifact(loaded, target, out_dir: str | Path, debug: bool = False, inputs_sha256: str | None = None,
                    config=None) -> Path:
    """Build one target's artifact directory atomically (compress, then export); returns its path."""
    import contextlib

    from llmship.exporters import ExportJob, quiet
    from llmship.formats import exporter
    from llmship.manifest import write_manifest
    from llmship.models import build_decoder
    from llmship.outputs import OutputError, atomic_directory, check_output_dir
    from llmship.targets import check_target

    from llmship.config import BuildConfig

    config = config or BuildConfig()
    out_dir = check_output_dir(out_dir)
    hush = contextlib.nullcontext if debug else quiet
    with hush():
        module = exporter(target.format)
    from llmship.compress.structure import restructured

    loaded = restructured(loaded, config.compression, config.calibration, config.evaluation)  # the student, if pruned
    check_target(target, loaded.spec)
    with hush():
        record, allocation, compressed = compression_record(loaded, target, module, config)
    decoder = build_decoder(loaded, target.max_context, target.kv_cache_dtype,
                            weights=record.dequantized_weights(loaded.weights) if record else None,
                            chunk=ring_chunk(target))
    with atomic_directory(out_dir) as tmp:
        try:
            with stage(f"{target.name}: converting"), hush():
                result = module.export(ExportJob(decoder, loaded, compressed, tmp, record))
        except LlmshipError:
            raise
        except ImportError as exc:  # a converter's own dependency missing part-way: the toolchain is incomplete
            from llmship.errors import RuntimeMissing
            from llmship.formats import get_format

            raise RuntimeMissing(f"{target.name}: the {target.format} toolchain is incomplete ({exc}); install it with: "
                                 f"{get_format(target.format).install}") from None
        except Exception as exc:
            if debug:
                traceback.print_exc()
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ExportError(target.name, f"{target.format} export", f"{type(exc).__name__}: {detail}") from exc
        try:
            loaded.tokenizer.save(str(tmp / "tokenizer.json"))
        except Exception as exc:  # the tokenizers library reports I/O failures as a plain Exception
            raise OutputError(f"{target.name}: cannot write tokenizer.json into {out_dir.parent}: {exc}") from None
        try:
            body = manifest_body(loaded, target, result)
            body["compression"] = compression_manifest(record, config, allocation)
            if loaded.structure:
                body["structure"] = loaded.structure
            if inputs_sha256:
                body["inputs_sha256"] = inputs_sha256  # what a rebuild compares to decide it has nothing to do
            write_manifest(tmp, body)
        except OSError as exc:
            raise OutputError(f"{target.name}: cannot write manifest.json into {out_dir.parent}: {exc.strerror or exc}") from None
    return out_dir
