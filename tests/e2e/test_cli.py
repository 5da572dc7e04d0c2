"""The CLI end to end, as a user runs it: exit codes and one-line errors for every kind of bad input."""
import json
import subprocess
import sys
import time

import pytest

from tests.helpers import hf_model, loaded_from_hf, write_gguf


def llmship(*args, check=None):
    proc = subprocess.run([sys.executable, "-m", "llmship", *map(str, args)], capture_output=True, text=True)
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc


def assert_one_line_error(proc, code, match):
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("llmship: error:")]
    assert len(lines) == 1 and match in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_and_targets_import_no_converter():
    code = ("import sys, runpy; sys.argv=['llmship', 'targets']\n"
            "from llmship.cli import main; main()\n"
            "heavy = [m for m in ('torch', 'executorch', 'coremltools', 'onnx', 'onnxruntime', 'litert_torch', 'ai_edge_litert', 'transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "pytorch-fp32" in out, out
    proc = llmship("--help", check=0)
    assert "export" in proc.stdout and time.perf_counter() - t0 < 30


def test_export_inspect_validate_round_trip(tmp_path):
    out = tmp_path / "art"
    llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", out, check=0)
    info = llmship("inspect", out, check=0).stdout
    assert "pytorch-fp32" in info and "max_context 512" in info and "sha256" in info
    proc = llmship("validate", out, "--set", "evaluation.tokens=24", "--set", "evaluation.latency_runs=4", check=0)
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["parity"]["top1_agreement"] == 1.0 and "PASS" in proc.stdout


def test_missing_model_directory(tmp_path):
    proc = llmship("export", "--model", tmp_path / "nope", "--target", "pytorch-fp32", "--out", tmp_path / "o")
    assert_one_line_error(proc, 3, "not found")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    proc = llmship("export", "--model", tmp_path, "--target", "pytorch-fp32", "--out", tmp_path / "o")
    assert_one_line_error(proc, 3, "unsupported architecture 'gpt2'")


def test_truncated_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(loaded_from_hf(hf_model("llama-tied-gqa3")), path)
    path.write_bytes(path.read_bytes()[:3000])
    proc = llmship("export", "--model", path, "--target", "pytorch-fp32", "--out", tmp_path / "o")
    assert_one_line_error(proc, 3, "GGUF")


def test_unknown_target(tmp_path):
    proc = llmship("export", "--model", "builtin:tiny", "--target", "onnx-int3", "--out", tmp_path / "o")
    assert_one_line_error(proc, 2, "unknown target 'onnx-int3'")


def test_unknown_config_key_and_bad_value(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: builtin:tiny\nevaluaton: {tokens: 3}\n")
    assert_one_line_error(llmship("build", cfg, "--out", tmp_path / "o"), 2, "evaluaton: unknown key")
    assert_one_line_error(llmship("build", "--set", "evaluation.tokens=abc", "--out", tmp_path / "o"), 2, "evaluation.tokens")
    assert not (tmp_path / "o").exists()


def test_validate_a_directory_that_is_not_an_artifact(tmp_path):
    assert_one_line_error(llmship("validate", tmp_path), 2, "no manifest.json")


def test_unwritable_output(tmp_path):
    (tmp_path / "f").write_text("x")
    proc = llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", tmp_path / "f" / "art")
    assert_one_line_error(proc, 2, "cannot write to output directory")


@pytest.mark.parametrize("args", [["bogus"], ["export", "--model", "builtin:tiny"]])
def test_usage_errors_exit_2(args):
    assert llmship(*args).returncode == 2
