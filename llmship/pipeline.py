"""The fixed pipeline: load -> canonical model -> export (trace + quantize + emit) -> validate -> gate."""
from __future__ import annotations

import traceback
from pathlib import Path

from llmship.errors import ExportError, LlmshipError


def manifest_body(loaded, target, result) -> dict:
    from llmship.manifest import toolchain_versions

    spec = loaded.spec
    return {
        "target": target.name,
        "format": target.format,
        "runtime": target.runtime,
        "source": loaded.source,
        "threads": target.threads,
        "recipe": target.recipe.model_dump(),
        "max_context": target.max_context,
        "prefill_lengths": list(target.prefill_lengths),
        "model": {
            "architecture": spec.model_type,
            "params": spec.num_params,
            "vocab_size": spec.vocab_size,
            "num_layers": spec.num_layers,
            "hidden_size": spec.hidden_size,
            "num_heads": spec.num_heads,
            "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim,
            "tie_word_embeddings": spec.tie_word_embeddings,
            "bos_token_id": spec.bos_token_id,
            "eos_token_ids": list(spec.eos_token_ids),
            "config": loaded.config,
        },
        "kv_cache": {
            "layout": ["batch=1", "num_kv_heads", "max_context", "head_dim"],
            "shape": [1, spec.num_kv_heads, target.max_context, spec.head_dim],
            "num_layers": spec.num_layers,
            **result.kv_cache,
        },
        "logits": "prefill returns logits for every input position [1, T, vocab]; decode for its one token",
        "entry_points": result.entry_points,
        "tokenizer": "tokenizer.json",
        "toolchain": toolchain_versions(*result.toolchain),
        **result.extra,
    }


def export_artifact(loaded, target, out_dir: str | Path, debug: bool = False) -> Path:
    """Build one target's artifact directory atomically; returns its path."""
    from llmship.exporters import ExportJob, get_exporter
    from llmship.manifest import atomic_directory, write_manifest
    from llmship.models import build_decoder

    out_dir = Path(out_dir)
    exporter = get_exporter(target.format)
    decoder = build_decoder(loaded, target.max_context)
    with atomic_directory(out_dir) as tmp:
        try:
            result = exporter.export(ExportJob(decoder, loaded, target, tmp))
        except LlmshipError:
            raise
        except Exception as exc:
            if debug:
                traceback.print_exc()
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ExportError(target.name, f"{target.format} export", f"{type(exc).__name__}: {detail}") from exc
        loaded.tokenizer.save(str(tmp / "tokenizer.json"))
        write_manifest(tmp, manifest_body(loaded, target, result))
    return out_dir
