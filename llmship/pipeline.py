"""The fixed pipeline: load -> canonical model -> export (trace + quantize + emit) -> validate -> gate."""
from __future__ import annotations

import traceback
from pathlib import Path

from llmship.errors import ExportError, LlmshipError
from llmship.progress import stage


def manifest_body(loaded, target, result) -> dict:
    from llmship.manifest import toolchain_versions

    spec = loaded.spec
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


def export_artifact(loaded, target, out_dir: str | Path, debug: bool = False, inputs_sha256: str | None = None) -> Path:
    """Build one target's artifact directory atomically; returns its path."""
    import contextlib

    from llmship.exporters import ExportJob, get_exporter, quiet
    from llmship.manifest import atomic_directory, write_manifest
    from llmship.models import build_decoder

    out_dir = Path(out_dir)
    hush = contextlib.nullcontext if debug else quiet
    with hush():
        exporter = get_exporter(target.format)
    decoder = build_decoder(loaded, target.max_context)
    with atomic_directory(out_dir) as tmp:
        try:
            with stage(f"{target.name}: converting"), hush():
                result = exporter.export(ExportJob(decoder, loaded, target, tmp))
        except LlmshipError:
            raise
        except Exception as exc:
            if debug:
                traceback.print_exc()
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ExportError(target.name, f"{target.format} export", f"{type(exc).__name__}: {detail}") from exc
        loaded.tokenizer.save(str(tmp / "tokenizer.json"))
        body = manifest_body(loaded, target, result)
        if inputs_sha256:
            body["inputs_sha256"] = inputs_sha256  # what a rebuild compares to decide it has nothing to do
        write_manifest(tmp, body)
    return out_dir


REPORT = "report.json"
REPORT_VERSION = 1


def target_from_manifest(manifest: dict, config):
    """The profile the artifact was built with, with the config's overrides for it applied."""
    from pydantic import ValidationError

    from llmship.config import TargetProfile, deep_merge, validation_message
    from llmship.errors import ConfigError

    data = deep_merge(manifest["target_profile"], config.overrides.get(manifest["target"], {}))
    try:
        return TargetProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, f"overrides.{manifest['target']}")) from None


def load_baseline(path: str | Path | None, target: str) -> dict | None:
    import json

    from llmship.errors import ConfigError

    if path is None:
        return None
    path = Path(path)
    for candidate in (path, path / REPORT, path / target / REPORT):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise ConfigError(f"baseline {path} holds no {REPORT} for {target}")


def check_integrity(artifact_dir: Path, manifest: dict) -> dict:
    """Recompute every file's sha256: the report must describe the file that ships, as shipped."""
    from llmship.manifest import describe_files

    actual = describe_files(artifact_dir)
    expected = manifest["files"]
    mismatched = sorted(n for n in expected if n not in actual or actual[n]["sha256"] != expected[n]["sha256"])
    return {"files": actual, "mismatched": mismatched}


def validate_artifact(artifact_dir: Path, config, model: str | None = None, eval_text: str | None = None,
                      baseline: str | Path | None = None, loaded=None) -> dict:
    """Run the artifact on its runtime against the FP32 reference; write report.json; return it."""
    import json

    from llmship.errors import ConfigError
    from llmship.manifest import read_manifest
    from llmship.models import build_decoder, load_model
    from llmship.validation import evaluate as ev
    from llmship.validation.gates import check_gates, failure_message
    from llmship.validation.latency import run_in_child
    from llmship.validation.runners import open_runner
    from llmship.validation.runners.reference import ReferenceRunner

    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    target = target_from_manifest(manifest, config)
    if loaded is None or (model is not None and model != loaded.source):
        loaded = load_model(model or manifest["source"])
    if loaded.spec.vocab_size != manifest["model"]["vocab_size"] or loaded.spec.num_layers != manifest["model"]["num_layers"]:
        raise ConfigError(f"reference model {loaded.source} does not match the artifact {artifact_dir} (vocab or layers differ)")
    integrity = check_integrity(artifact_dir, manifest)
    say(f"{target.name}: reference {loaded.source}")
    reference = ReferenceRunner.from_decoder(build_decoder(loaded, target.max_context), threads=target.threads)
    plan = ev.make_plan(reference, loaded.tokenizer, loaded.spec, target, config.evaluation, eval_text)
    ref_logits = ev.teacher_forced(reference, plan, "reference")
    ref_greedy = [ev.greedy(reference, p, plan.greedy_tokens, plan.chunk) for p in plan.prompts]
    runner = open_runner(artifact_dir, manifest, target.threads)
    try:
        say(f"{target.name}: evaluating {len(plan.tokens)} tokens on {runner.executor}")
        logits = ev.teacher_forced(runner, plan, target.name)
        our_greedy = [ev.greedy(runner, p, plan.greedy_tokens, plan.chunk) for p in plan.prompts]
    finally:
        runner.close()
    parity, series = ev.parity_metrics(logits, ref_logits, plan.tokens)
    matched = sum(ev.greedy_match(o, r) for o, r in zip(our_greedy, ref_greedy))
    total = sum(len(r) for r in ref_greedy)
    parity.update(greedy_match=matched, greedy_total=total, greedy_fraction=matched / total if total else 0.0,
                  ppl_ratio=parity["ppl"] / parity["ppl_reference"])
    say(f"{target.name}: latency and memory (separate process, {target.threads} threads)")
    with stage(f"{target.name}: timing"):
        timing = run_in_child(artifact_dir, target.threads, config.evaluation.latency_runs)
    # A runtime that rewrites the file it opens would make the next check fail with no clue why: say so now.
    changed = sorted(set(check_integrity(artifact_dir, manifest)["mismatched"]) - set(integrity["mismatched"]))
    total_bytes = sum(f["bytes"] for f in integrity["files"].values())
    params = manifest["model"]["params"]
    report = {
        "report_version": REPORT_VERSION,
        "target": target.name,
        "format": target.format,
        "source": loaded.source,
        "executor": runner.executor,
        "executor_note": getattr(runner, "executor_note", None),
        "recipe": target.recipe.model_dump(),
        "artifact": {"bytes": total_bytes, "files": integrity["files"], "params": params, "bytes_per_param": total_bytes / params},
        "integrity": {"mismatched": integrity["mismatched"], "changed_by_validation": changed},
        "parity": parity,
        "greedy": {"reference": ref_greedy, "artifact": our_greedy},
        "series": series,
        "latency": {k: timing[k] for k in ("threads", "load_s", "ttft_ms", "ttft_ms_by_prefill_length", "prefill_tok_s",
                                            "decode_tok_s", "decode_ms_p50", "decode_ms_p90")},
        "memory": {"peak_rss_mb": timing["peak_rss_mb"]},
    }
    report["gates"] = check_gates(report, target.gates, load_baseline(baseline, target.name))
    report["passed"] = all(g["passed"] for g in report["gates"])
    tmp = artifact_dir / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(artifact_dir / REPORT)
    _summary(report)
    if not report["passed"]:
        say(failure_message(target.name, report["gates"]), err=True)
    return report


def say(msg: str, err: bool = False) -> None:
    import sys

    print(("llmship: gate failed: " if err else "") + msg, file=sys.stderr if err else sys.stdout, flush=True)


def _summary(r: dict) -> None:
    p, lat = r["parity"], r["latency"]
    say(f"{r['target']}: {'PASS' if r['passed'] else 'FAIL'}  top1 {p['top1_agreement']:.4f}  KL {p['kl_mean']:.3g}  "
         f"ppl {p['ppl']:.4g}/{p['ppl_reference']:.4g}  greedy {p['greedy_match']}/{p['greedy_total']}  "
         f"{r['artifact']['bytes'] / 1e6:.2f} MB ({r['artifact']['bytes_per_param']:.3f} B/param)  "
         f"decode {lat['decode_tok_s']:.1f} tok/s  ttft {lat['ttft_ms']:.1f} ms  rss {r['memory']['peak_rss_mb']:.0f} MB")
