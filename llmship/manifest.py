"""manifest.json (the artifact's I/O contract) and atomic artifact directories."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from llmship.errors import ConfigError, ModelError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_files(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict]:
    """sha256 and size of every file under root (an .mlpackage directory is walked too)."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude and not rel.startswith("report"):
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return files


def toolchain_versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("llmship", "torch", *packages):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def write_manifest(root: Path, body: dict) -> dict:
    """manifest.json: the body and every file's sha256 and size. No timestamp: the same inputs give the same bytes."""
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        **body,
        "files": describe_files(root),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{root} is not an llmship artifact directory (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary sibling of `final`; on success it replaces `final`, on any error it is removed.

    An interrupted or failed export leaves the previous artifact (or nothing) in place, never a half one.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    except OSError as exc:
        raise ConfigError(f"cannot write to output directory {final.parent}: {exc.strerror}") from None
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
