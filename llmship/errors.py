"""One error family; each kind carries the exit code of DESIGN.md's contract."""
from __future__ import annotations


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


class ExportError(LlmshipError):
    """An export or conversion step failed; the message names the target and the stage."""

    exit_code = 4

    def __init__(self, target: str, stage: str, detail: str):
        super().__init__(f"{target}: {stage} failed: {detail}")
        self.target = target
        self.stage = stage


class RuntimeMissing(LlmshipError):
    """A required runtime is not available on this machine."""

    exit_code = 5
