"""The gradual search for the smallest artifact that passes its gates (`search: smallest`, `llmship build --smallest`).

Step 0 is the target's own recipe. Each next step asks for a budget `step` (default 10%) of step 0's bytes
smaller; the compression stage allocates grids under it (llmship/compress/mixed.py), the artifact is exported and
validated on its runtime. The search stops at the first step whose gates fail, or when the runtime cannot go
smaller; the smallest passing artifact stays at the target's path, and its report lists every step.
The format's own overhead (graph, metadata) is measured at step 0 and reserved out of every budget.
With `search.prune_step`, pruning steps follow: the target's own recipe on a model whose FFN loses channels worth
that fraction of the parameters more at each step, healed as `compression.heal` says (llmship/compress/structure.py),
until a step fails its gates (judged against the FP32 original).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from llmship.errors import ConfigError
from llmship.progress import say


def _step_row(i: int, budget, report: dict) -> dict:
    p = report["parity"]
    return {"step": i, "budget_bytes": budget, "bytes": report["artifact"]["bytes"], "kl_mean": p["kl_mean"],
            "top1_agreement": p.get("top1_clear", p["top1_agreement"]), "passed": report["passed"],
            "failed_gates": [g["name"] for g in report["gates"] if not g["passed"]]}


def smallest(loaded, target, config, artifact: Path, debug: bool = False, inputs_sha256: str | None = None) -> dict:
    """Search for the smallest passing artifact of `target` at `artifact`; returns its report (with `search`)."""
    import json

    from llmship.compress.mixed import predicted_bytes, smallest_total
    from llmship.config import Budget, Recipe
    from llmship.formats import exporter
    from llmship.manifest import REPORT, write_text_atomic
    from llmship.pipeline import export_artifact
    from llmship.validation.stage import validate_artifact

    from llmship.outputs import check_output_dir

    check_output_dir(artifact)  # replaced at the end: only ever an llmship artifact
    work = artifact.parent / f".{artifact.name}.search"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    steps, best = [], None
    try:
        first = work / "step-0"
        export_artifact(loaded, target, first, debug=debug, inputs_sha256=inputs_sha256, config=config)
        report = validate_artifact(first, config, loaded=loaded)
        steps.append(_step_row(0, None, report))
        if not report["passed"]:
            say(f"{target.name}: the recipe itself fails its gates; nothing smaller to search", err=True)
            best = first
        else:
            best, base = first, report["artifact"]["bytes"]
            module = exporter(target.format)
            overhead = max(0, base - predicted_bytes(loaded, target, module))
            floor = smallest_total(loaded, target, module) + overhead
            last = base  # bytes of the smallest passing artifact so far
            for i in range(1, config.search.max_steps + 1):
                # the next step, or the runtime's floor when the step would go below it (tried once, then done)
                budget = max(int(base * (1 - config.search.step * i)), floor)
                if steps[-1].get("budget_bytes") == budget or budget >= last:
                    break
                out, reserve, report = work / f"step-{i}", overhead, None
                for _attempt in range(3):  # again when only the size missed: the byte model is an estimate
                    recipe = Recipe.model_validate({**target.recipe.model_dump(),
                                                    "budget": Budget(bytes=budget, overhead_bytes=reserve).model_dump()})
                    candidate = target.model_copy(update={"recipe": recipe})
                    budget = max(budget, smallest_total(loaded, candidate, module))  # the floor with what is reserved now
                    if budget >= last:
                        report = None
                        break
                    candidate = candidate.model_copy(update={"recipe": recipe.model_copy(update={
                        "budget": recipe.budget.model_copy(update={"bytes": float(budget)})})})
                    say(f"{target.name}: search step {i}: budget {budget:,} B")
                    try:
                        export_artifact(loaded, candidate, out, debug=debug, inputs_sha256=inputs_sha256, config=config)
                    except ConfigError as exc:  # below what the runtime can store after all: the search is over
                        steps.append({"step": i, "budget_bytes": budget, "bytes": None, "passed": False, "failed_gates": [],
                                      "stopped": str(exc)})
                        report = None
                        break
                    report = validate_artifact(out, config, loaded=loaded)
                    if [g["name"] for g in report["gates"] if not g["passed"]] != ["budget_bytes"]:
                        break
                    reserve += report["artifact"]["bytes"] - budget + 1  # what the format added beyond the estimate
                    shutil.rmtree(out)
                    report = None
                if report is None:
                    break
                steps.append(_step_row(i, budget, report))
                if not report["passed"]:
                    break
                best, last = out, report["artifact"]["bytes"]
        if config.search.prune_step and steps[0]["passed"]:
            best = _pruning_steps(loaded, target, config, work, steps, best, debug, inputs_sha256)
        chosen = next(s["step"] for s in steps if (work / f"step-{s['step']}") == best)
        final = json.loads((best / REPORT).read_text())
        final["search"] = {"mode": "smallest", "chosen_step": chosen, "steps": steps}
        write_text_atomic(best / REPORT, json.dumps(final, indent=2) + "\n")
        if artifact.exists():
            shutil.rmtree(artifact)  # an llmship artifact of this target (atomic_directory refused anything else)
        best.rename(artifact)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ffn_fraction(spec, params: float) -> float:
    """The fraction of every FFN's channels whose weights hold `params` parameters."""
    return params / (3 * spec.hidden_size * spec.intermediate_size * len(spec.weight_layers))


def _pruning_steps(loaded, target, config, work: Path, steps: list, best: Path, debug: bool, inputs_sha256) -> Path:
    """Pruning steps after the budget's: FFN channels for `prune_step` of the parameters more each time, healed, the
    target's own recipe; stops at the first failing step. Returns the smallest passing artifact so far."""
    from llmship.pipeline import export_artifact
    from llmship.validation.stage import validate_artifact

    last = min(s["bytes"] for s in steps if s["passed"])
    first = len(steps)
    for k in range(1, config.search.max_steps + 1):
        ffn = ffn_fraction(loaded.spec, k * config.search.prune_step * loaded.spec.num_params)
        if ffn >= 0.95:
            break
        compression = config.compression.model_copy(update={"prune": config.compression.prune.model_copy(update={"ffn": ffn})})
        pruned_config = config.model_copy(update={"compression": compression})
        i, out = first + k - 1, work / f"step-{first + k - 1}"
        say(f"{target.name}: search step {i}: {ffn:.0%} of every FFN pruned")
        export_artifact(loaded, target, out, debug=debug, inputs_sha256=inputs_sha256, config=pruned_config)
        report = validate_artifact(out, pruned_config, loaded=loaded)
        steps.append({**_step_row(i, None, report), "prune_ffn": round(ffn, 4)})
        if not report["passed"]:
            break
        if report["artifact"]["bytes"] < last:
            best, last = out, report["artifact"]["bytes"]
    return best
