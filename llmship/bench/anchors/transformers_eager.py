"""Anchor: transformers' eager fp32 model and `generate` — what a user has before any export."""
from __future__ import annotations

import json
import sys
import time


def run(ctx) -> list[dict]:
    from llmship.bench import row
    from llmship.bench.measure import run_measured

    res = run_measured([sys.executable, "-m", __name__, json.dumps({
        "hf_dir": str(ctx.hf_dir), "prompt": ctx.prompt_tokens, "eval": ctx.eval_tokens, "steps": ctx.decode_steps,
        "threads": ctx.threads, "reference": str(ctx.reference_logits)})])
    base = row(runtime="pytorch", tool="transformers-eager", recipe="fp32 generate", model=ctx.model)
    if res.returncode != 0:
        return [{**base, "error": res.error_line()}]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    return [{**base, **m, "bytes_per_param": m["bytes"] / ctx.params}]


def _measure(args: dict) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from llmship.bench import BenchContext, parity_vs_reference

    torch.set_num_threads(args["threads"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args["hf_dir"], dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    prompt = torch.tensor([args["prompt"]])
    with torch.no_grad():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(prompt).logits[0, -1].argmax()
            times.append(time.perf_counter() - t0)
        ttft = float(np.median(times))
        steps = args["steps"]
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False)
        decode_s = max(time.perf_counter() - t0 - ttft, 1e-9)
        logits = model(torch.tensor([args["eval"]])).logits[0].numpy()
    from pathlib import Path

    ctx = BenchContext(source="", model="", workdir=Path("."), hf_dir=Path(args["hf_dir"]), params=1, eval_tokens=args["eval"],
                       reference_logits=Path(args["reference"]), prompt_tokens=args["prompt"])
    size = sum(p.stat().st_size for p in Path(args["hf_dir"]).glob("*.safetensors"))
    return {"bytes": size, "load_s": load_s, "ttft_ms": 1000 * ttft, "prefill_tok_s": len(args["prompt"]) / ttft,
            "decode_tok_s": steps / decode_s, **parity_vs_reference(logits, ctx)}


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
