"""Command line. Every command imports its machinery lazily so `--help` and `targets` stay fast."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmship.errors import ConfigError, LlmshipError, Terminated, request_termination, termination_requested


class Parser(argparse.ArgumentParser):
    """Usage errors as the contract's one line and exit code 2 (argparse would print the usage block too)."""

    def error(self, message: str):
        self.exit(2, f"llmship: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="llmship", description="Export a causal LM to on-device runtimes, validate every artifact on its runtime, and gate.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    b = sub.add_parser("build", help="export and validate the targets of a config")
    b.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    b.add_argument("--target", action="append", default=[], help="restrict to these targets (repeatable)")
    b.add_argument("--out", help="output directory (overrides the config's `out`)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. evaluation.tokens=64")
    b.add_argument("--baseline", help="directory of a previous build to check for regressions")
    b.add_argument("--adapter", action="append", default=[], metavar="DIR", help=ADAPTER_HELP)
    b.add_argument("--platform", choices=["android", "ios"], help="build the platform's target set into its app layout")
    b.add_argument("--smallest", action="store_true", help="search each target for the smallest artifact that passes its gates "
                                                           "(lowers a size budget in steps; config: search.mode smallest)")

    e = sub.add_parser("export", help="export one target")
    e.add_argument("--model", required=True, help="HF checkpoint dir, .gguf file, builtin:smollm2-135m or builtin:tiny")
    e.add_argument("--target", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--config", help="YAML config whose overrides apply")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--adapter", action="append", default=[], metavar="DIR", help=ADAPTER_HELP)

    v = sub.add_parser("validate", help="run an artifact on its runtime, compare with the FP32 reference, gate")
    v.add_argument("artifact")
    v.add_argument("--model", help="source of the reference (default: the one in the manifest)")
    v.add_argument("--eval-text", help="evaluation text file (default: text sampled from the reference)")
    v.add_argument("--baseline", help="a previous artifact directory or report.json to check for regressions")
    v.add_argument("--config", help="YAML config whose evaluation settings and gate overrides apply")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("targets", help="list built-in target profiles")
    i = sub.add_parser("inspect", help="summarize an artifact's manifest")
    i.add_argument("artifact")
    r = sub.add_parser("report", help="render Markdown, HTML and JUnit XML from report.json files; "
                                      "`report merge DIR...` also prints one verdict and exits 1 if any target failed")
    r.add_argument("paths", nargs="+", help="[merge] artifact directories, report.json files, or build directories")
    r.add_argument("--out", default=None, help="where to write report.md/report.html/junit.xml (default: first path)")
    lm = sub.add_parser("litertlm", help="bundle a LiteRT (tflite) artifact as a LiteRT-LM .litertlm (the validated "
                                         "model.tflite, tokenizer and start/stop tokens)")
    lm.add_argument("artifact")
    lm.add_argument("--out", default=None, help="bundle file (default: ARTIFACT.litertlm beside the directory)")
    bn = sub.add_parser("bench", help="benchmark llmship's artifacts against the runtimes' first-party LLM exporters")
    bn.add_argument("--model", default="builtin:smollm2-135m")
    bn.add_argument("--quick", action="store_true", help="stories260K from ../shared (CI mode)")
    bn.add_argument("--out", default="bench")
    bn.add_argument("--anchor", action="append", default=None, help="only these anchors (repeatable)")
    bn.add_argument("--target", action="append", default=None, help="only these llmship targets (repeatable)")
    m = sub.add_parser("matrix", help="print a CI job matrix (JSON, one job per target) for a config")
    m.add_argument("config", nargs="?")
    m.add_argument("--platform", choices=["android", "ios"])
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return p


ADAPTER_HELP = ("a PEFT LoRA adapter directory (adapters.list.<dir name>=DIR): merged into the weights, or shipped as its "
                "own file beside the base with --set adapters.mode=separate")


def adapter_sets(dirs: list[str]) -> list[str]:
    """`--adapter DIR` as the config field it stands for: adapters.list.<the directory's name>=DIR."""
    from pathlib import Path

    return [f"adapters.list.{Path(d).name or 'adapter'}={d}" for d in dirs]


def cmd_targets(args) -> int:
    from llmship.formats import get_format
    from llmship.targets import all_profiles

    for t in all_profiles().values():
        r = t.recipe
        recipe = f"weights {r.weights}" + (f"/g{r.group_size}" if r.group_size else "") + f", act {r.activations}, embed {r.embedding}"
        gates = ", ".join(f"{k}={v}" for k, v in t.gates.model_dump(exclude_none=True).items() if not k.startswith("regression"))
        print(f"{t.name:<20} {t.format:<10} {t.runtime:<11} {recipe}; kv {t.kv_cache_dtype}; ctx {t.max_context}; "
              f"prefill {list(t.prefill_lengths)}; {t.threads} threads{' [default]' if t.default else ''}")
        if t.description:
            print(f"{'':<20} {t.description}")
        print(f"{'':<20} gates: {gates or 'none'}")
        print(f"{'':<20} adapters: {', '.join(get_format(t.format).adapter_modes)}")
    return 0


def cmd_inspect(args) -> int:
    from llmship.manifest import read_manifest

    m = read_manifest(args.artifact)  # checks every field printed below
    total = sum(f["bytes"] for f in m["files"].values())
    print(f"target      {m['target']}  ({m['format']} on {m['runtime']}, {m.get('threads')} threads)")
    print(f"source      {m['source']}  ({m['model']['architecture']}, {m['model']['params']:,} params)")
    adapters = m.get("adapters") if isinstance(m.get("adapters"), dict) else {}
    for a in adapters.get("list") or []:
        file = a.get("file")
        runs = next((f"; {kind} {', '.join(a[kind].values())}" for kind in ("functions", "signatures", "methods")
                     if isinstance(a.get(kind), dict)), "")  # the entry points that run it (Core ML, LiteRT, ExecuTorch)
        print(f"adapter     {a.get('name')} ({adapters.get('mode')}): {a.get('path')}, {a.get('modules')} modules, "
              f"rank {a.get('ranks')}, sha256 {str(a.get('sha256'))[:16]}"
              + (f"; ships in {file} ({a.get('bytes', m['files'].get(file, {}).get('bytes', 0)):,} bytes, {adapters.get('dtype')}"
                 + runs + ")" if file else ""))
    if adapters.get("select"):
        print(f"            select one: {adapters['select']}")
    structure = m.get("structure") if isinstance(m.get("structure"), dict) else {}
    if structure:
        heal = structure.get("heal") or {}
        print(f"structure   pruned: layers {structure.get('layers')} kept, FFN {structure.get('ffn_width_before')} -> "
              f"{structure.get('ffn_width')}, {structure.get('params_before', 0):,} -> {structure.get('params', 0):,} params; "
              + (f"healed {len(heal.get('loss', []))} steps (loss {heal['loss'][0]:.4f} -> {heal['loss'][-1]:.4f})"
                 if heal.get("loss") else "not healed") + f", student {str(structure.get('digest'))[:16]}")
    print(f"recipe      {m['recipe']}")
    print(f"context     max_context {m['max_context']}, prefill lengths {m['prefill_lengths']}")
    kv = m["kv_cache"]
    print(f"kv cache    held as {kv['held_as']}, {kv['dtype']}, {kv['num_layers']} layers x K,V {kv['shape']}")
    lengths = kv.get("length_per_layer") or []
    if any(n < m["max_context"] for n in lengths):
        rings = sorted({n for n in lengths if n < m["max_context"]})
        print(f"            ring buffers: {sum(n < m['max_context'] for n in lengths)} sliding-window layers of {rings} rows, "
              f"{kv.get('bytes', 0):,} bytes in all; at most {kv.get('max_tokens_per_call')} tokens per call")
    print(f"tokens      vocab {m['model']['vocab_size']}, bos {m['model']['bos_token_id']}, eos {m['model']['eos_token_ids']}")
    for name, ep in m["entry_points"].items():
        ins = ", ".join(f"{t['name']}{t['shape']}" for t in ep["inputs"][:3])
        print(f"entry       {name}: {ep['file']} ({ins}{', ...' if len(ep['inputs']) > 3 else ''})")
    compression = m.get("compression") or {}
    if compression:
        print(f"compression {compression.get('algorithm')}, {len(compression.get('grids', {}))} quantized matrices, "
              f"record {str(compression.get('digest'))[:16]}")
    allocation = compression.get("allocation")
    if isinstance(allocation, dict) and isinstance(allocation.get("choice"), dict):
        print(f"budget      {allocation.get('budget_bytes'):,} B: " + ", ".join(f"{k} x{v}" for k, v in allocation.get("counts", {}).items()))
        for module, choice in allocation["choice"].items():
            print(f"  rule      {module}: {choice}")
    for name, f in m["files"].items():
        print(f"file        {name}  {f['bytes']:,} B  sha256 {f['sha256'][:16]}")
    print(f"total       {total:,} B ({total / m['model']['params']:.3f} B/param)")
    return 0


def cmd_export(args) -> int:
    from llmship.config import load_config
    from llmship.adapters import load_source
    from llmship.outputs import check_output_dir
    from llmship.pipeline import export_artifact
    from llmship.targets import resolve_target

    config = load_config(args.config, list(args.set) + adapter_sets(args.adapter))
    target = resolve_target(config, args.target)
    check_output_dir(args.out)  # before minutes of work, not after
    loaded = load_source(args.model, config.adapters)
    out = export_artifact(loaded, target, args.out, debug=args.debug, config=config)
    print(f"wrote {out}")
    return 0


def cmd_validate(args) -> int:
    from llmship.config import load_config
    from llmship.validation.stage import validate_artifact

    config = load_config(args.config, args.set)
    report = validate_artifact(Path(args.artifact), config, model=args.model, eval_text=args.eval_text, baseline=args.baseline)
    return 0 if report["passed"] else 1


def cmd_litertlm(args) -> int:
    from llmship.packaging.litertlm import bundle

    print(f"wrote {bundle(args.artifact, args.out)}")
    return 0


def cmd_build(args) -> int:
    from llmship.build import build
    from llmship.config import load_config

    sets = list(args.set) + adapter_sets(args.adapter) + ([f"out={args.out}"] if args.out else []) + (["search.mode=smallest"] if args.smallest else [])
    config = load_config(args.config, sets)
    return build(config, only=args.target, baseline=args.baseline, debug=args.debug, platform=args.platform)


def cmd_report(args) -> int:
    from llmship.validation.report import merge_reports, render_reports

    if args.paths[0] == "merge":
        if len(args.paths) < 2:
            raise ConfigError("report merge needs at least one directory of job reports")
        return merge_reports([Path(p) for p in args.paths[1:]], Path(args.out) if args.out else None)
    render_reports([Path(p) for p in args.paths], Path(args.out) if args.out else None)
    return 0


def cmd_bench(args) -> int:
    from llmship.bench import BENCH_TARGETS, run_bench

    source = args.model
    if args.quick and source == "builtin:smollm2-135m":
        shared = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"
        if not shared.is_dir():
            raise ConfigError(f"--quick benchmarks ../shared/models/stories260K, which is absent ({shared}); pass --model")
        source = str(shared)
    run_bench(source, Path(args.out), quick=args.quick, anchors=args.anchor, targets=tuple(args.target or BENCH_TARGETS))
    print(f"wrote {Path(args.out) / 'results.json'}, results.md, plot.svg")
    return 0


def cmd_matrix(args) -> int:
    import json

    from llmship.build import select_targets
    from llmship.config import load_config
    from llmship.targets import resolve_target

    config = load_config(args.config, args.set)
    names = select_targets(config, None, args.platform)
    jobs = [{"target": n, "format": resolve_target(config, n).format} for n in names]
    print(json.dumps({"include": jobs}))
    return 0


COMMANDS = {"targets": cmd_targets, "inspect": cmd_inspect, "export": cmd_export, "validate": cmd_validate,
            "build": cmd_build, "report": cmd_report, "matrix": cmd_matrix, "bench": cmd_bench,
            "litertlm": cmd_litertlm}


def main(argv: list[str] | None = None) -> int:
    import signal

    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, request_termination)
    try:
        code = COMMANDS[args.command](args)
        if termination_requested():  # the signal's exception was swallowed somewhere: still a terminated run
            raise Terminated
        return code
    except LlmshipError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"llmship: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("llmship: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("llmship: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # `llmship targets | head`: the reader left; nothing to report
        sys.stdout = None
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
