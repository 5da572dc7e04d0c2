#!/usr/bin/env python3
"""Compare compression algorithms at equal bytes: export each target with each algorithm, validate each on
each evaluation text, print one Markdown table (and write it as JSON).

    python scripts/compare_algorithms.py --model builtin:smollm2-135m --target executorch-8da4w --target onnx-int4 \\
        --algorithm rtn --algorithm gptq --text ../shared/data/tinyshakespeare.txt --out /tmp/cmp
    (--structure 'compression.prune.ffn=0.25 compression.heal.steps=200' --mixed: prune + heal + quantize beside them)

Each artifact is exported once per (target, algorithm) and validated through the CLI, so every number is what
`llmship validate` reports for the shipped file: parity against the FP32 reference, and conversion against the
compressed reference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmship", *cmd], capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def uniform_bytes(model: str, target_name: str) -> int:
    from llmship.compress.mixed import predicted_bytes
    from llmship.formats import exporter
    from llmship.models import load_model
    from llmship.targets import get_profile

    target = get_profile(target_name)
    return predicted_bytes(load_model(model), target, exporter(target.format))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--target", action="append", required=True)
    p.add_argument("--algorithm", action="append", default=None)
    p.add_argument("--text", action="append", default=[])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--out", required=True)
    p.add_argument("--mixed", action="store_true", help="also the budgeted mix at the bytes of the target's uniform recipe "
                                                          "(as the allocation counts them); algorithm: the first --algorithm")
    p.add_argument("--only-mixed", action="store_true", help="with --mixed: skip the uniform exports (measured before)")
    p.add_argument("--structure", default=None, help="config fields of a structural compression, space-separated, e.g. "
                   "'compression.prune.ffn=0.25 compression.heal.steps=200': adds the first algorithm's recipe on the pruned "
                   "model and, with --mixed, its budgeted mix at the unpruned uniform recipe's bytes (prune + heal + quantize)")
    args = p.parse_args()
    out = Path(args.out)
    rows = []
    algorithms = args.algorithm or ["rtn", "gptq"]
    for target in args.target:
        variants = [] if args.only_mixed else [(a, [f"overrides.{target}.recipe.algorithm={a}"]) for a in algorithms]
        if args.mixed:
            variants.append((f"mixed-{algorithms[0]}", [f"overrides.{target}.recipe.algorithm={algorithms[0]}",
                                                        f"overrides.{target}.recipe.budget={{bytes: {uniform_bytes(args.model, target)}}}"]))
        if args.structure:
            pruned = [f"overrides.{target}.recipe.algorithm={algorithms[0]}", *args.structure.split()]
            variants.append((f"pruned-{algorithms[0]}", pruned))
            if args.mixed:
                variants.append((f"pruned-mixed-{algorithms[0]}",
                                 [*pruned, f"overrides.{target}.recipe.budget={{bytes: {uniform_bytes(args.model, target)}}}"]))
        for algorithm, sets in variants:
            art = out / f"{target}-{algorithm}"
            export_s = run(["export", "--model", args.model, "--target", target, "--out", str(art),
                            *[a for s in sets for a in ("--set", s)]])
            for text in args.text or [None]:
                extra = ["--eval-text", text] if text else []
                validate_s = run(["validate", str(art), "--set", f"evaluation.tokens={args.tokens}",
                                  "--set", "evaluation.latency_runs=4", *extra])
                r = json.loads((art / "report.json").read_text())
                pa, co = r["parity"], r["conversion"]
                counts = (r.get("compression") or {}).get("allocation_counts")
                rows.append({"target": target, "algorithm": algorithm, "text": Path(text).name if text else "sampled", "mix": counts,
                             "bytes": r["artifact"]["bytes"], "kl_mean": pa["kl_mean"], "top1": pa["top1_agreement"],
                             "ppl_ratio": pa["ppl_ratio"], "greedy": f"{pa['greedy_match']}/{pa['greedy_total']}",
                             "conversion_kl": co["kl_mean"], "conversion_top1": co["top1_agreement"],
                             "noise_floor_kl": co.get("noise_floor_kl_mean"), "floor_ratio": co.get("floor_ratio"),
                             "export_s": round(export_s, 1), "validate_s": round(validate_s, 1)})
                print(json.dumps(rows[-1]), flush=True)
    (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    cols = ["target", "algorithm", "text", "bytes", "kl_mean", "top1", "ppl_ratio", "greedy", "conversion_kl", "conversion_top1", "floor_ratio"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
