"""Mixed precision for one target: the runtime's candidate grids for every matrix, their sensitivities and bytes,
and the allocation under `recipe.budget`, returned as per-module rules.

The candidates are what the runtime can hold (its exporter's `check` and `weight_plan` decide, the same as for a
hand-written rule): 4-bit in each group size it takes among 32, 64 and 128, 8-bit, and float (fp16 where the
runtime stores it, else fp32). Sensitivities are cached per weights, candidates and calibration tokens.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict

from llmship.compress.budget import allocate, matrix_bytes
from llmship.compress.plan import EMBEDDING, matrix_shapes
from llmship.errors import ConfigError

CANDIDATES = {"int4/g32": {"weights": "int4", "group_size": 32}, "int4/g64": {"weights": "int4", "group_size": 64},
              "int4/g128": {"weights": "int4", "group_size": 128}, "int8": {"weights": "int8"},
              # int8 per output channel, for a runtime that refuses int8 in the recipe's 4-bit blocks (LiteRT)
              "int8/channel": {"weights": "int8", "group_size": None},
              "fp16": {"weights": "fp16"}, "fp32": {"weights": "fp32"}}
# a candidate offered only where the runtime refuses the one it stands in for
FALLBACK_FOR = {"int8/channel": "int8", "fp32": "fp16"}


def _copies(module, spec, shapes) -> dict[str, int]:
    """How many times the runtime stores each matrix: a tied embedding/head TIED_COPIES times where it must."""
    return {m: getattr(module, "TIED_COPIES", 1) if m == EMBEDDING and spec.tie_word_embeddings else 1 for m in shapes}


def _other_bytes(spec, shapes) -> int:
    """Norms and biases: everything that is not a matrix, stored fp32."""
    return 4 * (spec.num_params - sum(n * k for n, k in shapes.values()))


def _with_rules(target, rules: list[dict]):
    from llmship.config import Recipe

    recipe = Recipe.model_validate({**target.recipe.model_dump(exclude={"rules", "budget"}), "rules": rules})
    return target.model_copy(update={"recipe": recipe})


def candidate_grids(target, module, spec) -> dict[str, dict]:
    """{candidate: {matrix: Grid | None}} for every candidate this runtime can hold for all matrices."""
    out = {}
    for key, rule in CANDIDATES.items():
        if FALLBACK_FOR.get(key) in out:
            continue  # float: the runtime's cheaper storage; int8: the recipe's blocks where the runtime takes them
        candidate = _with_rules(target, [{"match": ".*", **rule}])
        try:
            module.check(candidate, spec)
        except ConfigError:
            continue
        out[key] = module.weight_plan(candidate, spec)[0]
    return out


def sensitivity_table(loaded, options: dict[str, dict], sequences) -> dict[str, dict[str, float]]:
    from llmship.compress import cache_dir, code_digest
    from llmship.compress.sensitivity import sensitivities

    h = hashlib.sha256(json.dumps({"code": code_digest(), "sequences": sequences,
                                   "options": {m: {k: asdict(g) if g else None for k, g in o.items()} for m, o in sorted(options.items())}},
                                  sort_keys=True).encode())
    for m in sorted(options):
        h.update(loaded.weights[f"{m}.weight"].float().contiguous().numpy().tobytes())
    path = cache_dir() / "sensitivity" / f"{h.hexdigest()}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    table = sensitivities(loaded, options, sequences)
    try:
        from llmship.outputs import write_atomically

        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(table)))
    except OSError:
        pass
    return table


def allocation(loaded, target, module, calibration, evaluation) -> tuple[object, dict]:
    """The target with one rule per matrix (the allocation under its budget, then its own rules), and a summary."""
    from llmship.compress.calibration import calibration_sequences

    spec, budget = loaded.spec, target.recipe.budget
    grids = candidate_grids(target, module, spec)
    shapes = matrix_shapes(spec)
    options = {m: {k: g[m] for k, g in grids.items()} for m in shapes}
    copies = _copies(module, spec, shapes)
    float_bytes = 2 if "fp16" in grids else 4
    sequences = calibration_sequences(loaded, calibration.model_copy(update={"tokens": budget.sensitivity_tokens}), evaluation)
    sens = sensitivity_table(loaded, options, sequences)
    costs = {m: {k: (matrix_bytes(g, shapes[m], float_bytes, copies[m]), sens[m][k]) for k, g in opts.items()}
             for m, opts in options.items()}
    total = budget.bytes if budget.bytes is not None else budget.bytes_per_param * spec.num_params
    other = _other_bytes(spec, shapes)
    try:
        choice = allocate(costs, int(total) - other - budget.overhead_bytes)
    except ConfigError:
        smallest = sum(min(b for b, _ in opts.values()) for opts in costs.values()) + other + budget.overhead_bytes
        raise ConfigError(f"{target.name}: recipe.budget {int(total):,} bytes is below the smallest artifact this runtime can "
                          f"store for this model, about {smallest:,} bytes (every matrix on its smallest grid)") from None
    rules = [{"match": f"^{re.escape(m)}$", **CANDIDATES[k]} for m, k in choice.items()]
    rules += [r.model_dump(exclude_unset=True) for r in target.recipe.rules]
    summary = {"budget_bytes": int(total), "overhead_bytes": budget.overhead_bytes, "matrix_bytes": sum(costs[m][k][0] for m, k in choice.items()), "other_bytes": other,
               "sensitivity": sum(costs[m][k][1] for m, k in choice.items()), "choice": choice,
               "counts": {k: sum(1 for v in choice.values() if v == k) for k in sorted(set(choice.values()))}}
    return _with_rules(target, rules), summary


def predicted_bytes(loaded, target, module) -> int:
    """Bytes the matrices (and fp32 norms) of `target`'s own recipe take, as the allocation counts them."""
    spec = loaded.spec
    shapes = matrix_shapes(spec)
    grids, _ = module.weight_plan(target, spec)
    float_bytes = 2 if target.recipe.compute == "fp16" or target.recipe.weights == "fp16" else 4
    copies = _copies(module, spec, shapes)
    return sum(matrix_bytes(grids.get(m), shapes[m], float_bytes, copies[m]) for m in shapes) + _other_bytes(spec, shapes)


def smallest_total(loaded, target, module) -> int:
    """The smallest artifact a budget can ask of this runtime for this model: every matrix on its smallest grid
    (bytes as the allocation counts them, with the budget's overhead)."""
    spec = loaded.spec
    grids = candidate_grids(target, module, spec)
    shapes = matrix_shapes(spec)
    float_bytes = 2 if "fp16" in grids else 4
    copies = _copies(module, spec, shapes)
    matrices = sum(min(matrix_bytes(g[m], shapes[m], float_bytes, copies[m]) for g in grids.values()) for m in shapes)
    overhead = target.recipe.budget.overhead_bytes if target.recipe.budget else 0
    return matrices + _other_bytes(spec, shapes) + overhead
