"""Property-style: hundreds of generated malformed configs, manifests, report.json files and argument lists.

Whatever the input, llmship answers with the contract: an exit code in {2, 3, 4, 5}, exactly one stderr line
(`llmship: error: ...`), no traceback (in process, an escaping exception fails the test), and nothing written
outside the case's own temporary directory. Cases are generated from a fixed seed, so a failure reproduces.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llmship import cli
from tests.conftest import ROOT

SEED = 20261201
WRONG_VALUES = ["text", -7, 0, 3.5, 1e12, [], [1, "x"], {"a": 1}, None, True, "", "../../etc", "<script>"]


def run_case(argv: list[str], cwd: Path, capsys, monkeypatch) -> tuple[int, list[str]]:
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own exit for usage errors
        code = exc.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, err


def assert_contract(code, err, case):
    assert code in (2, 3, 4, 5), (case, code, err)
    assert len(err) == 1 and err[0].startswith("llmship: error:"), (case, err)
    assert "Traceback" not in err[0], (case, err)


def mutate(data, rng: random.Random, paths: list[tuple]) -> tuple:
    """Delete, retype or put out of range the value at one of `paths` (a tuple of keys); returns the path."""
    path = rng.choice(paths)
    node = data
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if rng.random() < 0.3 and isinstance(node, dict):
        node.pop(last, None)
    else:
        old = node[last]
        choices = [v for v in WRONG_VALUES if type(v) is not type(old) or v != old]
        node[last] = rng.choice(choices)
    return path


def all_paths(node, prefix=()) -> list[tuple]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out += all_paths(v, (*prefix, k))
    return out


# ---- configs ------------------------------------------------------------------------------------------------

BASE_CONFIG = {
    "model": "builtin:tiny", "targets": ["pytorch-fp32"],
    "evaluation": {"tokens": 24, "seed": 0, "prompts": ["Once"], "greedy_tokens": 8, "latency_runs": 2},
    "overrides": {"pytorch-fp32": {"max_context": 64, "prefill_lengths": [8, 16], "gates": {"kl_mean_max": 0.1}}},
    "platforms": {"android": ["pytorch-fp32"], "ios": ["pytorch-fp32"]},
}
# Values that must be refused wherever they appear in the config (a wrong value is not always invalid:
# `seed: 0` -> `seed: 3.5` is coerced by nobody, but `tokens: 24` -> `tokens: 0` is out of range).
CONFIG_PATHS = [p for p in all_paths(BASE_CONFIG) if p not in (("model",),)]


def config_cases(n: int):
    rng = random.Random(SEED)
    for i in range(n):
        data = copy.deepcopy(BASE_CONFIG)
        kind = rng.random()
        if kind < 0.1:
            yield i, "model: [unclosed\n  - x: {", "yaml syntax"
        elif kind < 0.15:
            yield i, yaml.safe_dump(rng.choice([[1, 2], "a string", 42])), "not a mapping"
        elif kind < 0.25:
            data[rng.choice(["evaluaton", "target", "overides", "x"])] = 1
            yield i, yaml.safe_dump(data), "unknown key"
        else:
            path = mutate(data, rng, CONFIG_PATHS)
            yield i, yaml.safe_dump(data), f"mutated {'.'.join(map(str, path))}"


def test_generated_malformed_configs_follow_the_contract(tmp_path, capsys, monkeypatch):
    command = "build"
    outside = snapshot_outside(tmp_path)
    for i, text, what in config_cases(80):
        case = tmp_path / f"c{i}"
        case.mkdir()
        (case / "c.yaml").write_text(text)
        # The source never exists: a config that happens to stay valid ends at exit 3, never in a real build.
        argv = [command, "c.yaml", "--set", f"model={case / 'no-such-model'}", "--out", "dist"]
        code, err = run_case(argv, case, capsys, monkeypatch)
        assert_contract(code, err, (command, i, what))
        assert not (case / "dist").exists(), (i, what)  # nothing written for a refused build
    assert snapshot_outside(tmp_path) == outside


# ---- manifests ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_artifact(tmp_path_factory, tiny):
    from llmship.config import BuildConfig
    from llmship.pipeline import export_artifact
    from llmship.targets import resolve_target

    target = resolve_target(BuildConfig(), "pytorch-fp32").model_copy(update={"max_context": 32, "prefill_lengths": (8,)})
    return export_artifact(tiny, target, tmp_path_factory.mktemp("good") / "art")


def manifest_cases(good: Path, n: int):
    from llmship.manifest import REQUIRED

    rng = random.Random(SEED + 1)
    manifest = json.loads((good / "manifest.json").read_text())
    required = [tuple(p.split(".")) for p in REQUIRED]
    extra = [("entry_points", "decode", "file"), ("files", "model.safetensors", "sha256"), ("files", "model.safetensors"),
             ("entry_points", "prefill", "inputs")]
    for i in range(n):
        data = copy.deepcopy(manifest)
        kind = rng.random()
        if kind < 0.08:
            yield i, "{not json", "json syntax"
        elif kind < 0.12:
            yield i, json.dumps(rng.choice([[], "str", 3])), "not an object"
        elif kind < 0.3:
            entry = rng.choice(["prefill", "decode"])
            data["entry_points"][entry]["file"] = rng.choice(["/etc/passwd", "../good/model.safetensors", "missing.bin", "..", "~root"])
            yield i, json.dumps(data), "entry file"
        else:
            node_path = mutate_required(data, rng, required + extra)
            yield i, json.dumps(data), f"mutated {'.'.join(node_path)}"


def mutate_required(data, rng, paths) -> tuple:
    """Like `mutate`, but always into a value the reader must refuse: deleted, or of the wrong JSON type."""
    path = rng.choice(paths)
    node = data
    for key in path[:-1]:
        node = node[key]
    if rng.random() < 0.4:
        node.pop(path[-1], None)
    else:
        old = node[path[-1]]
        wrong = [v for v in WRONG_VALUES if type(v) is not type(old) and not (isinstance(old, int) and type(v) in (int, float))]
        node[path[-1]] = rng.choice(wrong)
    return path


def test_generated_malformed_manifests_follow_the_contract(good_artifact, tmp_path, capsys, monkeypatch):
    outside = snapshot_outside(tmp_path)
    for i, text, what in manifest_cases(good_artifact, 60):
        case = tmp_path / f"m{i}"
        art = Path(shutil.copytree(good_artifact, case / "art"))
        (art / "manifest.json").write_text(text)
        for argv in (["validate", "art", "--model", str(case / "no-such-model")], ["inspect", "art"]):
            code, err = run_case(argv, case, capsys, monkeypatch)
            assert_contract(code, err, (argv[0], i, what))
        assert not (art / "report.json").exists()
    assert snapshot_outside(tmp_path) == outside


# ---- report.json --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_report(good_artifact):
    from llmship.config import BuildConfig
    from llmship.validation.stage import validate_artifact

    return validate_artifact(good_artifact, BuildConfig.model_validate({"evaluation": {"tokens": 16, "latency_runs": 2}}))


def report_cases(report: dict, n: int):
    schema = json.loads((ROOT / "llmship" / "validation" / "report.schema.json").read_text())
    required = [(k,) for k in schema["required"]]
    for section in ("artifact", "parity", "latency", "memory"):
        required += [(section, k) for k in schema["properties"][section]["required"]]
    required += [("gates", 0, k) for k in ("name", "value", "limit", "passed")]
    rng = random.Random(SEED + 2)
    for i in range(n):
        data = copy.deepcopy(report)
        if rng.random() < 0.1:
            yield i, rng.choice(["[1, 2]", "{broken", '"a string"']), "not a report"
            continue
        path = rng.choice(required)
        node = data
        for key in path[:-1]:
            node = node[key]
        if rng.random() < 0.4 and isinstance(node, dict):
            del node[path[-1]]
        else:
            old = node[path[-1]]
            node[path[-1]] = rng.choice([v for v in ["text", [], {"a": 1}, True] if type(v) is not type(old)])
        yield i, json.dumps(data), f"mutated {'.'.join(map(str, path))}"


@pytest.mark.parametrize("merge", [False, True], ids=["report", "report-merge"])
def test_generated_malformed_reports_follow_the_contract(good_report, tmp_path, capsys, monkeypatch, merge):
    outside = snapshot_outside(tmp_path)
    for i, text, what in report_cases(good_report, 40):
        case = tmp_path / f"r{i}"
        (case / "job").mkdir(parents=True)
        (case / "job" / "report.json").write_text(text)
        argv = ["report", *(["merge"] if merge else []), "job", "--out", "pages"]
        code, err = run_case(argv, case, capsys, monkeypatch)
        assert_contract(code, err, (i, what))
        assert not (case / "pages").exists()
    assert snapshot_outside(tmp_path) == outside


# ---- argument lists -----------------------------------------------------------------------------------------

COMMANDS = ["build", "export", "validate", "inspect", "report", "litertlm", "matrix", "bogus", "--bogus"]
FLAGS = ["--model", "--target", "--out", "--set", "--config", "--eval-text", "--baseline", "--platform", "--bogus", "--debug"]
VALUES = ["no-such-dir", "builtin:nope", "onnx-int3", "executorch-int2", "a=1", "=", "a.b", "", "windows", "x.yaml",
          "evaluation.tokens=-4", "overrides.onnx-int4.recipe.group_size=48", "targets=[nope]", "../up", "/nonexistent/path"]
# Tokens that make `build` / `matrix` invalid whatever else is drawn (their defaults would build SmolLM2).
POISON = [["--set", "evaluation.bogus=1"], ["no-such-config.yaml"], ["--set", "targets=[nope-fp32]"], ["--platform", "windows"]]


def argument_cases(n: int):
    rng = random.Random(SEED + 3)
    for i in range(n):
        command = rng.choice(COMMANDS)
        argv = [command]
        for _ in range(rng.randint(0, 5)):
            argv += [rng.choice(FLAGS)] + ([rng.choice(VALUES)] if rng.random() < 0.85 else [])
        if command in ("build", "matrix"):
            argv += rng.choice(POISON)
        yield i, argv


def test_generated_argument_lists_follow_the_contract(tmp_path, capsys, monkeypatch):
    outside = snapshot_outside(tmp_path)
    for i, argv in argument_cases(60):
        case = tmp_path / f"a{i}"
        case.mkdir()
        code, err = run_case(argv, case, capsys, monkeypatch)
        assert_contract(code, err, (i, argv))
    assert snapshot_outside(tmp_path) == outside


def snapshot_outside(tmp_path: Path) -> tuple:
    """What a case could wrongly write to: the repository's working tree and the temp dir's parent."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True, text=True).stdout
    siblings = sorted(p.name for p in tmp_path.parent.iterdir())
    return status, siblings
