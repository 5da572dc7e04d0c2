"""Render report.json files as a Markdown summary, a self-contained HTML page (inline SVG plots) and JUnit XML."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from xml.etree import ElementTree as ET

from llmship.errors import ConfigError

SCHEMA = Path(__file__).with_name("report.schema.json")
COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]


def validate_schema(report: dict) -> None:
    import jsonschema

    jsonschema.validate(report, json.loads(SCHEMA.read_text()))


def collect(paths: list[Path]) -> list[dict]:
    """report.json files from: report files, artifact directories, or build directories holding artifacts."""
    found: list[Path] = []
    for p in paths:
        if p.is_file():
            found.append(p)
        elif (p / "report.json").is_file():
            found.append(p / "report.json")
        elif p.is_dir():
            found.extend(sorted(p.rglob("report.json")))
        else:
            raise ConfigError(f"no such report or directory: {p}")
    if not found:
        raise ConfigError(f"no report.json found under {', '.join(map(str, paths))}")
    reports = []
    for f in found:
        try:
            report = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"{f} is not valid JSON: {exc}") from None
        reports.append(checked(report, f))
    return reports


def checked(report, where) -> dict:
    """A report that holds what rendering reads (the schema), or a ConfigError naming the first bad field."""
    import jsonschema

    try:
        validate_schema(report)
    except jsonschema.ValidationError as exc:
        field = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ConfigError(f"{where} is not an llmship report: field {field}: {exc.message[:200]}") from None
    return report


RENDERED = ("report.md", "report.html", "junit.xml")


def render_reports(paths: list[Path], out: Path | None = None) -> Path:
    from llmship.manifest import write_text_atomic
    from llmship.outputs import OutputError

    reports = collect(paths)
    out = out or (paths[0] if paths[0].is_dir() else paths[0].parent)
    pages = {"report.md": markdown(reports), "report.html": html_page(reports), "junit.xml": junit(reports)}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in pages.items():
            write_text_atomic(out / name, text)
    except OSError as exc:
        raise OutputError(f"cannot write reports into {out}: {exc.strerror or exc}") from None
    return out


def merge_reports(paths: list[Path], out: Path | None = None) -> int:
    """Combine the per-job reports of a split CI run into one page and one verdict (exit code 1 if any failed)."""
    reports = collect(paths)
    out = render_reports(paths, out)
    jobs = [{"target": r["target"], "source": r["source"], "passed": r["passed"],
             "failed_gates": [g["name"] for g in r["gates"] if not g["passed"]]} for r in reports]
    verdict = {"passed": all(j["passed"] for j in jobs), "jobs": jobs}
    from llmship.manifest import write_text_atomic

    write_text_atomic(out / "verdict.json", json.dumps(verdict, indent=2) + "\n")
    print(f"{'PASS' if verdict['passed'] else 'FAIL'}: {sum(j['passed'] for j in jobs)}/{len(jobs)} targets passed"
          + "".join(f"; {j['target']}: {', '.join(j['failed_gates'])}" for j in jobs if not j["passed"]))
    return 0 if verdict["passed"] else 1


def _fmt(v, digits=4) -> str:
    """A number for a table cell; anything that is not a number (a tampered report) comes back as its text,
    which every renderer escapes."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, float) and (abs(v) >= 1e4 or (0 < abs(v) < 1e-3)):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _ratio(a, b) -> str:
    return "-" if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b else f"{a / b:.4f}"


def _rows(reports: list[dict]) -> list[list[str]]:
    rows = []
    for r in reports:
        p, lat, a = r["parity"], r["latency"], r["artifact"]
        c = r.get("conversion") or {}  # reports written before the conversion check have none
        failed = [str(g["name"]) for g in r["gates"] if not g["passed"]]
        rows.append([str(r["target"]), "PASS" if r["passed"] else "FAIL: " + ", ".join(failed), f"{a['bytes'] / 1e6:.2f}",
                     f"{a['bytes_per_param']:.3f}", f"{p['top1_agreement']:.4f}", _fmt(p["kl_mean"]), _fmt(p["kl_p99"]),
                     _fmt(c.get("kl_mean")), _fmt(c.get("top1_agreement")),
                     _ratio(p["ppl"], p["ppl_reference"]), f"{p['greedy_match']}/{p['greedy_total']}", _fmt(p["max_abs_err"]),
                     f"{lat['decode_tok_s']:.1f}", f"{lat['ttft_ms']:.1f}", f"{r['memory']['peak_rss_mb']:.0f}", str(r["executor"])])
        rows += _adapter_rows(r)
    return rows


def _adapter_rows(r: dict) -> list[list[str]]:
    """One row per separate adapter, run with its file active (its size is its file's; speed is the base's row)."""
    rows = []
    for name, a in sorted((r.get("by_adapter") or {}).items()):
        p, c = a["parity"], a.get("conversion") or {}
        failed = [str(g["name"]) for g in a.get("gates", []) if not g["passed"]]
        rows.append([f"{r['target']} + {name}", "PASS" if a.get("passed") else "FAIL: " + ", ".join(failed),
                     f"{a['bytes'] / 1e6:.3f}", "-", f"{p['top1_agreement']:.4f}", _fmt(p["kl_mean"]), _fmt(p["kl_p99"]),
                     _fmt(c.get("kl_mean")), _fmt(c.get("top1_agreement")), _ratio(p["ppl"], p["ppl_reference"]),
                     f"{p['greedy_match']}/{p['greedy_total']}", _fmt(p["max_abs_err"]), "-", "-", "-", f"adapter file {a['file']}"])
    return rows


HEADER = ["target", "verdict", "MB", "B/param", "top-1", "KL mean", "KL p99", "conversion KL", "conversion top-1",
          "ppl ratio", "greedy", "max |err|",
          "decode tok/s", "TTFT ms", "RSS MB", "executor"]


def source_line(report: dict) -> str:
    """The source, with the adapter merged into it when there is one (the FP32 reference is that merged model)."""
    info = report.get("adapters")
    if not isinstance(info, dict) or not isinstance(info.get("list"), list):
        return str(report["source"])
    names = ", ".join(f"{a.get('name')} (sha256 {str(a.get('sha256'))[:12]})" for a in info["list"] if isinstance(a, dict))
    if info.get("mode") == "separate":
        return (f"{report['source']}, with separate adapters {names}: each row `target + name` "
                "runs that adapter's file against the source with it merged")
    return f"{report['source']} + adapter {names}, {info.get('mode')}d"


def markdown(reports: list[dict]) -> str:
    verdict = "PASS" if all(r["passed"] for r in reports) else "FAIL"
    lines = [f"# llmship validation: {verdict}", "", f"Source: {source_line(reports[0])}", "",
             "Parity (top-1, KL, perplexity, greedy) compares each artifact with the FP32 reference: what the user gets. "
             "Conversion compares it with the compressed reference (the recipe's own weights and activation quantization "
             "in PyTorch): what the converter added.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(reports)]
    notes = [f"- **{r['target']}**: {r['executor_note']}" for r in reports if r.get("executor_note")]
    if notes:
        lines += ["", "## Notes", *notes]
    for r in reports:
        failed = [g for g in r["gates"] if not g["passed"]]
        if failed:
            lines += ["", f"## {r['target']}: failed gates", *[f"- {g['name']}: {_fmt(g['value'])} (limit {_fmt(g['limit'])})" for g in failed]]
        marginal = [g for g in r["gates"] if g.get("marginal")]
        if marginal:
            lines += ["", f"## {r['target']}: marginal gates (the 95% interval straddles the limit; a rerun may flip them)",
                      *[f"- {g['name']}: {_fmt(g['value'])} [{_fmt(g['interval'][0])}, {_fmt(g['interval'][1])}] (limit {_fmt(g['limit'])})"
                        for g in marginal if _pair(g.get("interval"))]]
        structure = r.get("structure")
        if isinstance(structure, dict):
            heal = structure.get("heal") or {}
            loss = heal.get("loss") or []
            lines += ["", f"## {r['target']}: pruned model (student {str(structure.get('digest'))[:12]})",
                      f"- kept layers {structure.get('layers')}, FFN {structure.get('ffn_width_before')} -> {structure.get('ffn_width')} "
                      f"channels, {_fmt(structure.get('params_before'))} -> {_fmt(structure.get('params'))} parameters",
                      f"- healing: {len(loss)} distillation steps in {_fmt(heal.get('seconds'))} s, loss "
                      + (" -> ".join(_fmt(v) for v in loss[:: max(1, len(loss) // 8)] + loss[-1:]) if loss else "none (not healed)")]
        search = r.get("search")
        if isinstance(search, dict) and search.get("steps"):
            lines += ["", f"## {r['target']}: smallest passing artifact (step {search.get('chosen_step')} chosen)",
                      "| step | budget B | FFN pruned | bytes | KL mean | top-1 | verdict |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {st['step']} | {_fmt(st.get('budget_bytes'))} | {_fmt(st.get('prune_ffn'))} | {_fmt(st.get('bytes'))} | {_fmt(st.get('kl_mean'))} | "
                      f"{_fmt(st.get('top1_agreement'))} | {'PASS' if st.get('passed') else 'FAIL ' + ', '.join(map(str, st.get('failed_gates') or [])) + str(st.get('stopped') or '')} |"
                      for st in search["steps"]]
        for g in (r.get("greedy") or {}).get("text") or []:
            cut = g.get("first_divergence")
            lines += ["", f"### {r['target']}: greedy continuation of {g.get('prompt', '')!r} "
                          f"({'identical' if cut is None else f'first differs at token {cut + 1}'})",
                      f"- reference: {''.join(g.get('reference', []))!r}", f"- artifact:  {''.join(g.get('artifact', []))!r}"]
    return "\n".join(lines) + "\n"


# --- SVG plots: small, dependency-free, embedded in the page -------------------------------------------

def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" role="img" aria-label="{html.escape(title)}" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{html.escape(title)}</text>'
            + "".join(body) + "</svg>")


def _axes(w, h, m, xlabel, ylabel) -> list[str]:
    return [f'<line x1="{m}" y1="{h - m}" x2="{w - 10}" y2="{h - m}" stroke="#333"/>',
            f'<line x1="{m}" y1="24" x2="{m}" y2="{h - m}" stroke="#333"/>',
            f'<text x="{(w + m) / 2}" y="{h - 8}" text-anchor="middle" font-size="11">{html.escape(xlabel)}</text>',
            f'<text x="12" y="{h / 2}" text-anchor="middle" font-size="11" transform="rotate(-90 12 {h / 2})">{html.escape(ylabel)}</text>']


def _log(v: float) -> float:
    return math.log10(max(v, 1e-12))


def plot_size_vs_kl(reports: list[dict]) -> str:
    w, h, m = 520, 320, 56
    xs = [r["artifact"]["bytes"] / 1e6 for r in reports]
    ys = [_log(r["parity"]["kl_mean"] if r["parity"]["kl_mean"] is not None else 1e3) for r in reports]
    bars = [_kl_interval(r) for r in reports]
    x0, x1 = 0, max(xs) * 1.1 or 1
    lows = [_log(b[0]) for b in bars if b] + ys
    highs = [_log(b[1]) for b in bars if b] + ys
    y0, y1 = min(lows) - 0.5, max(highs) + 0.5
    body = _axes(w, h, m, "artifact size (MB)", "KL mean (log10), 95% interval")

    def py(y):
        return h - m - (y - y0) / (y1 - y0) * (h - m - 34)

    for i, (r, x, y, bar) in enumerate(zip(reports, xs, ys, bars)):
        px = m + (x - x0) / (x1 - x0) * (w - m - 20)
        if bar:  # the interval as an error bar with caps
            top, bottom = py(_log(bar[1])), py(_log(bar[0]))
            body.append(f'<g class="errorbar"><line x1="{px:.1f}" y1="{top:.1f}" x2="{px:.1f}" y2="{bottom:.1f}" stroke="#555"/>'
                        f'<line x1="{px - 4:.1f}" y1="{top:.1f}" x2="{px + 4:.1f}" y2="{top:.1f}" stroke="#555"/>'
                        f'<line x1="{px - 4:.1f}" y1="{bottom:.1f}" x2="{px + 4:.1f}" y2="{bottom:.1f}" stroke="#555"/></g>')
        body.append(f'<circle cx="{px:.1f}" cy="{py(y):.1f}" r="5" fill="{COLORS[i % len(COLORS)]}"/>'
                    f'<text x="{px + 7:.1f}" y="{py(y) - 6:.1f}" font-size="10">{html.escape(str(r["target"]))}</text>')
    body.append(f'<text x="{m - 4}" y="{h - m}" text-anchor="end" font-size="9">{y0:.1f}</text>'
                f'<text x="{m - 4}" y="34" text-anchor="end" font-size="9">{y1:.1f}</text>'
                f'<text x="{w - 12}" y="{h - m + 12}" text-anchor="end" font-size="9">{x1:.1f}</text>')
    return _svg(w, h, body, "Size against KL divergence")


def plot_search(reports: list[dict]) -> str:
    """The size-KL curve of each `--smallest` search, one line per target, the chosen step marked."""
    searched = [r for r in reports if isinstance(r.get("search"), dict) and r["search"].get("steps")]
    if not searched:
        return ""
    w, h, m = 520, 320, 56
    points = [[(s["bytes"] / 1e6, _log(s["kl_mean"])) for s in r["search"]["steps"]
               if isinstance(s.get("bytes"), (int, float)) and isinstance(s.get("kl_mean"), (int, float))] for r in searched]
    xs = [x for p in points for x, _ in p] or [1.0]
    ys = [y for p in points for _, y in p] or [0.0]
    x0, x1, y0, y1 = min(xs) * 0.95, max(xs) * 1.05 or 1, min(ys) - 0.3, max(ys) + 0.3
    body = _axes(w, h, m, "artifact size (MB)", "KL mean (log10)")

    def at(x, y):
        return m + (x - x0) / max(x1 - x0, 1e-12) * (w - m - 20), h - m - (y - y0) / max(y1 - y0, 1e-12) * (h - m - 34)

    for i, (r, pts) in enumerate(zip(searched, points)):
        color = COLORS[i % len(COLORS)]
        body.append(f'<polyline class="series" fill="none" stroke="{color}" points="' + " ".join("%.1f,%.1f" % at(x, y) for x, y in pts) + '"/>')
        for s, (x, y) in zip([s for s in r["search"]["steps"] if isinstance(s.get("bytes"), (int, float))], pts):
            px, py = at(x, y)
            chosen = s["step"] == r["search"].get("chosen_step")
            body.append(f'<circle class="{"chosen" if chosen else "step"}" cx="{px:.1f}" cy="{py:.1f}" r="{7 if chosen else 3}" '
                        f'fill="{color if s.get("passed") else "#fff"}" stroke="{color}"/>')
            if chosen:
                body.append(f'<text x="{px + 9:.1f}" y="{py - 8:.1f}" font-size="10">{html.escape(str(r["target"]))}: chosen</text>')
    return _svg(w, h, body, "Smallest passing artifact: size against KL per step")


def _kl_interval(r: dict):
    i = (r["parity"].get("intervals") or {}).get("kl_mean")
    return i if isinstance(i, list) and len(i) == 2 and all(isinstance(v, (int, float)) for v in i) else None


def greedy_panels(reports: list[dict]) -> str:
    """Each prompt's greedy continuation from the reference and from every artifact, side by side, the first
    token where they part marked."""
    parts = []
    for r in reports:
        for g in (r.get("greedy") or {}).get("text") or []:
            cut = g.get("first_divergence")

            def tokens(toks, cut=cut):
                return "".join(f'<mark class="diverge">{html.escape(str(t))}</mark>' if i == cut else html.escape(str(t))
                               for i, t in enumerate(toks))
            verdict = "identical" if cut is None else f"first differs at token {cut + 1}"
            parts.append(f'<div class="greedy"><h3>{html.escape(str(r["target"]))}: {verdict}</h3>'
                         f'<p class="prompt">{html.escape(str(g.get("prompt", "")))}</p>'
                         f'<table class="side"><tr><th>reference</th><th>artifact</th></tr>'
                         f'<tr><td class="ref">{tokens(g.get("reference", []))}</td><td class="art">{tokens(g.get("artifact", []))}</td></tr>'
                         f'</table></div>')
    return "".join(parts) or "<p>No greedy text in these reports (written before llmship recorded it).</p>"


def plot_decode_speed(reports: list[dict]) -> str:
    w = 520
    h = 60 + 26 * len(reports)
    top = max(r["latency"]["decode_tok_s"] for r in reports) or 1
    body = [f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle" font-size="11">decode tokens/s</text>']
    for i, r in enumerate(reports):
        v = r["latency"]["decode_tok_s"]
        bw = v / top * (w - 200)
        y = 30 + 26 * i
        body.append(f'<text x="150" y="{y + 13}" text-anchor="end" font-size="10">{html.escape(r["target"])}</text>'
                    f'<rect class="bar" x="156" y="{y}" width="{bw:.1f}" height="18" fill="{COLORS[i % len(COLORS)]}"/>'
                    f'<text x="{160 + bw:.1f}" y="{y + 13}" font-size="10">{v:.1f}</text>')
    return _svg(w, h, body, "Decode speed per target")


def plot_error_along_sequence(reports: list[dict]) -> str:
    w, h, m = 520, 320, 56
    series = [(r["target"], r.get("series", {}).get("kl", [])) for r in reports]
    n = max((len(s) for _, s in series), default=1) or 1
    logs = [[_log(v) for v in s] for _, s in series]
    flat = [v for s in logs for v in s] or [0.0]
    y0, y1 = min(flat) - 0.2, max(flat) + 0.2
    body = _axes(w, h, m, "position in evaluation sequence", "KL per token (log10)")
    for i, ((name, _), s) in enumerate(zip(series, logs)):
        if not s:
            continue
        pts = " ".join(f"{m + j / max(n - 1, 1) * (w - m - 20):.1f},{h - m - (v - y0) / (y1 - y0) * (h - m - 34):.1f}" for j, v in enumerate(s))
        body.append(f'<polyline class="series" fill="none" stroke="{COLORS[i % len(COLORS)]}" stroke-width="1.2" points="{pts}"/>'
                    f'<text x="{w - 14}" y="{40 + 12 * i}" text-anchor="end" font-size="10" fill="{COLORS[i % len(COLORS)]}">{html.escape(name)}</text>')
    body.append(f'<text x="{m - 4}" y="{h - m}" text-anchor="end" font-size="9">{y0:.1f}</text>'
                f'<text x="{m - 4}" y="34" text-anchor="end" font-size="9">{y1:.1f}</text>')
    return _svg(w, h, body, "Error along the sequence")


def plot_healing(reports: list[dict]) -> str:
    """The distillation loss per step of each pruned artifact's healing (nothing when none was healed)."""
    curves = [(r["target"], r["structure"]["heal"]["loss"]) for r in reports
              if isinstance(r.get("structure"), dict) and (r["structure"].get("heal") or {}).get("loss")]
    if not curves:
        return ""
    w, h, m = 520, 320, 56
    n = max(len(c) for _, c in curves)
    top = max(max(c) for _, c in curves) or 1.0
    body = _axes(w, h, m, "healing step", "distillation loss")
    for i, (name, c) in enumerate(curves):
        pts = " ".join(f"{m + j / max(n - 1, 1) * (w - m - 20):.1f},{h - m - v / top * (h - m - 34):.1f}" for j, v in enumerate(c))
        body.append(f'<polyline class="series" fill="none" stroke="{COLORS[i % len(COLORS)]}" stroke-width="1.2" points="{pts}"/>'
                    f'<text x="{w - 14}" y="{40 + 12 * i}" text-anchor="end" font-size="10" fill="{COLORS[i % len(COLORS)]}">{html.escape(name)}</text>')
    body.append(f'<text x="{m - 4}" y="34" text-anchor="end" font-size="9">{top:.3g}</text>')
    return _svg(w, h, body, "Healing: distillation loss per step")


def html_page(reports: list[dict]) -> str:
    ok = all(r["passed"] for r in reports)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in HEADER)
    rows = "".join("<tr>" + "".join(f'<td class="{"fail" if c.startswith("FAIL") else ""}">{html.escape(c)}</td>' for c in row) + "</tr>"
                   for row in _rows(reports))
    notes = "".join(f"<p class=\"note\"><b>{html.escape(str(r['target']))}</b>: {html.escape(str(r['executor_note']))}</p>"
                    for r in reports if r.get("executor_note"))
    gates = "".join(
        f"<h3>{html.escape(str(r['target']))}</h3><ul>" + "".join(
            f'<li class="{"pass" if g["passed"] else "fail"}">{html.escape(str(g["name"]))}: {html.escape(_fmt(g["value"]))} '
            + (f'[{html.escape(_fmt(g["interval"][0]))}, {html.escape(_fmt(g["interval"][1]))}] ' if _pair(g.get("interval")) else "")
            + f'(limit {html.escape(_fmt(g["limit"]))}) {"passed" if g["passed"] else "FAILED"}'
            + (' <span class="marginal">marginal: the interval straddles the limit, a rerun may flip it</span>' if g.get("marginal") else "")
            + "</li>" for g in r["gates"]) + "</ul>"
        for r in reports)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>llmship validation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td.fail, li.fail {{ color: #b00020; font-weight: bold; }} li.pass {{ color: #1b5e20; }}
.verdict {{ font-size: 20px; font-weight: bold; color: {"#1b5e20" if ok else "#b00020"}; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 16px; }} .marginal {{ color: #9a6700; font-weight: bold; }}
mark.diverge {{ background: #ffd54f; }} table.side td {{ text-align: left; vertical-align: top; white-space: pre-wrap; width: 45%; }} .note {{ background: #fff8e1; padding: 8px; border-left: 4px solid #f9a825; }}
</style></head><body>
<h1>llmship validation report</h1>
<p class="verdict" id="verdict">{"PASS" if ok else "FAIL"}: {sum(r["passed"] for r in reports)}/{len(reports)} targets passed</p>
<p>Source: {html.escape(source_line(reports[0]))}</p>
<p>Parity compares each artifact with the FP32 reference (what the user gets); conversion compares it with the
compressed reference, the recipe's own weights and activation quantization in PyTorch (what the converter added).</p>
<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
{notes}
<h2>Plots</h2><div class="plots">{plot_size_vs_kl(reports)}{plot_decode_speed(reports)}{plot_error_along_sequence(reports)}{plot_search(reports)}{plot_healing(reports)}</div>
<h2>Gates</h2>{gates}
<h2>Greedy continuations</h2>{greedy_panels(reports)}
<script>
// Marks how many plots actually laid out with visible marks; the browser test reads it.
window.addEventListener("load", function () {{
  var drawn = Array.prototype.filter.call(document.querySelectorAll("svg.plot"), function (s) {{
    var box = s.getBoundingClientRect();
    return box.width > 0 && box.height > 0 && s.querySelectorAll("circle, rect, polyline").length > 0;
  }});
  document.body.setAttribute("data-plots-rendered", String(drawn.length));
  var bars = Array.prototype.filter.call(document.querySelectorAll("g.errorbar"), function (g) {{
    var box = g.getBoundingClientRect();
    return box.height > 0;
  }});
  document.body.setAttribute("data-errorbars-rendered", String(bars.length));
}});
</script>
</body></html>
"""


def junit(reports: list[dict]) -> str:
    """One testsuite per target, one testcase per gate; a failed gate is a <failure>."""
    root = ET.Element("testsuites", name="llmship")
    for r in reports:
        suite = ET.SubElement(root, "testsuite", name=r["target"], tests=str(len(r["gates"])),
                              failures=str(sum(not g["passed"] for g in r["gates"])))
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="executor", value=r["executor"])
        for g in r["gates"]:
            case = ET.SubElement(suite, "testcase", classname=f"llmship.{r['target']}", name=g["name"])
            if not g["passed"]:
                ET.SubElement(case, "failure", message=f"{g['name']} = {_fmt(g['value'])} (limit {_fmt(g['limit'])})")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
