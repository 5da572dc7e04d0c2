"""Structural compression's effect and cost (results.json `pruning`): a quarter of every FFN pruned, then healed for
0 and for N distillation steps, each in a child process with a fresh cache (wall time, peak RSS). Quality is the
student against the FP32 original, teacher-forced in PyTorch on real text neither importance nor healing saw (the
first 512 tokens of each of ../shared/data's texts, in windows of 256): KL mean, top-1 agreement, perplexity ratio.

`python -m llmship.bench.pruning SOURCE STEPS [LR]` prints one JSON object; `rows(ctx)` runs them for the bench.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TEXTS = ("tinyshakespeare.txt", "tinystories_val.txt")
FFN = 0.25
STEPS = {False: 200, True: 50}  # full bench (SmolLM2), quick (stories260K)
LR = {False: 2e-4, True: 1e-3}


def text_metrics(loaded, student, path: Path, tokens: int = 512, window: int = 256) -> dict:
    import torch
    from torch.nn import functional as F

    from llmship.compress.prune import run_sequences
    from llmship.models import build_decoder

    ids = loaded.tokenizer.encode(path.read_text(errors="replace")).ids
    body = window - (1 if loaded.spec.bos_token_id is not None else 0)
    windows = [([loaded.spec.bos_token_id] if loaded.spec.bos_token_id is not None else []) + ids[i:i + body]
               for i in range(0, tokens, body)][: tokens // body]
    batch = torch.tensor(windows, dtype=torch.int64)
    with torch.no_grad():
        t = F.log_softmax(run_sequences(build_decoder(loaded, window), batch).double(), -1)
        s = F.log_softmax(run_sequences(build_decoder(student, window), batch).double(), -1)
    nxt = batch[:, 1:]
    nll_t = -t[:, :-1].gather(-1, nxt[..., None]).mean()
    nll_s = -s[:, :-1].gather(-1, nxt[..., None]).mean()
    return {"kl_mean": float((t.exp() * (t - s)).sum(-1).mean()), "top1_agreement": float((t.argmax(-1) == s.argmax(-1)).double().mean()),
            "ppl_ratio": float(torch.exp(nll_s - nll_t)), "tokens": int(batch.numel())}


def _run(source: str, steps: int, lr: float) -> dict:
    import time

    from llmship.compress.structure import restructured
    from llmship.config import Calibration, Compression, Evaluation
    from llmship.models import load_model

    loaded = load_model(source)
    compression = Compression.model_validate({"prune": {"ffn": FFN}, "heal": {"steps": steps, "lr": lr}})
    t0 = time.perf_counter()
    student = restructured(loaded, compression, Calibration(), Evaluation())
    seconds = time.perf_counter() - t0
    heal = student.structure["heal"] or {}
    return {"steps": steps, "lr": lr, "ffn": FFN, "seconds": seconds, "heal_s": heal.get("seconds"),
            "seconds_per_step": heal.get("seconds_per_step"), "params_before": loaded.spec.num_params,
            "params": student.spec.num_params, "texts": {name: text_metrics(loaded, student, DATA / name) for name in TEXTS}}


def rows(ctx) -> list[dict]:
    from llmship.bench.measure import cold_child_row

    if not all((DATA / name).is_file() for name in TEXTS):
        return [{"model": ctx.model, "error": f"the evaluation texts are absent ({DATA}); they exist only in the development checkout"}]
    out = []
    for steps in (0, STEPS[ctx.quick]):
        print(f"bench: pruning ffn {FFN}, healing {steps} steps", flush=True)
        out.append(cold_child_row(["llmship.bench.pruning", ctx.source, str(steps), str(LR[ctx.quick])], model=ctx.model))
    return out


if __name__ == "__main__":
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # progress lines go to stderr; stdout's last line is the result
        result = _run(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 2e-4)
    print(json.dumps(result))
