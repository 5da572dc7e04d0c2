"""One error family; each kind carries the exit code of the command-line contract (docs/architecture.md).

Every error a user can cause or meet is one of these classes, chosen where it is raised; no code changes an
error's type or exit code after the fact.
"""
from __future__ import annotations

import importlib


class LlmshipError(Exception):
    """Base of every error a user can cause or meet. `exit_code` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class GateFailed(LlmshipError):
    """A parity, size, latency or regression gate failed (artifacts and reports are still written)."""

    exit_code = 1


class ConfigError(LlmshipError):
    """Usage or configuration error: unknown key, unknown target, bad value."""

    exit_code = 2


class ModelError(LlmshipError):
    """The input model cannot be read or is not supported."""

    exit_code = 3


class ManifestError(ModelError):
    """An artifact's manifest.json (or report.json) is corrupt or incomplete; the message names the field."""


class ExportError(LlmshipError):
    """An export or conversion step failed; the message names the target and the stage."""

    exit_code = 4

    def __init__(self, target: str, stage: str, detail: str):
        super().__init__(f"{target}: {stage} failed: {detail}")
        self.target = target
        self.stage = stage


class StepFailed(LlmshipError):
    """A step run in a child process (latency measurement) failed for a reason that is not a user's error."""

    exit_code = 4


class RuntimeMissing(LlmshipError):
    """A required runtime or toolchain is not available on this machine."""

    exit_code = 5


class Terminated(BaseException):
    """SIGTERM (a CI runner cancelling a job, `kill`): unwinds like Ctrl-C, so temporary directories are removed.
    Not KeyboardInterrupt, which some converters treat specially. An exception raised by a signal handler can be
    swallowed when it lands inside a finalizer, so the request is also remembered (`termination_requested`) and
    checked before anything is committed."""


_TERMINATION = []


def request_termination(signum=None, frame=None):
    _TERMINATION.append(signum)
    raise Terminated


def termination_requested() -> bool:
    return bool(_TERMINATION)


def require(module: str, runtime: str, install: str):
    """Import a runtime's or converter's Python package, or raise RuntimeMissing (exit 5) saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeMissing(f"{runtime} is not installed ({exc}); install it with: {install}") from None


def error_for_exit_code(code: int, message: str) -> LlmshipError:
    """The error of the contract's exit `code`, for a child process's failure reported by its exit code."""
    kinds = {2: ConfigError, 3: ModelError, 5: RuntimeMissing}
    return kinds.get(code, StepFailed)(message)
