"""`llmship build`: every target of a config, incrementally, into a plain or an app-ready platform layout.

A target is rebuilt only when the sha256 of its inputs changed: the source files' contents, the resolved
target profile, the evaluation settings, and the versions of llmship and the toolchain. Unchanged inputs
and a report already on disk make the target a no-op, so an app build that calls llmship on every run pays
seconds, not minutes.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from llmship.errors import ConfigError
from llmship.manifest import REPORT, write_text_atomic
from llmship.pipeline import export_artifact, toolchain_versions
from llmship.progress import say
from llmship.validation.stage import validate_artifact

# Where an app loads assets from: Android merges src/main/assets (assets/llmship/...); iOS copies a folder
# into the bundle's resources (Resources/llmship/...).
PLATFORM_ROOTS = {"android": Path("android/assets/llmship"), "ios": Path("ios/Resources/llmship")}
INDEX = "index.json"


def inputs_sha256(config, target, source_digest: str) -> str:
    """The build inputs of one target: what a rebuild compares. The toolchain is the format registry's list
    (the same packages the manifest records), so upgrading any of them rebuilds the target."""
    from llmship.adapters import digests as adapter_digests
    from llmship.compress import code_digest
    from llmship.formats import toolchain_packages

    record = {
        "source": config.model,
        "source_files": source_digest,
        "adapters": adapter_digests(config.adapters),
        "compression": config.compression.model_dump(mode="json"),
        "target": target.model_dump(mode="json"),
        "evaluation": config.evaluation.model_dump(mode="json"),
        # the compression record's inputs (its digest is a function of these and the source): calibration
        # settings and the compression stage's own code
        "calibration": config.calibration.model_dump(mode="json"),
        "search": config.search.model_dump(mode="json"),
        "compress_code": code_digest(),
        "toolchain": toolchain_versions(toolchain_packages(target.format)),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def source_digest(source: str) -> str:
    from llmship.manifest import sha256_file
    from llmship.models.sources import source_files

    return hashlib.sha256("".join(f"{p.name}:{sha256_file(p)}" for p in source_files(source)).encode()).hexdigest()


def up_to_date(artifact: Path, digest: str) -> dict | None:
    """The existing report when the artifact was built from exactly these inputs, was validated, and its files
    are still the ones its manifest lists."""
    from llmship.errors import ManifestError
    from llmship.manifest import check_integrity, read_manifest

    try:
        manifest = read_manifest(artifact)
        report = json.loads((artifact / REPORT).read_text())
    except (OSError, ValueError, ConfigError, ManifestError):
        return None
    if manifest.get("inputs_sha256") != digest or not isinstance(report, dict) or "passed" not in report:
        return None
    return None if check_integrity(artifact, manifest)["mismatched"] else report


def built_elsewhere(out: Path, model: str, name: str, digest: str, artifact: Path) -> Path | None:
    """The same target built and validated from the same inputs in another layout under `out` (the other
    platform's, or the plain one): `make android` then `make ios` converts a shared target once."""
    from llmship.models.sources import model_slug

    candidates = [out / root / model_slug(model) / name for root in PLATFORM_ROOTS.values()] + [out / name]
    return next((c for c in candidates if c.resolve() != artifact.resolve() and up_to_date(c, digest) is not None), None)


def copy_artifact(source: Path, artifact: Path) -> None:
    """A verified artifact (up_to_date checked its files; it holds no symlinks) copied byte for byte."""
    import shutil

    from llmship.outputs import atomic_directory

    with atomic_directory(artifact) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, symlinks=True)


def select_targets(config, only: list[str] | None, platform: str | None) -> list[str]:
    from llmship.targets import default_targets

    if platform is not None:
        if platform not in config.platforms:
            raise ConfigError(f"unknown platform '{platform}'; configured: {', '.join(config.platforms)}")
        names = list(config.platforms[platform])
    else:
        names = list(config.targets) or default_targets()
    if not names:
        raise ConfigError("no targets to build: set `targets` in the config")
    if only:
        unknown = [t for t in only if t not in names]
        if unknown:
            raise ConfigError(f"--target {', '.join(unknown)} is not in this build's targets ({', '.join(names)})")
        names = [t for t in names if t in only]
    return names


def build(config, only: list[str] | None = None, baseline: str | None = None, debug: bool = False,
          platform: str | None = None) -> int:
    """Export and validate the targets into `config.out` (or its platform layout); 1 when a gate failed."""
    from llmship.config import write_resolved
    from llmship.adapters import load_source
    from llmship.models.sources import model_slug
    from llmship.outputs import BUILD_MARK, OutputError, check_build_dir
    from llmship.targets import resolve_target
    from llmship.validation.report import render_reports

    profiles = [resolve_target(config, n) for n in select_targets(config, only, platform)]  # all valid before work
    out = check_build_dir(config.out)
    root = out / PLATFORM_ROOTS[platform] / model_slug(config.model) if platform else out
    digest = source_digest(config.model)  # a missing source fails here, before anything is written
    plan = []  # (target, artifact, inputs key, report if up to date, twin to copy from)
    for target in profiles:
        artifact, key = root / target.name, inputs_sha256(config, target, digest)
        report = None if baseline else up_to_date(artifact, key)
        twin = None if report is not None or baseline else built_elsewhere(out, config.model, target.name, key, artifact)
        plan.append((target, artifact, key, report, twin))
    loaded = None
    if any(report is None and twin is None for *_, report, twin in plan):
        say(f"loading {config.model}")
        loaded = load_source(config.model, config.adapters)
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_resolved(config, profiles, out / BUILD_MARK)
    except OSError as exc:
        raise OutputError(f"cannot write to output directory {root}: {exc.strerror or exc}") from None
    reports, times = {}, {}  # target -> (export s, validate s); None where the step did not run
    started = time.perf_counter()
    for i, (target, artifact, key, report, twin) in enumerate(plan, 1):
        step = f"[{i}/{len(plan)}] {target.name}"
        if report is not None:
            say(f"{step}: up to date ({'passed' if report['passed'] else 'FAILED'} when validated)")
        elif twin is not None:
            say(f"{step}: same inputs as {twin}, copied")
            copy_artifact(twin, artifact)
            report = up_to_date(artifact, key)
        elif config.search.mode == "smallest":
            from llmship.search import smallest

            say(f"{step}: searching for the smallest passing artifact ({target.format})")
            report = smallest(loaded, target, config, artifact, debug=debug, inputs_sha256=key)
        else:
            say(f"{step}: exporting ({target.format}, weights {target.recipe.weights})")
            t0 = time.perf_counter()
            export_artifact(loaded, target, artifact, debug=debug, inputs_sha256=key, config=config)
            say(f"{step}: validating")
            t1 = time.perf_counter()
            report = validate_artifact(artifact, config, baseline=baseline and Path(baseline) / target.name, loaded=loaded)
            times[target.name] = (t1 - t0, time.perf_counter() - t1)
        reports[target.name] = report
    render_reports([root], root)
    if platform:
        write_index(out / PLATFORM_ROOTS[platform], platform)
    say(f"reports: {root / 'report.md'}, {root / 'report.html'}, {root / 'junit.xml'}")
    for name in reports:
        export_s, validate_s = times.get(name, (None, None))
        say(f"time: {name:<20} " + (f"export {export_s:7.1f} s  validate {validate_s:7.1f} s" if export_s is not None
                                    else "reused (up to date, copied or searched)"))
    say(f"time: total {time.perf_counter() - started:.1f} s for {len(reports)} target(s)")
    return 0 if all(r["passed"] for r in reports.values()) else 1


def write_index(platform_root: Path, platform: str) -> Path:
    """One index manifest for the app: every artifact under the platform root with its I/O contract,
    files (sha256, size) and validation verdict. Rewritten only when its content changes."""
    artifacts = []
    for manifest_path in sorted(platform_root.glob("*/*/manifest.json")):
        d = manifest_path.parent
        m = json.loads(manifest_path.read_text())
        report = json.loads((d / REPORT).read_text()) if (d / REPORT).is_file() else None
        artifacts.append({
            "model": d.parent.name,
            "target": m["target"],
            "path": d.relative_to(platform_root).as_posix(),
            "format": m["format"],
            "runtime": m["runtime"],
            "max_context": m["max_context"],
            "prefill_lengths": m["prefill_lengths"],
            "vocab_size": m["model"]["vocab_size"],
            "bos_token_id": m["model"]["bos_token_id"],
            "eos_token_ids": m["model"]["eos_token_ids"],
            "kv_cache": m["kv_cache"],
            "entry_points": m["entry_points"],
            "tokenizer": m["tokenizer"],
            "files": m["files"],
            "bytes": sum(f["bytes"] for f in m["files"].values()),
            "validation": None if report is None else {
                "passed": report["passed"], "executor": report["executor"],
                "failed_gates": [g["name"] for g in report["gates"] if not g["passed"]],
                "top1_agreement": report["parity"]["top1_agreement"], "kl_mean": report["parity"]["kl_mean"],
                "decode_tok_s": report["latency"]["decode_tok_s"]},
        })
    index = {"index_version": 1, "platform": platform, "artifacts": artifacts}
    path = platform_root / INDEX
    text = json.dumps(index, indent=2) + "\n"
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    return path
