"""Where llmship writes: artifact directories that appear whole or not at all, and never over a user's files.

Rules (each one a defect that lost users' data before it existed):
- An output path is replaced only when it is an llmship artifact (a manifest.json llmship wrote, and nothing
  in the directory that the manifest does not list) or an empty directory. A regular file, a symlink, the
  current directory or one of its parents, or a directory holding anything else is refused (exit 2) before
  any work starts.
- A build directory (`llmship build --out DIR`) is marked by `llmship.resolved.yaml`; an existing non-empty
  directory without the mark is refused.
- One writer per output: an exclusive lock on `.<name>.lock` beside it. Temporary siblings
  (`.<name>.partial-*`, `.<name>.old-*`) are only made by the lock holder, so the next holder removes any a
  killed process left behind.
- The new directory gets the permissions the umask gives (not mkdtemp's 0700).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from llmship.errors import ConfigError, Terminated, termination_requested

BUILD_MARK = "llmship.resolved.yaml"


class OutputError(ConfigError):
    """An output location llmship must not or cannot write (exit 2); nothing was written."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_artifact_dir(path: Path) -> bool:
    """An artifact llmship wrote: a manifest of ours, and no file beside it that the manifest does not list."""
    from llmship.manifest import MANIFEST, describe_files

    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(manifest, dict) or "manifest_version" not in manifest or not isinstance(manifest.get("files"), dict):
        return False
    present = describe_files(path)
    return all(name in manifest["files"] and not f.get("symlink") for name, f in present.items())


def check_output_dir(final: str | Path) -> Path:
    """Refuse (exit 2) an artifact output that would destroy what llmship did not make; returns the path."""
    final = Path(final)
    if final.is_symlink():
        raise OutputError(f"--out {final} is a symlink; llmship writes artifacts only to a real directory path")
    resolved = final.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path(resolved.anchor):
        raise OutputError(f"--out {final} is the current directory or one of its parents; name a new directory for the artifact")
    if final.exists():
        if not final.is_dir():
            raise OutputError(f"--out {final} exists and is not a directory; llmship will not replace it")
        if any(final.iterdir()) and not is_artifact_dir(final):
            raise OutputError(f"--out {final} exists and is not an llmship artifact (it holds files a manifest does not "
                              "list); llmship will not replace it: choose a new directory or remove it yourself")
    return final


def check_build_dir(out: str | Path) -> Path:
    """A build output directory: new, empty, or one an earlier build marked."""
    out = Path(out)
    if out.is_symlink() and not out.is_dir():
        raise OutputError(f"--out {out} is a symlink to nothing")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / BUILD_MARK).is_file():
        raise OutputError(f"--out {out} is a non-empty directory that no llmship build made (no {BUILD_MARK}); "
                          "choose a new directory so that none of its files is overwritten")
    return out


@contextlib.contextmanager
def output_lock(final: Path):
    """Hold an exclusive lock on `final`'s lock file; a second writer is refused at once (exit 2)."""
    lock = final.parent / f".{final.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"another llmship process is writing {final}; wait for it or use another --out") from None
            raise
        try:  # the file may have been unlinked by the previous holder between our open and flock: retry
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def remove_leftovers(final: Path) -> list[Path]:
    """Temporary siblings of `final` from a process that died (only a lock holder creates them)."""
    gone = []
    for p in final.parent.glob(f".{final.name}.*"):
        if p.name.startswith((f".{final.name}.partial-", f".{final.name}.old-")) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary sibling of `final`; on success it replaces `final`, on any error it is removed.

    An interrupted or failed export leaves the previous artifact (or nothing) in place, never a half one.
    """
    final = Path(final)
    check_output_dir(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write to output directory {final.parent}: {exc.strerror}") from None
    if not os.access(final.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to output directory {final.parent}: permission denied")
    with output_lock(final):
        remove_leftovers(final)
        check_output_dir(final)  # again under the lock: another process may have written it meanwhile
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
            os.chmod(tmp, 0o777 & ~_umask())
        except OSError as exc:
            raise OutputError(f"cannot write to output directory {final.parent}: {exc.strerror}") from None
        try:
            yield tmp
            if termination_requested():  # SIGTERM arrived and its exception was lost: do not commit
                raise Terminated
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


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` then rename onto `path`, so a reader, or another build sharing the cache, sees the whole file or
    none. The temporary name is the process's own (two builds writing one entry at once must not share it) and keeps
    the suffix (numpy appends `.npz` to a name without it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
