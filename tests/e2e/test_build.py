"""`llmship build` end to end on the identity target: layout, resolved config, reports, exit code."""
import json
import subprocess
import sys

import yaml


def test_build_writes_artifacts_reports_and_resolved_config(tmp_path):
    cfg = tmp_path / "llmship.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": "builtin:tiny",
        "targets": ["pytorch-fp32"],
        "evaluation": {"tokens": 24, "latency_runs": 4},
        "overrides": {"pytorch-fp32": {"max_context": 128, "prefill_lengths": [8, 16]}},
    }))
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "llmship", "build", str(cfg), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "[1/1] pytorch-fp32: exporting" in proc.stdout and "PASS" in proc.stdout
    manifest = json.loads((out / "pytorch-fp32" / "manifest.json").read_text())
    assert manifest["max_context"] == 128 and manifest["prefill_lengths"] == [8, 16]
    report = json.loads((out / "pytorch-fp32" / "report.json").read_text())
    assert report["passed"] and set(report["latency"]["ttft_ms_by_prefill_length"]) == {"8", "16"}
    resolved = yaml.safe_load((out / "llmship.resolved.yaml").read_text())
    assert resolved["resolved_targets"]["pytorch-fp32"]["max_context"] == 128
    for name in ("report.md", "report.html", "junit.xml"):
        assert (out / name).stat().st_size > 200


def test_eval_text_file_is_used_verbatim(tmp_path, stories_dir):
    from llmship.config import BuildConfig
    from llmship.targets import resolve_target
    from llmship.models import load_model
    from llmship.pipeline import export_artifact
    from llmship.validation.stage import validate_artifact

    text = (stories_dir.parents[1] / "data" / "tinystories_val.txt").read_text()[:2000]
    (tmp_path / "eval.txt").write_text(text)
    loaded = load_model(str(stories_dir))
    art = export_artifact(loaded, resolve_target(BuildConfig(), "pytorch-fp32"), tmp_path / "a")
    config = BuildConfig.model_validate({"evaluation": {"tokens": 64, "latency_runs": 4}})
    report = validate_artifact(art, config, eval_text=str(tmp_path / "eval.txt"), loaded=loaded)
    assert report["parity"]["eval_tokens"] == 64
    # real children's-story text: the reference perplexity is low but not the ~1 of its own samples
    assert 1.5 < report["parity"]["ppl_reference"] < 30
