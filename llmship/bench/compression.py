"""The compression stage's own cost, each step in a child process with a fresh cache (wall time, peak RSS):

  gptq         the GPTQ record of a target (calibration sampling, sequential Hessians, every matrix)
  sensitivity  mixed precision's sensitivities and allocation for a target at a budget

`python -m llmship.bench.compression STEP SOURCE TARGET` prints one JSON object; `rows(ctx)` runs them for the bench.
"""
from __future__ import annotations

import json
import sys
import time

STEPS = (("gptq", "executorch-8da4w"), ("sensitivity", "executorch-8da4w"))


def _run(step: str, source: str, target_name: str) -> dict:
    from llmship.compress.mixed import allocation
    from llmship.config import BuildConfig, Budget, Recipe
    from llmship.formats import exporter
    from llmship.models import load_model
    from llmship.pipeline import compression_record
    from llmship.targets import get_profile

    loaded = load_model(source)
    target = get_profile(target_name)
    module = exporter(target.format)
    config = BuildConfig()
    t0 = time.perf_counter()
    if step == "gptq":
        target = target.model_copy(update={"recipe": target.recipe.model_copy(update={"algorithm": "gptq"})})
        record, _, _ = compression_record(loaded, target, module, config)
        detail = {"matrices": len(record.tensors), "calibration_tokens": config.calibration.tokens}
    else:
        budgeted = target.model_copy(update={"recipe": Recipe.model_validate({**target.recipe.model_dump(),
                                                                              "budget": Budget(bytes_per_param=0.9).model_dump()})})
        _, summary = allocation(loaded, budgeted, module, config.calibration, config.evaluation)
        detail = {"matrices": len(summary["choice"]), "counts": summary["counts"], "sensitivity_tokens": budgeted.recipe.budget.sensitivity_tokens}
    return {"seconds": time.perf_counter() - t0, **detail}


def rows(ctx, steps=STEPS) -> list[dict]:
    from llmship.bench.measure import cold_child_row

    out = []
    for step, target in steps:
        print(f"bench: compression {step} ({target})", flush=True)
        out.append(cold_child_row(["llmship.bench.compression", step, ctx.source, target], step=step, target=target, model=ctx.model))
    return out


if __name__ == "__main__":
    print(json.dumps(_run(*sys.argv[1:4])))
