"""Gates: compare a report's numbers with the target's limits (and a baseline). Validation measures; this judges.

Each gate record is {name, value, limit, passed} and, where the value has a 95% interval, `interval` and
`marginal`: the verdict is on the point estimate, and a gate whose interval straddles its limit is flagged
marginal (a rerun may flip it). Top-1 is gated on the tie-robust figure (positions where the reference's two
best logits are further apart than the profile's `top1_tie_margin`); the raw figure stays in the report.

Regression against a baseline (`--baseline`): size and decode speed by percentage; KL only when the difference
is real and large: paired token by token when both evaluations scored the same tokens (the difference's
interval must lie above 0), unpaired otherwise (the intervals must not overlap), and in both cases the point
must have moved more than `regression_kl_pct`.
"""
from __future__ import annotations

from llmship.config import Gates

# gate name -> (where the value lives in the report, "max" if the value must stay <= limit else "min")
PARITY_GATES = {
    "max_abs_err": ("parity.max_abs_err", "max"),
    "cosine_min": ("parity.cosine_min", "min"),
    "top1_agreement_min": ("parity.top1_clear", "min"),
    "kl_mean_max": ("parity.kl_mean", "max"),
    "kl_p99_max": ("parity.kl_p99", "max"),
    "ppl_ratio_max": ("parity.ppl_ratio", "max"),
    "greedy_match_min": ("parity.greedy_fraction", "min"),
    "conversion_kl_mean_max": ("conversion.kl_mean", "max"),
    "conversion_kl_p99_max": ("conversion.kl_p99", "max"),
    "conversion_top1_agreement_min": ("conversion.top1_clear", "min"),
    "conversion_floor_ratio_max": ("conversion.floor_ratio", "max"),
    "bytes_per_param_max": ("artifact.bytes_per_param", "max"),
    "size_bytes_max": ("artifact.bytes", "max"),
    "decode_tok_s_min": ("latency.decode_tok_s", "min"),
    "ttft_ms_max": ("latency.ttft_ms", "max"),
}
# regression gate -> (report value, limit field, direction in which "worse" lies)
REGRESSION_GATES = {
    "regression.size": ("artifact.bytes", "regression_size_pct", "up"),
    "regression.decode_tok_s": ("latency.decode_tok_s", "regression_decode_pct", "down"),
}


def lookup(report: dict, dotted: str):
    node = report
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _interval(report: dict, where: str):
    section, _, metric = where.partition(".")
    found = lookup(report, f"{section}.intervals.{metric}")
    return found if isinstance(found, list) and len(found) == 2 else None


def _gate(name: str, value, limit, passed: bool, interval=None, kind: str | None = None) -> dict:
    out = {"name": name, "value": None if value is None else float(value), "limit": float(limit), "passed": bool(passed)}
    if interval is not None:
        out["interval"] = [float(interval[0]), float(interval[1])]
        out["marginal"] = bool(min(interval) <= limit <= max(interval))
    return out


def check_gates(report: dict, gates: Gates, baseline: dict | None = None, sections: tuple[str, ...] | None = None) -> list[dict]:
    """Every gate of `gates` on `report`; `sections` keeps only the gates on those parts of it (a separate adapter's
    result has parity, conversion and its file's integrity, not the artifact's size or speed)."""
    results = []
    for name, (where, kind) in PARITY_GATES.items():
        limit = getattr(gates, name)
        if limit is None or (sections is not None and where.partition(".")[0] not in sections):
            continue
        value = lookup(report, where)
        if value is None and where.endswith("top1_clear"):  # a report without the robust figure: the raw one
            value = lookup(report, where.replace("top1_clear", "top1_agreement"))
        if value is None:  # a metric the gate needs was not measured: that is a failure, not a pass
            results.append(_gate(name, None, limit, False))
            continue
        results.append(_gate(name, value, limit, value <= limit if kind == "max" else value >= limit, _interval(report, where)))
    budget = lookup(report, "compression.budget_bytes")
    if budget is not None and sections is None:  # a budgeted recipe promised a size
        size = report["artifact"]["bytes"]
        results.append(_gate("budget_bytes", size, budget, size <= budget))
    if report.get("integrity") is not None:  # files unlike the manifest, before the run or after it
        bad = len(report["integrity"]["mismatched"]) + len(report["integrity"]["changed_by_validation"])
        results.append(_gate("integrity", bad, 0, bad == 0))
    if baseline is not None:
        for name, (where, field, worse) in REGRESSION_GATES.items():
            new, old = lookup(report, where), lookup(baseline, where)
            if new is None or old is None:
                continue
            pct = getattr(gates, field)
            limit = old * (1 + pct / 100) if worse == "up" else old * (1 - pct / 100)
            results.append(_gate(name, new, limit, new <= limit if worse == "up" else new >= limit))
        results.append(kl_regression(report, baseline, gates.regression_kl_pct))
    return results


def kl_regression(report: dict, baseline: dict, pct: float) -> dict:
    """KL worse than the baseline's only when the difference is real (see the module docstring) and larger than pct."""
    from llmship.validation.statistics import paired_difference

    new, old = lookup(report, "parity.kl_mean"), lookup(baseline, "parity.kl_mean")
    # For KL the baseline can be ~0 (fp32): an absolute floor so noise at 1e-9 is no regression.
    limit = old * (1 + pct / 100) + 1e-6
    same_tokens = lookup(report, "evaluation.tokens_sha256") is not None and \
        lookup(report, "evaluation.tokens_sha256") == lookup(baseline, "evaluation.tokens_sha256")
    new_kl, old_kl = lookup(report, "series.kl_per_token"), lookup(baseline, "series.kl_per_token")
    if new is None:
        return _gate("regression.kl_mean", None, limit, False)
    if same_tokens and new_kl and old_kl and len(new_kl) == len(old_kl):
        diff, lo, hi = paired_difference(new_kl, old_kl)
        real = lo > 0
        out = _gate("regression.kl_mean", new, limit, not (real and new > limit))
        out.update(method="paired", difference=[diff, lo, hi])
        return out
    new_i, old_i = _interval(report, "parity.kl_mean"), _interval(baseline, "parity.kl_mean")
    real = new_i is None or old_i is None or new_i[0] > old_i[1]  # no intervals: the point estimate decides
    out = _gate("regression.kl_mean", new, limit, not (real and new > limit), new_i)
    out["method"] = "intervals" if new_i and old_i else "point"
    return out


def failure_message(target: str, results: list[dict]) -> str:
    failed = [r for r in results if not r["passed"]]
    parts = [f"{r['name']} = {_value(r['value'])} (limit {r['limit']:.6g})" for r in failed]
    return f"{target}: {len(failed)} gate(s) failed: " + "; ".join(parts)


def _value(v) -> str:
    return "not measured" if v is None else f"{v:.6g}"
