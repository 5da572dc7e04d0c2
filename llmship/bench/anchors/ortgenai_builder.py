"""Anchor: onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT
-p int4|fp32 -e cpu`, its defaults otherwise: int4 is symmetric round-to-nearest MatMulNBits with block size 32
and accuracy level 4, i.e. int8 activations, lm_head included, and the embedding as GatherBlockQuantized int4,
stored apart from the head), run with onnxruntime-genai's own Model and Generator.

The Generator is what an app calls: `append_tokens` runs the model on the tokens given (the prompt, or one
teacher-forced token); `generate_next_token` picks the next token from the current logits (greedy here),
appends it and runs it through the model at once. So time to first token is `append_tokens(prompt)` plus the
argmax of its logits, and each `generate_next_token` is one decode step.
"""
from __future__ import annotations

import json
import sys
import time

TOOL, RUNTIME = "onnxruntime-genai-builder", "onnxruntime"
RECIPES = ("int4", "fp32")
MAX_LENGTH = 512  # the Generator's KV buffer (past/present share it), as llmship's targets' max_context
WARMUP_STEPS = 3


def run(ctx) -> list[dict]:
    from llmship.bench import row
    from llmship.bench.measure import measure_payload, measured_row, run_measured

    work = ctx.workdir / "onnxruntime-genai-builder"
    rows = []
    for recipe in RECIPES:
        out = work / recipe
        base = row(runtime=RUNTIME, tool=TOOL, recipe=recipe, model=ctx.model)
        print(f"bench: {TOOL} {recipe}: export", flush=True)
        exp = run_measured([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ctx.hf_dir), "-o", str(out),
                            "-p", recipe, "-e", "cpu", "-c", str(work / "cache")])
        base.update(export_s=exp.wall_s, export_peak_rss_mb=exp.peak_rss_mb)
        if exp.returncode != 0 or not (out / "genai_config.json").is_file():
            rows.append({**base, "error": f"export: {exp.error_line()}"})
            continue
        config = json.loads((out / "genai_config.json").read_text())
        model_file = config["model"]["decoder"]["filename"]
        # The model graph and its external weights; the builder also copies tokenizer and config files beside them.
        size = sum(p.stat().st_size for p in out.iterdir() if p.name == model_file or p.name.startswith(model_file + "."))
        base.update(bytes=size, bytes_per_param=size / ctx.params)
        print(f"bench: {TOOL} {recipe}: measure", flush=True)
        rows.append(measured_row(__name__, base, measure_payload(ctx, model=str(out))))
    return rows


def _measure(args: dict) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    from llmship.bench.measure import timing_and_parity

    t0 = time.perf_counter()
    config = og.Config(args["model"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args["threads"],
                                                                         "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0

    def generator():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=MAX_LENGTH, do_sample=False)
        return og.Generator(model, params)

    prompt = args["prompt"]
    times = []
    for _ in range(3):
        gen = generator()
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        int(np.argmax(gen.get_logits()))
        times.append(time.perf_counter() - t0)
    ttft = float(np.median(times))
    step_s = []
    for i in range(WARMUP_STEPS + args["steps"]):
        t0 = time.perf_counter()
        gen.generate_next_token()
        gen.get_next_tokens()
        if i >= WARMUP_STEPS:
            step_s.append(time.perf_counter() - t0)
    # Teacher-forced through the cache path: one token appended per call, its logits read back.
    gen, rows = generator(), []
    for t in args["eval"]:
        gen.append_tokens([t])
        rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
    return timing_and_parity(args, load_s, ttft, sum(step_s), len(step_s), np.stack(rows))


if __name__ == "__main__":
    from llmship.bench.measure import child_main

    child_main(globals())
