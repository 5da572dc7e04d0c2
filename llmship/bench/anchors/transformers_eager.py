"""Anchor: transformers' eager fp32 model and `generate` — what a user has before any export."""
from __future__ import annotations

import time


def run(ctx) -> list[dict]:
    from llmship.bench import row
    from llmship.bench.measure import measure_payload, measured_row

    base = row(runtime="pytorch", tool="transformers-eager", recipe="fp32 generate", model=ctx.model)
    size = sum(p.stat().st_size for p in ctx.hf_dir.glob("*.safetensors"))
    base.update(bytes=size, bytes_per_param=size / ctx.params)
    return [measured_row(__name__, base, measure_payload(ctx, hf_dir=str(ctx.hf_dir)))]


def _measure(args: dict) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from llmship.bench.measure import timing_and_parity

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
    return timing_and_parity(args, load_s, ttft, decode_s, steps, logits)


if __name__ == "__main__":
    from llmship.bench.measure import child_main

    child_main(globals())
