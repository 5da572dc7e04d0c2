"""Target profiles as data: every `*.yaml` here holds a list of profiles (one file per format)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from llmship.errors import ConfigError

_DIR = Path(__file__).parent


@lru_cache(maxsize=1)
def all_profiles() -> dict:
    import yaml
    from pydantic import ValidationError

    from llmship.config import TargetProfile, validation_message

    profiles = {}
    for f in sorted(_DIR.glob("*.yaml")):
        for entry in yaml.safe_load(f.read_text()) or []:
            try:
                profile = TargetProfile.model_validate(entry)
            except ValidationError as exc:
                raise ConfigError(validation_message(exc, f"built-in profile in {f.name}")) from None
            profiles[profile.name] = profile
    return profiles


def get_profile(name: str):
    profiles = all_profiles()
    if name not in profiles:
        known = ", ".join(profiles) or "none"
        raise ConfigError(f"unknown target '{name}'; known targets: {known}")
    return profiles[name]


def default_targets() -> list[str]:
    """The profiles marked `default: true`: one per runtime."""
    return [p.name for p in all_profiles().values() if p.default]
