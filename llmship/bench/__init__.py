"""`llmship bench`: llmship's artifacts beside each runtime's own first-party LLM exporter, in one run.

Every row is measured on this machine in this run: export wall time and peak RSS (child process), size,
load time, time to first token, prefill/decode tokens/s at 2 threads, parity against llmship's FP32
reference where the tokens line up, and the fraction of the memory-bandwidth ceiling reached in decode.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROW_FIELDS = ("runtime", "tool", "recipe", "model", "bytes", "bytes_per_param", "export_s", "export_peak_rss_mb", "load_s",
              "ttft_ms", "prefill_tok_s", "decode_tok_s", "roofline_fraction", "kl_mean", "top1_agreement", "error")
# Every default target, plus the fp32 targets the anchors' fp32 recipes are compared with.
BENCH_TARGETS = ("pytorch-fp32", "executorch-fp32", "executorch-8da4w", "onnx-fp32", "onnx-int4", "litert-fp32",
                 "litert-int8", "coreml-fp16")


@dataclass
class BenchContext:
    source: str  # llmship model source
    model: str  # short model name for the table
    workdir: Path
    hf_dir: Path  # the same weights as a Hugging Face checkpoint directory, for the anchors' converters
    params: int
    eval_tokens: list[int]
    reference_logits: Path  # .npy [N, vocab] from llmship's FP32 reference, teacher-forced on eval_tokens
    prompt_tokens: list[int]  # for time-to-first-token
    threads: int = 2
    decode_steps: int = 32
    quick: bool = False
    machine: dict = field(default_factory=dict)


def row(**values) -> dict:
    r = {k: None for k in ROW_FIELDS}
    r.update(values)
    return r


def prepare(source: str, workdir: Path, quick: bool) -> BenchContext:
    """Load the model once: write it as an HF checkpoint for the anchors, sample eval tokens, save reference logits."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from llmship.config import Evaluation, TargetProfile
    from llmship.models import build_decoder, load_model
    from llmship.models.sources import model_slug
    from llmship.validation import evaluate as ev
    from llmship.validation.runners.reference import ReferenceRunner

    loaded = load_model(source)
    hf_dir = workdir / "hf"
    if not (hf_dir / "model.safetensors").is_file():
        hf_dir.mkdir(parents=True, exist_ok=True)
        weights = dict(loaded.weights)  # a tied head is absent: transformers ties it from the config
        save_file({k: v.contiguous() for k, v in weights.items()}, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
        config = dict(loaded.config, architectures=["LlamaForCausalLM"] if loaded.spec.model_type == "llama" else loaded.config.get("architectures"),
                      torch_dtype="float32", hidden_act="silu")
        config.pop("_model_name_or_path", None)
        (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
        loaded.tokenizer.save(str(hf_dir / "tokenizer.json"))
        (hf_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": loaded.tokenizer.id_to_token(loaded.spec.bos_token_id) if loaded.spec.bos_token_id is not None else None,
            "eos_token": loaded.tokenizer.id_to_token(loaded.spec.eos_token_ids[0]) if loaded.spec.eos_token_ids else None}))
        (hf_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": loaded.spec.bos_token_id,
            "eos_token_id": list(loaded.spec.eos_token_ids) or None, "do_sample": False}))
    target = TargetProfile(name="bench", format="pytorch", runtime="pytorch", max_context=512, prefill_lengths=(32, 128))
    decoder = build_decoder(loaded, 512)
    reference = ReferenceRunner.from_decoder(decoder)
    plan = ev.make_plan(lambda: decoder, loaded.tokenizer, loaded.spec, target, Evaluation(tokens=128), None)  # one window
    ref_logits = ev.teacher_forced(reference, plan, "reference", whole_windows=True)
    np.save(workdir / "reference_logits.npy", ref_logits)
    torch.set_num_threads(2)
    return BenchContext(source=source, model=model_slug(source), workdir=workdir, hf_dir=hf_dir, params=loaded.spec.num_params,
                        eval_tokens=list(plan.tokens), reference_logits=workdir / "reference_logits.npy",
                        prompt_tokens=list(plan.tokens[:128]), quick=quick)


def target_row(profile, model: str) -> dict:
    """A bench row for one of our targets, labelled with its runtime from the format registry."""
    from llmship.formats import get_format

    return row(runtime=get_format(profile.format).runtime, tool="llmship", recipe=profile.name, model=model)


def llmship_rows(ctx: BenchContext, targets: tuple[str, ...]) -> list[dict]:
    """Our targets through the CLI: export (timed, peak RSS) then validate (parity, latency, size)."""
    from llmship.bench.measure import run_measured
    from llmship.targets import all_profiles

    rows = []
    for name in targets:
        profile = all_profiles().get(name)
        if profile is None:
            rows.append(row(runtime="?", tool="llmship", recipe=name, model=ctx.model, error="target not available in this build"))
            continue
        art = ctx.workdir / "llmship" / name
        base = target_row(profile, ctx.model)
        print(f"bench: llmship {name}: export", flush=True)
        exp = run_measured([sys.executable, "-m", "llmship", "export", "--model", ctx.source, "--target", name, "--out", str(art)])
        if exp.returncode != 0:
            rows.append({**base, "error": f"export: {exp.error_line()}"})
            continue
        print(f"bench: llmship {name}: validate", flush=True)
        val = run_measured([sys.executable, "-m", "llmship", "validate", str(art), "--set", "evaluation.tokens=128",
                            "--set", f"evaluation.latency_runs={ctx.decode_steps}"])
        report_path = art / "report.json"
        if not report_path.is_file():
            rows.append({**base, "export_s": exp.wall_s, "export_peak_rss_mb": exp.peak_rss_mb, "error": f"validate: {val.error_line()}"})
            continue
        rep = json.loads(report_path.read_text())
        lat = rep["latency"]
        model_bytes = sum(f["bytes"] for n, f in rep["artifact"]["files"].items() if not n.startswith("tokenizer"))
        rows.append({**base, "bytes": model_bytes, "bytes_per_param": model_bytes / ctx.params, "export_s": exp.wall_s,
                     "export_peak_rss_mb": exp.peak_rss_mb, "load_s": lat["load_s"], "ttft_ms": lat["ttft_ms"],
                     "prefill_tok_s": lat["prefill_tok_s"], "decode_tok_s": lat["decode_tok_s"],
                     "kl_mean": rep["parity"]["kl_mean"], "top1_agreement": rep["parity"]["top1_agreement"],
                     "error": None if rep["passed"] else "gate failed: " + ", ".join(g["name"] for g in rep["gates"] if not g["passed"])})
    return rows


def add_roofline(rows: list[dict], machine: dict) -> None:
    """decode tok/s ÷ (bandwidth ÷ bytes read per token). Bytes read per token are taken as the model
    file's bytes: an upper bound (an embedding table stored apart from the head is only gathered), so the
    fraction is a lower bound."""
    bw = machine["read_gb_s"] * 1e9
    for r in rows:
        if r.get("decode_tok_s") and r.get("bytes"):
            r["roofline_fraction"] = r["decode_tok_s"] / (bw / r["bytes"])


def run_bench(source: str, out: Path, quick: bool = False, anchors: list[str] | None = None,
              targets: tuple[str, ...] = BENCH_TARGETS) -> dict:
    import importlib

    from llmship.bench.anchors import ANCHORS
    from llmship.bench.machine import measure_bandwidth
    from llmship.bench.render import write_outputs

    out = Path(out).resolve()  # anchors run converters in their own working directories
    work = out / "work" / ("quick" if quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    print("bench: measuring memory bandwidth", flush=True)
    machine = measure_bandwidth()
    ctx = prepare(source, work, quick)
    ctx.machine = machine
    rows = llmship_rows(ctx, targets)
    for name in anchors or list(ANCHORS):
        print(f"bench: anchor {name}", flush=True)
        try:
            rows.extend(importlib.import_module(ANCHORS[name]).run(ctx))
        except Exception as exc:  # an anchor that cannot run is listed with its error, not dropped
            rows.append(row(runtime="?", tool=name, recipe="-", model=ctx.model, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
    add_roofline(rows, machine)
    from llmship.bench.compression import rows as compression_rows
    from llmship.bench.pruning import rows as pruning_rows

    results = {"machine": machine, "model": ctx.model, "source": source, "params": ctx.params, "quick": quick, "rows": rows,
               "compression": compression_rows(ctx), "pruning": pruning_rows(ctx)}
    write_outputs(results, out)
    return results
