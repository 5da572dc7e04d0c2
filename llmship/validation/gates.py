"""Gates: compare a report's numbers with the target's limits (and a baseline). Validation measures; this judges."""
from __future__ import annotations

from llmship.config import Gates

# gate name -> (where the value lives in the report, "max" if the value must stay <= limit else "min")
PARITY_GATES = {
    "max_abs_err": ("parity.max_abs_err", "max"),
    "cosine_min": ("parity.cosine_min", "min"),
    "top1_agreement_min": ("parity.top1_agreement", "min"),
    "kl_mean_max": ("parity.kl_mean", "max"),
    "kl_p99_max": ("parity.kl_p99", "max"),
    "ppl_ratio_max": ("parity.ppl_ratio", "max"),
    "greedy_match_min": ("parity.greedy_fraction", "min"),
    "conversion_kl_mean_max": ("conversion.kl_mean", "max"),
    "conversion_kl_p99_max": ("conversion.kl_p99", "max"),
    "conversion_top1_agreement_min": ("conversion.top1_agreement", "min"),
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
    "regression.kl_mean": ("parity.kl_mean", "regression_kl_pct", "up"),
}


def lookup(report: dict, dotted: str):
    node = report
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _gate(name: str, value, limit, passed: bool) -> dict:
    return {"name": name, "value": None if value is None else float(value), "limit": float(limit), "passed": bool(passed)}


def check_gates(report: dict, gates: Gates, baseline: dict | None = None) -> list[dict]:
    results = []
    for name, (where, kind) in PARITY_GATES.items():
        limit = getattr(gates, name)
        if limit is None:
            continue
        value = lookup(report, where)
        if value is None:  # a metric the gate needs was not measured: that is a failure, not a pass
            results.append(_gate(name, None, limit, False))
            continue
        results.append(_gate(name, value, limit, value <= limit if kind == "max" else value >= limit))
    if report.get("integrity") is not None:  # files unlike the manifest, before the run or after it
        bad = len(report["integrity"]["mismatched"]) + len(report["integrity"]["changed_by_validation"])
        results.append(_gate("integrity", bad, 0, bad == 0))
    if baseline is not None:
        for name, (where, field, worse) in REGRESSION_GATES.items():
            new, old = lookup(report, where), lookup(baseline, where)
            if new is None or old is None:
                continue
            pct = getattr(gates, field)
            # For KL the baseline can be ~0 (fp32): allow an absolute floor so noise at 1e-9 is no regression.
            floor = 1e-6 if name == "regression.kl_mean" else 0.0
            limit = old * (1 + pct / 100) + floor if worse == "up" else old * (1 - pct / 100)
            results.append(_gate(name, new, limit, new <= limit if worse == "up" else new >= limit))
    return results


def failure_message(target: str, results: list[dict]) -> str:
    failed = [r for r in results if not r["passed"]]
    parts = [f"{r['name']} = {_value(r['value'])} (limit {r['limit']:.6g})" for r in failed]
    return f"{target}: {len(failed)} gate(s) failed: " + "; ".join(parts)


def _value(v) -> str:
    return "not measured" if v is None else f"{v:.6g}"
