"""The validate stage: run an artifact on its own runtime, measure it, assemble report.json and judge it.

The artifact is compared twice: `parity` against the FP32 reference (what the user gets, gated per recipe),
and `conversion` against the compressed reference (the canonical model with the record's weights and the
runtime's activation quantization, in PyTorch: is the converter right?, gated tight for every recipe). An
artifact without quantized weights has the FP32 reference as its compressed reference.

An artifact with separate adapters is judged as the bare base (the report's top level) and once per adapter, run
on the runtime with that adapter's shipped file active: parity against the FP32 base with the adapter merged,
conversion against the compressed reference with the adapter's stored (fp16/fp32) tensors beside its linears. Each
adapter's gates join the report's as `adapter.<name>.<gate>` (and its file's integrity); its numbers are in
`by_adapter`. All are scored on the same plan (sampled from the bare base when no text is given).

Order matters for the user: everything that can refuse the run (manifest, overrides, baseline, the runtime
being installed, the reference model matching) is checked before the minutes of evaluation start.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmship.errors import ConfigError
from llmship.manifest import REPORT, check_integrity, read_manifest, write_text_atomic
from llmship.progress import say, stage

REPORT_VERSION = 2  # 2: windows, intervals, tie-robust top-1, conversion, greedy text (version 1 reports still render)
# What a baseline report must hold for the regression gates to mean anything.
BASELINE_FIELDS = ("artifact.bytes", "latency.decode_tok_s", "parity.kl_mean")


def load_baseline(path: str | Path | None, target: str) -> dict | None:
    from llmship.validation.gates import lookup

    if path is None:
        return None
    path = Path(path)
    for candidate in (path, path / REPORT, path / target / REPORT):
        if candidate.is_file():
            try:
                baseline = json.loads(candidate.read_text())
            except (ValueError, UnicodeDecodeError, OSError) as exc:
                raise ConfigError(f"baseline {candidate} is not valid JSON: {exc}") from None
            missing = [f for f in BASELINE_FIELDS if not isinstance(lookup(baseline, f), (int, float))
                       or isinstance(lookup(baseline, f), bool)]
            if missing:
                raise ConfigError(f"baseline {candidate} has no number at {missing[0]}; the regression gates need "
                                  f"{', '.join(BASELINE_FIELDS)} (pass a report.json llmship wrote)")
            return baseline
    raise ConfigError(f"baseline {path} holds no {REPORT} for {target}")


# KL that fp32 summation order alone produces (fp32 targets measure 1e-12..1e-10; their gate is 1e-6): a floor below
# it is no floor, so the floor ratio is taken against at least this.
FP32_KL = 1e-8


def validate_artifact(artifact_dir: Path, config, model: str | None = None, eval_text: str | None = None,
                      baseline: str | Path | None = None, loaded=None) -> dict:
    """Run the artifact on its runtime against the FP32 and the compressed reference; write report.json; return it."""
    from llmship import adapters
    from llmship.compress import structure
    from llmship.models import build_decoder, load_model
    from llmship.models.weights import weights_digest
    from llmship.targets import target_from_manifest
    from llmship.validation import evaluate as ev
    from llmship.validation.gates import check_gates, failure_message
    from llmship.validation.latency import run_in_child
    from llmship.validation.runners import open_runner

    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    target = target_from_manifest(manifest, config)
    base = load_baseline(baseline, target.name)
    if loaded is None or (model is not None and model != loaded.source):
        loaded = load_model(model or manifest["source"])
    loaded = adapters.from_manifest(loaded, manifest)  # the reference is the base with the artifact's adapter merged
    student = structure.from_manifest(loaded, manifest)  # a pruned artifact: the student its record starts from
    if student.spec.vocab_size != manifest["model"]["vocab_size"] or student.spec.num_layers != manifest["model"]["num_layers"]:
        raise ConfigError(f"reference model {loaded.source} does not match the artifact {artifact_dir} (vocab or layers differ)")
    integrity = check_integrity(artifact_dir, manifest)
    record = compressed_record(student, manifest, config, eval_text)
    runner = open_runner(artifact_dir, manifest, target.threads)  # a missing runtime stops here, before any evaluation
    try:
        say(f"{target.name}: reference {loaded.source}")
        weights = weights_digest(loaded.weights)  # once: it keys the sampled windows and the FP32 reference
        plan = ev.make_plan(lambda: build_decoder(loaded, target.max_context), loaded.tokenizer, loaded.spec, target,
                            config.evaluation, eval_text, weights)
        record_digest = record.digest() if record is not None else None  # once: it keys two references, and the report
        references = reference_results(loaded, record, target, plan, weights, record_digest, student=student)
        say(f"{target.name}: evaluating {len(plan.tokens)} tokens in {len(plan.windows)} windows on {runner.executor}")
        logits = ev.teacher_forced(runner, plan, target.name)
        our_greedy = [ev.greedy(runner, p, plan.greedy_tokens, plan.chunk) for p in plan.prompts]
        by_adapter = {a.name: judge_adapter(runner, a, artifact_dir, manifest, integrity, loaded, record, target, plan,
                                            weights, record_digest) for a in loaded.lora}
    finally:
        runner.close()
    margin = target.gates.top1_tie_margin
    parity, series = compare(logits, our_greedy, references["fp32"], references["fp32_greedy"], plan, margin)
    conversion, conversion_series = compare(logits, our_greedy, references["compressed"], references["compressed_greedy"], plan, margin)
    conversion["reference"] = ("compressed (record digest %s)" % record_digest[:12] if record is not None
                               else "pruned student (digest %s)" % student.structure["digest"][:12] if student.structure
                               else "fp32 (no quantized weights)")
    add_floor(conversion, references)
    series["conversion_kl"] = conversion_series["kl"]
    say(f"{target.name}: latency and memory (separate process, {target.threads} threads)")
    with stage(f"{target.name}: timing"):
        timing = run_in_child(artifact_dir, target.threads, config.evaluation.latency_runs)
    # A runtime that rewrites the file it opens would make the next check fail with no clue why: say so now.
    changed = sorted(set(check_integrity(artifact_dir, manifest)["mismatched"]) - set(integrity["mismatched"]))
    total_bytes = sum(f["bytes"] for f in integrity["files"].values())
    params = manifest["model"]["params"]
    ref_greedy = [list(map(int, g)) for g in references["fp32_greedy"]]
    report = {
        "report_version": REPORT_VERSION,
        "target": target.name,
        "format": target.format,
        "source": loaded.source,
        "adapters": loaded.adapters,
        "executor": runner.executor,
        "executor_note": getattr(runner, "executor_note", None),
        "recipe": target.recipe.model_dump(),
        "artifact": {"bytes": total_bytes, "files": integrity["files"], "params": params, "bytes_per_param": total_bytes / params},
        "integrity": {"mismatched": integrity["mismatched"], "changed_by_validation": changed},
        "evaluation": {"tokens": len(plan.tokens), "windows": len(plan.windows), "domains": sorted({w.domain for w in plan.windows}),
                       "tokens_sha256": tokens_digest(plan), "tie_margin": margin},
        "parity": parity,
        "parity_by_domain": by_domain(logits, references["fp32"], plan, margin),
        "conversion": conversion,
        "structure": structure_summary(student.structure),
        "compression": None if record is None else {
            "algorithm": record.algorithm, "digest": record_digest, "matrices": len(record.tensors),
            "stored_bytes": sum(t.stored_bytes() for t in record.tensors.values()), "notes": record.notes,
            **allocation_summary(manifest)},
        "greedy": {"reference": ref_greedy, "artifact": our_greedy,
                   "compressed_reference": [list(map(int, g)) for g in references["compressed_greedy"]],
                   "text": greedy_text(loaded.tokenizer, plan, ref_greedy, our_greedy)},
        "series": series,
        "latency": {k: timing[k] for k in ("threads", "load_s", "ttft_ms", "ttft_ms_by_prefill_length", "prefill_tok_s",
                                            "decode_tok_s", "decode_ms_p50", "decode_ms_p90")},
        "memory": {"peak_rss_mb": timing["peak_rss_mb"]},
    }
    if by_adapter:
        report["by_adapter"] = by_adapter
    report["gates"] = check_gates(report, target.gates, base) + [
        {**g, "name": f"adapter.{name}.{g['name']}"} for name, result in by_adapter.items() for g in result["gates"]]
    report["passed"] = all(g["passed"] for g in report["gates"])
    write_report(artifact_dir, report)
    summary(report)
    if not report["passed"]:
        say(failure_message(target.name, report["gates"]), err=True)
    return report


def add_floor(conversion: dict, references: dict) -> None:
    """The noise floor beside the conversion metrics, and their ratio (what a dynamic-activation recipe is gated on)."""
    if "floor" in references:
        floor = float(references["floor"])
        conversion["noise_floor_kl_mean"] = floor
        conversion["floor_ratio"] = conversion["kl_mean"] / max(floor, FP32_KL) if conversion["kl_mean"] is not None else None


def judge_adapter(runner, adapter, artifact_dir: Path, manifest: dict, integrity: dict, loaded, record, target, plan,
                  weights_digest: str, record_digest: str | None) -> dict:
    """One separate adapter: the artifact run with its shipped file active, against the base + that adapter."""
    from llmship.validation import evaluate as ev
    from llmship.validation.gates import check_gates
    from llmship.validation.runners import adapter_entry

    entry = adapter_entry(manifest, adapter.name)
    file = entry["file"]
    runner.set_adapter(adapter.name)
    try:
        logits = ev.teacher_forced(runner, plan, f"{target.name} + {adapter.name}")
        greedy = [ev.greedy(runner, p, plan.greedy_tokens, plan.chunk) for p in plan.prompts]
    finally:
        runner.set_adapter(None)
    refs = reference_results(loaded, record, target, plan, weights_digest, record_digest, adapter)
    margin = target.gates.top1_tie_margin
    parity, _ = compare(logits, greedy, refs["fp32"], refs["fp32_greedy"], plan, margin)
    conversion, _ = compare(logits, greedy, refs["compressed"], refs["compressed_greedy"], plan, margin)
    add_floor(conversion, refs)
    # its bytes: its own file's, or (an adapter stored inside a file it shares with the base) what the exporter counted;
    # its integrity: that file, or every file of that package
    mine = [f for f in integrity["mismatched"] if f == file or f.startswith(file + "/")]
    result = {"file": file, "bytes": entry.get("bytes", manifest["files"].get(file, {}).get("bytes")), "params": adapter.params,
              "parity": parity, "conversion": conversion, "integrity": {"mismatched": mine, "changed_by_validation": []},
              "greedy": {"reference": [list(map(int, g)) for g in refs["fp32_greedy"]], "artifact": greedy}}
    result["gates"] = check_gates(result, target.gates, sections=("parity", "conversion"))
    result["passed"] = all(g["passed"] for g in result["gates"])
    say(f"{target.name} + {adapter.name}: {'PASS' if result['passed'] else 'FAIL'}  top1 {parity['top1_agreement']:.4f}  "
        f"KL {_num(parity['kl_mean'], '.3g')}  (conversion KL {_num(conversion['kl_mean'], '.3g')})  "
        f"greedy {parity['greedy_match']}/{parity['greedy_total']}  {result['bytes'] / 1e3:.1f} kB")
    return result


def reference_results(loaded, record, target, plan, weights_digest: str, record_digest: str | None, adapter=None,
                      student=None) -> dict:
    """The FP32 reference's logits and greedy tokens on the plan, the compressed reference's, and the noise floor:
    each computed once per (model weights, plan) or (record, plan) and cached on disk (the digests are the keys).
    With a separate `adapter`: the FP32 reference is the base with it merged, the compressed one runs its stored
    tensors beside the (compressed) base's linears (adapters/branch.py), and its digest joins the keys.
    With a pruned `student` (compress/structure.py): the FP32 reference stays `loaded`, the original; the compressed
    one is the student (with the record's weights when it has one)."""
    from llmship.adapters import merged
    from llmship.adapters.branch import with_branches
    from llmship.models import build_decoder
    from llmship.validation import cache
    from llmship.validation import evaluate as ev
    from llmship.validation.runners.reference import ReferenceRunner

    def run(decoder, desc):
        runner = ReferenceRunner.from_decoder(decoder, threads=target.threads)
        return {"logits": ev.teacher_forced(runner, plan, desc, whole_windows=True),
                "greedy": np.asarray([ev.greedy(runner, p, plan.greedy_tokens, plan.chunk) for p in plan.prompts], dtype=np.int64)}

    planned, c = cache.plan_digest(plan), target.max_context
    also = (adapter.sha256, loaded.adapters["dtype"]) if adapter is not None else ()
    fp32 = cache.cached("fp32", (weights_digest, *also, planned, c),
                        lambda: run(build_decoder(loaded if adapter is None else merged(loaded, adapter), c), "reference"))
    out = {"fp32": fp32["logits"], "fp32_greedy": fp32["greedy"], "compressed": fp32["logits"], "compressed_greedy": fp32["greedy"]}
    pruned = student is not None and student.structure is not None
    if record is None and adapter is None and not pruned:
        return out
    from llmship.compress.reference import compressed_reference, has_dynamic_activations

    base = student if pruned else loaded

    def compressed_decoder(noise_seed=None):
        decoder = build_decoder(base, c) if record is None else compressed_reference(base, record, c, noise_seed=noise_seed)
        return decoder if adapter is None else with_branches(decoder, adapter, loaded.adapters["dtype"])

    base_key = record_digest if record is not None else student.structure["digest"] if pruned else weights_digest
    comp = cache.cached("compressed", (base_key, *also, planned, c), lambda: run(compressed_decoder(), "compressed reference"))
    out.update(compressed=comp["logits"], compressed_greedy=comp["greedy"])
    # The floor is what the conversion gate of a dynamic-activation recipe is a ratio to; a weight-only variant of
    # such a target (recipe.activations fp32) keeps the same gate, so it gets its floor too.
    if record is not None and (has_dynamic_activations(record) or target.gates.conversion_floor_ratio_max is not None):
        def floor():
            noisy = ReferenceRunner.from_decoder(compressed_decoder(noise_seed=0), threads=target.threads)
            metrics, _ = ev.parity_metrics(ev.teacher_forced(noisy, plan, "noise floor", whole_windows=True), comp["logits"], plan.targets())
            return {"floor": np.asarray(metrics["kl_mean"])}
        out["floor"] = cache.cached("floor", (record_digest, *also, planned, c), floor)["floor"]
    return out


def structure_summary(structure: dict | None) -> dict | None:
    """What pruning kept and how healing went, for the report (the manifest has the rest)."""
    if not structure:
        return None
    heal = structure.get("heal")
    return {"digest": structure["digest"], "compression": structure["compression"], "layers": structure["layers"],
            "ffn_width": structure["ffn_width"], "ffn_width_before": structure["ffn_width_before"],
            "params": structure["params"], "params_before": structure["params_before"],
            "heal": None if heal is None else {"steps": len(heal["loss"]), "loss": heal["loss"], "seconds": heal["seconds"]}}


def allocation_summary(manifest: dict) -> dict:
    """What a budget chose (kept small in the report: counts per grid; the manifest has every matrix)."""
    allocation = (manifest.get("compression") or {}).get("allocation")
    if not allocation:
        return {}
    return {"budget_bytes": allocation["budget_bytes"], "allocation_counts": allocation["counts"],
            "predicted_sensitivity": allocation["sensitivity"]}


def tokens_digest(plan) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(plan.tokens, dtype=np.int64).tobytes()).hexdigest()


def by_domain(logits, ref, plan, margin) -> dict:
    """Parity on each text of a multi-text evaluation (empty for one text)."""
    from llmship.validation import evaluate as ev

    domains = plan.domains()
    names = sorted(set(domains))
    if len(names) < 2:
        return {}
    targets = plan.targets()
    out = {}
    for name in names:
        rows = domains == name
        metrics, _ = ev.parity_metrics(logits[rows], ref[rows], targets[rows], margin)
        out[name] = {k: metrics[k] for k in ("kl_mean", "top1_agreement", "top1_clear", "ppl", "ppl_reference", "eval_tokens", "intervals")
                     if k in metrics}
    return out


def greedy_text(tokenizer, plan, reference: list[list[int]], artifact: list[list[int]]) -> list[dict]:
    """Each prompt's greedy continuation from the reference and the artifact, decoded, and where they first differ."""
    from llmship.validation.evaluate import greedy_match

    def pieces(prompt, tokens):  # each token's text in context (a lone sentencepiece token loses its space)
        texts = [tokenizer.decode(list(prompt) + list(tokens[:i]), skip_special_tokens=True) for i in range(len(tokens) + 1)]
        return [b[len(a):] if b.startswith(a) else tokenizer.decode([t]) for a, b, t in zip(texts, texts[1:], tokens)]

    out = []
    for prompt, ref, ours in zip(plan.prompts, reference, artifact):
        n = greedy_match(ours, ref)
        out.append({"prompt": tokenizer.decode(list(prompt), skip_special_tokens=True), "reference": pieces(prompt, ref),
                    "artifact": pieces(prompt, ours), "first_divergence": None if n == len(ref) else n})
    return out


def compressed_record(loaded, manifest: dict, config, eval_text: str | None):
    """The record the artifact was built from, or None for an artifact without quantized weights."""
    compression = manifest.get("compression")
    if not compression:
        return None
    from llmship.compress import rebuild_record

    return rebuild_record(loaded, compression, config.calibration, config.evaluation, eval_text)


def compare(logits, greedy, ref_logits, ref_greedy, plan, margin: float = 0.0) -> tuple[dict, dict]:
    """Parity metrics of an artifact's teacher-forced logits and greedy tokens against one reference."""
    from llmship.validation import evaluate as ev

    ref_greedy = [list(map(int, g)) for g in ref_greedy]
    metrics, series = ev.parity_metrics(logits, ref_logits, plan.targets(), margin)
    matched = sum(ev.greedy_match(o, r) for o, r in zip(greedy, ref_greedy)) if metrics["finite"] else 0
    total = sum(len(r) for r in ref_greedy)
    metrics.update(greedy_match=matched, greedy_total=total, greedy_fraction=matched / total if total else 0.0,
                   ppl_ratio=metrics["ppl"] / metrics["ppl_reference"] if metrics["ppl"] is not None else None)
    return metrics, series


def write_report(artifact_dir: Path, report: dict) -> None:
    from llmship.outputs import OutputError

    try:
        write_text_atomic(artifact_dir / REPORT, json.dumps(report, indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write {artifact_dir / REPORT}: {exc.strerror or exc}") from None


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def summary(r: dict) -> None:
    p, lat = r["parity"], r["latency"]
    c = r.get("conversion") or p
    say(f"{r['target']}: {'PASS' if r['passed'] else 'FAIL'}  top1 {p['top1_agreement']:.4f}  KL {_num(p['kl_mean'], '.3g')}  "
        f"(conversion KL {_num(c['kl_mean'], '.3g')}, top1 {c['top1_agreement']:.4f})  "
        f"ppl {_num(p['ppl'], '.4g')}/{p['ppl_reference']:.4g}  greedy {p['greedy_match']}/{p['greedy_total']}  "
        f"{r['artifact']['bytes'] / 1e6:.2f} MB ({r['artifact']['bytes_per_param']:.3f} B/param)  "
        f"decode {lat['decode_tok_s']:.1f} tok/s  ttft {lat['ttft_ms']:.1f} ms  rss {r['memory']['peak_rss_mb']:.0f} MB")
