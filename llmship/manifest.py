"""manifest.json (the artifact's I/O contract), the files it lists, and their integrity.

Everything that reads an artifact goes through here: `read_manifest` checks the fields readers rely on
(a corrupt or incomplete manifest is a ManifestError naming the field), `artifact_file` turns a name from
the manifest into a path only when it is a regular file (or a package directory of regular files) inside
the artifact that `files` lists, and `check_integrity` re-hashes what ships.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from llmship.errors import ConfigError, ManifestError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
REPORT = "report.json"

# field path -> JSON type(s) every reader of a manifest relies on.
REQUIRED = {
    "target": str, "format": str, "runtime": str, "source": str, "threads": int, "target_profile": dict,
    "recipe": dict, "max_context": int, "prefill_lengths": list, "model": dict, "model.params": int,
    "model.vocab_size": int, "model.num_layers": int, "model.config": dict, "model.architecture": str,
    "model.eos_token_ids": list, "kv_cache": dict, "kv_cache.held_as": str, "kv_cache.dtype": str,
    "kv_cache.num_layers": int, "kv_cache.shape": list, "entry_points": dict,
    "entry_points.decode": dict, "entry_points.decode.file": str, "entry_points.decode.inputs": list,
    "entry_points.decode.outputs": list, "files": dict, "tokenizer": str,
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _artifact_entries(root: Path) -> list[Path]:
    """Every path under root, not following symlinks (a link is listed, never entered)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        out += [base / n for n in dirnames if (base / n).is_symlink()]
        out += [base / n for n in filenames]
    return sorted(out)


def is_own_file(rel: str) -> bool:
    """Files llmship writes beside the model that the manifest does not list: itself, reports, temporaries."""
    name = PurePosixPath(rel).name
    return rel == MANIFEST or (rel.startswith("report") and "/" not in rel) or name.startswith(".")


def describe_files(root: Path) -> dict[str, dict]:
    """sha256 and size of every regular file under root (an .mlpackage directory is walked too).
    Symlinks are listed with `"symlink": true` and never followed or hashed."""
    files = {}
    for p in _artifact_entries(root):
        rel = p.relative_to(root).as_posix()
        if is_own_file(rel):
            continue
        if p.is_symlink():
            files[rel] = {"bytes": 0, "sha256": "", "symlink": True}
        elif p.is_file():
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return files


def write_manifest(root: Path, body: dict) -> dict:
    """manifest.json: the body and every file's sha256 and size. No timestamp: the same inputs give the same bytes."""
    files = describe_files(root)
    links = [n for n, f in files.items() if f.get("symlink")]
    if links:
        raise ManifestError(f"{root}: an artifact holds regular files only, found symlink {links[0]}")
    manifest = {"manifest_version": MANIFEST_VERSION, **body, "files": files}
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _field(manifest: dict, dotted: str):
    node = manifest
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_manifest(manifest, where: str) -> dict:
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: must hold a JSON object, not a {type(manifest).__name__}")
    for dotted, kind in REQUIRED.items():
        value = _field(manifest, dotted)
        if value is None:
            raise ManifestError(f"{where}: field {dotted} is missing")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ManifestError(f"{where}: field {dotted} must be a {kind.__name__}, not {type(value).__name__}")
    prefill = [n for n in manifest["entry_points"] if n.startswith("prefill")]
    if not prefill:
        raise ManifestError(f"{where}: field entry_points.prefill is missing (no prefill entry point)")
    for name, f in manifest["files"].items():
        if not isinstance(f, dict) or not isinstance(f.get("sha256"), str) or not isinstance(f.get("bytes"), int):
            raise ManifestError(f"{where}: field files.{name} must be an object with sha256 and bytes")
        safe_relative(name, where)
    for name, ep in manifest["entry_points"].items():
        if not isinstance(ep, dict) or not isinstance(ep.get("file"), str):
            raise ManifestError(f"{where}: field entry_points.{name} must be an object with a file")
        rel = safe_relative(ep["file"], where)
        if rel not in manifest["files"] and not any(n.startswith(rel + "/") for n in manifest["files"]):
            raise ManifestError(f"{where}: field entry_points.{name}.file: {rel} is not listed in the manifest's files")
        for kind in ("inputs", "outputs"):
            tensors = ep.get(kind)
            if not isinstance(tensors, list) or not all(
                    isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("shape"), list) for t in tensors):
                raise ManifestError(f"{where}: field entry_points.{name}.{kind} must be a list of tensors with a name and shape")
    for key in ("params", "vocab_size", "num_layers"):
        if manifest["model"][key] < 1:
            raise ManifestError(f"{where}: field model.{key} must be positive")
    if manifest["max_context"] < 1 or not manifest["prefill_lengths"] or not all(
            isinstance(t, int) and 0 < t <= manifest["max_context"] for t in manifest["prefill_lengths"]):
        raise ManifestError(f"{where}: field prefill_lengths must be positive lengths within max_context")
    return manifest


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{root} is not an llmship artifact directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    return check_manifest(manifest, str(path))


def safe_relative(name: str, where: str) -> str:
    """A manifest-given file name that stays inside the artifact: relative, no '..', no backslashes."""
    p = PurePosixPath(name) if isinstance(name, str) else None
    if p is None or not name or p.is_absolute() or ".." in p.parts or "\\" in name or name.startswith("~"):
        raise ManifestError(f"{where}: file name {name!r} must be a relative path inside the artifact")
    return p.as_posix()


def artifact_file(root: str | Path, manifest: dict, name: str) -> Path:
    """The path of a file the manifest names (an entry point's model file, the tokenizer), when it is a regular
    file inside the artifact listed in `files` (or a package directory whose every file is listed)."""
    root = Path(root)
    rel = safe_relative(name, f"{root / MANIFEST}")
    path = root / rel
    listed = manifest["files"]
    if rel in listed:
        if path.is_symlink() or not path.is_file():
            raise ManifestError(f"{root}: {rel} is not a regular file inside the artifact")
        return path
    inside = [n for n in listed if n.startswith(rel + "/")]
    if inside and path.is_dir() and not path.is_symlink():
        for p in _artifact_entries(path):
            sub = p.relative_to(root).as_posix()
            if p.is_symlink() or (p.is_file() and sub not in listed):
                raise ManifestError(f"{root}: {sub} inside {rel} is a symlink or not listed in the manifest's files")
        return path
    raise ManifestError(f"{root}: {rel} is named by the manifest but not listed in its files")


def check_integrity(artifact_dir: Path, manifest: dict) -> dict:
    """Recompute every file's sha256: the report must describe the file that ships, as shipped. A listed file
    that is missing, changed or a symlink is mismatched, and so is a file present but not listed."""
    actual = describe_files(artifact_dir)
    expected = manifest["files"]
    mismatched = {n for n in expected if n not in actual or actual[n].get("symlink") or actual[n]["sha256"] != expected[n]["sha256"]}
    mismatched |= {n for n in actual if n not in expected}
    return {"files": {n: f for n, f in actual.items() if not f.get("symlink")}, "mismatched": sorted(mismatched)}


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary sibling renamed over `path`; on failure the temporary is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
