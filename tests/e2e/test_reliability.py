"""Reliability: llmship never destroys a user's files, writes only where it was asked, leaves nothing half-made,
and refuses bad models at load. Each test reproduces a defect found by probing the CLI as a user and as an
attacker would, and shows it fixed."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

FAST = ["--set", "evaluation.tokens=24", "--set", "evaluation.latency_runs=2"]


def llmship(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "llmship", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def one_error_line(proc, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmship: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every path under root with its kind, mode and content hash: equal snapshots mean byte-identical trees."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        st = p.lstat()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", st.st_mode)
        else:
            out[rel] = ("file", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# ---- 1. --out never replaces what llmship did not make ------------------------------------------------------

def test_export_onto_a_directory_of_user_files_is_refused_and_nothing_changes(tmp_path):
    docs = tmp_path / "mydocs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("x")
    (docs / "sub" / "b.bin").write_bytes(os.urandom(64))
    before = snapshot(tmp_path)
    proc = llmship("export", "--model", "builtin:tiny", "--target", "onnx-fp32", "--out", docs)
    one_error_line(proc, 2, "not an llmship artifact")
    assert snapshot(tmp_path) == before


def test_export_onto_a_regular_file_is_refused_and_leaves_no_stray_sibling(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("my notes")
    before = snapshot(tmp_path)
    one_error_line(llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", target), 2, "not a directory")
    assert snapshot(tmp_path) == before


def test_out_dot_is_refused_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    before = snapshot(tmp_path)
    t0 = time.perf_counter()
    proc = llmship("export", "--model", tmp_path / "no-model", "--target", "pytorch-fp32", "--out", ".", cwd=tmp_path)
    one_error_line(proc, 2, "current directory")
    assert time.perf_counter() - t0 < 60 and snapshot(tmp_path) == before


def test_an_artifact_holding_a_users_file_is_not_replaced(tmp_path):
    art = tmp_path / "art"
    assert llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", art).returncode == 0
    assert llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", art).returncode == 0  # its own: fine
    (art / "README.txt").write_text("my notes about this model")
    before = snapshot(tmp_path)
    one_error_line(llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", art), 2, "not an llmship artifact")
    assert snapshot(tmp_path) == before


def test_a_symlinked_out_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    before = snapshot(tmp_path)
    one_error_line(llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", tmp_path / "link"), 2, "symlink")
    assert snapshot(tmp_path) == before


def test_build_into_a_non_empty_directory_no_build_made_is_refused(tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    before = snapshot(tmp_path)
    one_error_line(llmship("build", "--set", "model=builtin:tiny", "--target", "pytorch-fp32", "--out", out,
                           "--set", "targets=[pytorch-fp32]"), 2, "no llmship build made")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["../victim", "/tmp/abs", "a/b", ".hidden", "..", "x" * 65])
def test_a_target_name_is_never_a_path(tmp_path, name):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    (tmp_path / "dist").mkdir()
    before = snapshot(tmp_path)
    proc = llmship("build", "--set", "model=builtin:tiny", "--set", "targets=[pytorch-fp32]", "--out", tmp_path / "dist",
                   "--set", f"overrides.pytorch-fp32.name={name}", cwd=tmp_path)
    one_error_line(proc, 2, "overrides.pytorch-fp32")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": "builtin:tiny", "targets": ["pytorch-fp32"], "overrides": {"pytorch-fp32": {"name": name}}}))
    one_error_line(llmship("build", cfg, "--out", tmp_path / "dist", cwd=tmp_path), 2, "overrides.pytorch-fp32")
    cfg.unlink()
    assert snapshot(tmp_path) == before


def test_new_artifact_directories_follow_the_umask(tmp_path):
    code = ("import os, sys; os.umask(0o022); from llmship.cli import main; "
            f"sys.exit(main(['export', '--model', 'builtin:tiny', '--target', 'pytorch-fp32', '--out', {str(tmp_path / 'a')!r}]))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755


# ---- 9. leftovers: interrupted runs and concurrent writers ------------------------------------------------

def _start_export(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmship", "export", "--model", "builtin:tiny", "--target", "onnx-fp32",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_partial(out: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while not list(out.parent.glob(f".{out.name}.partial-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no partial directory appeared"
        time.sleep(0.05)


def test_sigterm_during_export_leaves_nothing_behind(tmp_path):
    out = tmp_path / "art"
    proc = _start_export(out)
    _wait_for_partial(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_exports_partial_directory_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "art"
    proc = _start_export(out)
    _wait_for_partial(out, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert list(tmp_path.glob(".art.partial-*"))  # SIGKILL runs no cleanup
    assert llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", out).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_a_second_writer_to_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    from llmship.outputs import output_lock

    out = tmp_path / "art"
    with output_lock(out):
        one_error_line(llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", out), 2,
                       "another llmship process is writing")
    assert not out.exists()


def test_two_concurrent_exports_to_one_out_end_with_one_whole_artifact(tmp_path):
    out = tmp_path / "art"
    procs = [_start_export(out) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes in ([0, 0], [0, 2]), results  # both succeed one after the other, or the second is refused
    assert all("Traceback" not in r[1] for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    from llmship.manifest import check_integrity, read_manifest

    assert check_integrity(out, read_manifest(out))["mismatched"] == []


# ---- disk full (a real small filesystem) ------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size; yields a function (free_bytes) -> mount point with exactly that much room."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mounts = []

    def make(free_bytes: int) -> Path:
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        pages = -(-free_bytes // 4096)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4096 + 4096}", "tmpfs", str(point)], check=True)
        mounts.append(point)
        (point / "filler").write_bytes(b"\0" * 4096)  # the extra page: what is left is exactly free_bytes (whole pages)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", str(point)], check=False)


def _pages(n: int) -> int:
    return -(-n // 4096) * 4096


@pytest.mark.parametrize("stop_before", ["tokenizer.json", "manifest.json"])
def test_disk_full_while_writing_an_artifact_is_one_line_and_leaves_nothing(small_disk, tmp_path, stop_before):
    ref = tmp_path / "ref"
    assert llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", ref).returncode == 0
    room = _pages((ref / "model.safetensors").stat().st_size)
    if stop_before == "manifest.json":
        room += _pages((ref / "tokenizer.json").stat().st_size)
    disk = small_disk(room)
    before = snapshot(disk)
    proc = llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", disk / "art")
    one_error_line(proc, 2, f"cannot write {stop_before}")
    assert snapshot(disk) == before


def test_disk_full_while_writing_the_report_is_one_line_and_leaves_no_temporary(small_disk, tmp_path):
    import shutil

    ref = tmp_path / "ref"
    assert llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", ref).returncode == 0
    disk = small_disk(sum(_pages(p.stat().st_size) for p in ref.iterdir()) + 4096)
    art = Path(shutil.copytree(ref, disk / "art"))
    (disk / "filler2").write_bytes(b"\0" * 4096)  # now not a page left
    proc = llmship("validate", art, *FAST)
    one_error_line(proc, 2, "report.json")
    assert sorted(p.name for p in art.iterdir()) == sorted(p.name for p in ref.iterdir())  # no report, no .tmp
    shutil.rmtree(ref)
    assert llmship("validate", art, *FAST).returncode == 2  # and the next validation is not confused by leftovers


# ---- 6, 7. models that export would accept but validation would crash on ----------------------------------

def _hf_dir(tmp_path, mutate_config=None, mutate_weights=None, tokenizer_vocab=None) -> Path:
    from safetensors.torch import save_file

    from llmship.models.builtin import TINY_CONFIG, byte_tokenizer, random_weights

    d = tmp_path / "model"
    d.mkdir()
    config = json.loads(json.dumps(TINY_CONFIG))
    weights = random_weights(TINY_CONFIG)
    if mutate_config:
        mutate_config(config)
    if mutate_weights:
        mutate_weights(weights)
    (d / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "model.safetensors"))
    byte_tokenizer(tokenizer_vocab or TINY_CONFIG["vocab_size"]).save(str(d / "tokenizer.json"))
    return d


def _set(name, value):
    def mutate(weights):
        weights[name] = value(weights[name])
    return mutate


@pytest.mark.parametrize("case,needle", [
    (dict(mutate_weights=_set("model.layers.1.mlp.up_proj.weight", lambda w: w.index_put((torch.tensor([3]),), torch.tensor(float("nan"))))), "NaN"),
    (dict(mutate_weights=_set("model.norm.weight", lambda w: w / 0.0)), "NaN or infinite"),
    (dict(mutate_weights=_set("model.layers.0.self_attn.q_proj.weight", lambda w: (w * 100).to(torch.int8))), "not a float type"),
    (dict(mutate_config=lambda c: c.update(bos_token_id=99999)), "bos_token_id 99999 is outside the vocabulary"),
    (dict(mutate_config=lambda c: c.update(eos_token_id=[2, -1])), "eos_token_id -1 is outside the vocabulary"),
    (dict(tokenizer_vocab=400), "the tokenizer has 400 token ids but the model's vocab_size is 331"),
    (dict(mutate_config=lambda c: c.update(num_hidden_layers=int(1e9))), "num_layers 1000000000 is out of range"),
    (dict(mutate_config=lambda c: c.update(num_attention_heads=0)), "num_attention_heads"),
    (dict(mutate_config=lambda c: c.update(rope_scaling="yes")), "rope_scaling must be an object"),
    (dict(mutate_config=lambda c: c.update(hidden_size="64")), "hidden_size must be an integer"),
])
def test_a_model_that_would_crash_validation_is_exit_3_at_load(tmp_path, case, needle):
    model = _hf_dir(tmp_path, **case)
    t0 = time.perf_counter()
    proc = llmship("export", "--model", model, "--target", "pytorch-fp32", "--out", tmp_path / "out")
    one_error_line(proc, 3, needle)
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "out").exists()


def test_a_config_json_that_is_not_an_object_is_exit_3(tmp_path):
    model = _hf_dir(tmp_path)
    (model / "config.json").write_text("[1, 2, 3]")
    one_error_line(llmship("export", "--model", model, "--target", "pytorch-fp32", "--out", tmp_path / "o"), 3, "JSON object")


@pytest.mark.parametrize("head_count", [None, 0])
def test_a_gguf_without_a_usable_head_count_is_exit_3(tmp_path, head_count):
    import gguf

    from tests.helpers import hf_model, loaded_from_hf, write_gguf

    good = tmp_path / "good.gguf"
    write_gguf(loaded_from_hf(hf_model("llama-tied-gqa3")), good)
    reader = gguf.GGUFReader(str(good))
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "llama.attention.head_count":
            if head_count is None:
                continue
            w.add_uint32(name, head_count)
            continue
        value, vtype = field.contents(), field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(name, value)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_string(name, value)
        else:
            w.add_key_value(name, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_shape=[int(n) for n in reversed(t.shape)], raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    one_error_line(llmship("export", "--model", path, "--target", "pytorch-fp32", "--out", tmp_path / "o"), 3, "head_count")


def test_max_context_beyond_any_cache_is_exit_2_naming_it(tmp_path):
    proc = llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", tmp_path / "o",
                   "--set", "overrides.pytorch-fp32.max_context=200000000000")
    one_error_line(proc, 2, "max_context")


def test_nan_logits_fail_every_parity_gate():
    import numpy as np

    from llmship.config import Gates
    from llmship.validation.evaluate import parity_metrics
    from llmship.validation.gates import check_gates

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(32, 50)).astype(np.float32)
    bad = ref.copy()
    bad[5, 3] = np.nan
    parity, _ = parity_metrics(bad, ref, rng.integers(0, 50, 32))
    parity.update(greedy_fraction=0.0, ppl_ratio=None)
    # limits so loose that any finite artifact passes them all
    loose = Gates(max_abs_err=1e30, cosine_min=-0.999, top1_agreement_min=1e-9, kl_mean_max=1e30, kl_p99_max=1e30,
                  ppl_ratio_max=1e30, greedy_match_min=1e-9)
    results = check_gates({"parity": parity}, loose)
    assert len(results) == 7 and all(not r["passed"] for r in results), results
    good, _ = parity_metrics(ref + 0.01, ref, rng.integers(0, 50, 32))
    good.update(greedy_fraction=1.0, ppl_ratio=good["ppl"] / good["ppl_reference"])
    assert all(r["passed"] for r in check_gates({"parity": good}, loose))


# ---- 8. a baseline must hold the numbers it gates on ------------------------------------------------------

@pytest.mark.parametrize("content", ["{}", "not json at all", '{"artifact": {"bytes": "big"}}'])
def test_a_baseline_without_its_metrics_is_refused_before_evaluation(tmp_path, content):
    art = tmp_path / "art"
    assert llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", art).returncode == 0
    (tmp_path / "base.json").write_text(content)
    proc = llmship("validate", art, "--baseline", tmp_path / "base.json", *FAST)
    one_error_line(proc, 2, "baseline")
    assert "evaluating" not in proc.stdout and not (art / "report.json").exists()


# ---- 11. smaller defects ----------------------------------------------------------------------------------

def test_a_one_character_eval_text_is_refused(tmp_path):
    art = tmp_path / "art"
    assert llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", art).returncode == 0
    (tmp_path / "t.txt").write_text("x")
    one_error_line(llmship("validate", art, "--eval-text", tmp_path / "t.txt", *FAST), 2, "tokens")


@pytest.mark.parametrize("override", ["format=onnx", "name=other", "recipe.weights=int8", "max_context=64"])
def test_validate_time_overrides_cannot_relabel_what_was_built(tmp_path, override):
    art = tmp_path / "art"
    assert llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", art).returncode == 0
    proc = llmship("validate", art, "--set", f"overrides.pytorch-fp32.{override}", *FAST)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not (art / "report.json").exists()


def test_a_gate_override_at_validation_still_applies(tmp_path):
    art = tmp_path / "art"
    assert llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", art).returncode == 0
    proc = llmship("validate", art, "--set", "overrides.pytorch-fp32.gates.greedy_match_min=1.0", *FAST)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.litert
def test_a_litert_export_prints_only_llmships_own_lines(tmp_path):
    proc = llmship("export", "--model", "builtin:tiny", "--target", "litert-fp32", "--out", tmp_path / "a",
                   "--set", "overrides.litert-fp32.max_context=64", "--set", "overrides.litert-fp32.prefill_lengths=[8]")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    assert proc.stdout.strip().splitlines() == [f"wrote {tmp_path / 'a'}"]


def test_html_report_escapes_every_string_field(tmp_path):
    from llmship import cli
    from llmship.validation.report import html_page

    art = tmp_path / "art"
    assert llmship("export", "--model", "builtin:tiny", "--target", "pytorch-fp32", "--out", art).returncode == 0
    assert llmship("validate", art, *FAST).returncode == 0
    report = json.loads((art / "report.json").read_text())
    evil = "<script>alert(1)</script>"

    def poison(node):  # every string value, at any depth (a sha256 must stay one: the schema checks it)
        if isinstance(node, dict):
            return {k: (v if k == "sha256" else poison(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [poison(v) for v in node]
        return evil if isinstance(node, str) else node

    tampered = poison(report)
    tampered["artifact"]["files"] = {f"{evil}{i}": f for i, f in enumerate(tampered["artifact"]["files"].values())}
    (art / "report.json").write_text(json.dumps(tampered))
    assert cli.main(["report", str(art), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    assert evil not in page and "&lt;script&gt;" in page and page.count("<script") == 1  # the page's own script only
    # numbers are numbers: a string in a number field is refused, and even unvalidated it is escaped
    tampered["gates"][0]["value"] = evil
    (art / "report.json").write_text(json.dumps(tampered))
    assert cli.main(["report", str(art), "--out", str(tmp_path / "r2")]) == 2
    assert evil not in html_page([tampered])
