"""bench/results.json, a Markdown table of ratios (ours ÷ anchor, same runtime and recipe) and an SVG plot."""
from __future__ import annotations

import html
import json
from pathlib import Path

# (our target, anchor tool, anchor recipe): the like-for-like pairs the ratio table compares.
PAIRS = (
    ("executorch-8da4w", "executorch-llm-export", "8da4w"),
    ("executorch-fp32", "executorch-llm-export", "fp32"),
    ("litert-fp32", "litert-torch-generative", "fp32"),
    ("litert-int8", "litert-torch-generative", "dynamic-int8"),
    ("onnx-fp32", "onnxruntime-genai-builder", "fp32"),
    ("onnx-int4", "onnxruntime-genai-builder", "int4"),
    ("pytorch-fp32", "transformers-eager", "fp32 generate"),
)


def _f(v, fmt="{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def _ratio(a, b) -> str:
    return "-" if not a or not b else f"{a / b:.2f}×"


def markdown(results: dict) -> str:
    m = results["machine"]
    rows = results["rows"]
    lines = [f"# llmship bench: {results['model']} ({results['params']:,} params){' — quick mode' if results['quick'] else ''}", "",
             f"Machine: {m['cores']} cores, memory bandwidth {m['read_gb_s']:.1f} GB/s read, {m['copy_gb_s']:.1f} GB/s copy "
             "(measured in this run). Decode at 2 threads.", "", *([results["note"], ""] if results.get("note") else []),
             "## Ours ÷ first-party anchor, same runtime and recipe", "",
             "| runtime | ours | anchor | decode tok/s (ours / anchor) | ratio | size MB (ours / anchor) | ratio | KL ours / anchor | top-1 ours / anchor |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["tool"], r["recipe"]): r for r in rows}
    for ours_name, tool, recipe in PAIRS:
        ours, anchor = by.get(("llmship", ours_name)), by.get((tool, recipe))
        if ours is None and anchor is None:
            continue
        ours, anchor = ours or {}, anchor or {}
        lines.append(
            f"| {ours.get('runtime') or anchor.get('runtime')} | {ours_name} | {tool} {recipe} | "
            f"{_f(ours.get('decode_tok_s'), '{:.1f}')} / {_f(anchor.get('decode_tok_s'), '{:.1f}')} | {_ratio(ours.get('decode_tok_s'), anchor.get('decode_tok_s'))} | "
            f"{_f(ours.get('bytes') and ours['bytes'] / 1e6, '{:.1f}')} / {_f(anchor.get('bytes') and anchor['bytes'] / 1e6, '{:.1f}')} | "
            f"{_ratio(ours.get('bytes'), anchor.get('bytes'))} | {_f(ours.get('kl_mean'))} / {_f(anchor.get('kl_mean'))} | "
            f"{_f(ours.get('top1_agreement'), '{:.3f}')} / {_f(anchor.get('top1_agreement'), '{:.3f}')} |")
    lines += ["", "## Every row", "",
              "| runtime | tool | recipe | MB | B/param | export s | export RSS MB | load s | TTFT ms | prefill tok/s | decode tok/s | roofline | KL | top-1 | error |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['runtime']} | {r['tool']} | {r['recipe']} | {_f(r['bytes'] and r['bytes'] / 1e6, '{:.1f}')} | "
                     f"{_f(r['bytes_per_param'], '{:.3f}')} | {_f(r['export_s'], '{:.1f}')} | {_f(r['export_peak_rss_mb'], '{:.0f}')} | "
                     f"{_f(r['load_s'], '{:.2f}')} | {_f(r['ttft_ms'], '{:.1f}')} | {_f(r['prefill_tok_s'], '{:.1f}')} | "
                     f"{_f(r['decode_tok_s'], '{:.1f}')} | {_f(r['roofline_fraction'], '{:.2f}')} | {_f(r['kl_mean'])} | "
                     f"{_f(r['top1_agreement'], '{:.3f}')} | {(r['error'] or '').replace('|', '/')} |")
    if results.get("compression"):
        lines += ["", "## The compression stage's cost (child process, cold cache)", "",
                  "| step | target | wall s | peak RSS MB | detail |", "|---|---|---|---|---|"]
        for c in results["compression"]:
            detail = c.get("error") or ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("step", "target", "model", "wall_s", "peak_rss_mb", "error", "seconds"))
            lines.append(f"| {c['step']} | {c['target']} | {_f(c.get('wall_s'), '{:.1f}')} | {_f(c.get('peak_rss_mb'), '{:.0f}')} | {detail} |")
    if results.get("pruning"):
        lines += ["", "## Pruning and healing (FFN channels removed; KL / ppl ratio against the FP32 original on real text)", "",
                  "| model | FFN pruned | heal steps | params | KL / top-1 / ppl ratio per text | heal s (s/step) | wall s | peak RSS MB | error |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results["pruning"]:
            texts = "; ".join(f"{name.removesuffix('.txt')} {_f(m['kl_mean'], '{:.3f}')} / {_f(m['top1_agreement'], '{:.3f}')} / "
                              f"{_f(m['ppl_ratio'], '{:.3f}')}" for name, m in (r.get("texts") or {}).items())
            lines.append(f"| {r['model']} | {_f(r.get('ffn'), '{:.2f}')} | {_f(r.get('steps'), '{}')} | "
                         f"{_f(r.get('params_before'), '{:,}')} -> {_f(r.get('params'), '{:,}')} | {texts} | "
                         f"{_f(r.get('heal_s'), '{:.1f}')} ({_f(r.get('seconds_per_step'), '{:.2f}')}) | {_f(r.get('wall_s'), '{:.1f}')} | "
                         f"{_f(r.get('peak_rss_mb'), '{:.0f}')} | {(r.get('error') or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def plot(results: dict) -> str:
    """Decode tokens/s against artifact size, one point per row, with the bandwidth ceiling as a curve."""
    rows = [r for r in results["rows"] if r.get("decode_tok_s") and r.get("bytes")]
    w, h, m = 640, 400, 60
    if not rows:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="60"><text x="10" y="30">no measured rows</text></svg>'
    xmax = max(r["bytes"] for r in rows) / 1e6 * 1.1
    ymax = max(r["decode_tok_s"] for r in rows) * 1.2
    bw = results["machine"]["read_gb_s"] * 1e3  # MB/s

    def px(x):
        return m + x / xmax * (w - m - 20)

    def py(y):
        return h - m - min(y, ymax) / ymax * (h - m - 30)

    body = [f'<line x1="{m}" y1="{h - m}" x2="{w - 10}" y2="{h - m}" stroke="#333"/><line x1="{m}" y1="20" x2="{m}" y2="{h - m}" stroke="#333"/>',
            f'<text x="{(w + m) / 2}" y="{h - 15}" text-anchor="middle" font-size="12">artifact size (MB)</text>',
            f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle" font-size="12">decode tokens/s (2 threads)</text>']
    curve = " ".join(f"{px(x):.1f},{py(bw / x):.1f}" for x in [xmax * i / 200 for i in range(2, 201)])
    body.append(f'<polyline points="{curve}" fill="none" stroke="#999" stroke-dasharray="4 3"/>'
                f'<text x="{w - 20}" y="{py(bw / xmax) - 6:.1f}" text-anchor="end" font-size="10" fill="#666">bandwidth ceiling</text>')
    for r in rows:
        color = "#d62728" if r["tool"] == "llmship" else "#1f77b4"
        label = html.escape(f"{r['tool'] if r['tool'] != 'llmship' else ''} {r['recipe']}".strip())
        body.append(f'<circle cx="{px(r["bytes"] / 1e6):.1f}" cy="{py(r["decode_tok_s"]):.1f}" r="5" fill="{color}"/>'
                    f'<text x="{px(r["bytes"] / 1e6) + 7:.1f}" y="{py(r["decode_tok_s"]) - 5:.1f}" font-size="9">{label}</text>')
    body.append(f'<text x="{m + 10}" y="16" font-size="12" font-weight="bold">{html.escape(results["model"])}: red = llmship, blue = first-party anchors ({xmax:.0f} MB, {ymax:.0f} tok/s axes)</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">' + "".join(body) + "</svg>\n"


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    (out / "plot.svg").write_text(plot(results))
