"""Target profiles as data, and target resolution.

Every format in the registry (llmship/formats.py) names a YAML file of profiles (a list). A target is
resolved by applying a config's overrides to its profile, re-validating it, and asking the format's
exporter whether its runtime can hold it (`check`), so a bad override exits 2 before any model is loaded.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import ValidationError

from llmship.config import BuildConfig, TargetProfile, deep_merge, validation_message
from llmship.errors import ConfigError
from llmship.formats import exporter, profile_files


@lru_cache(maxsize=8)
def _load(files: tuple[Path, ...]) -> dict[str, TargetProfile]:
    import yaml

    profiles = {}
    for f in files:
        for entry in yaml.safe_load(f.read_text()) or []:
            try:
                profile = TargetProfile.model_validate(entry)
            except ValidationError as exc:
                raise ConfigError(validation_message(exc, f"built-in profile in {f.name}")) from None
            profiles[profile.name] = profile
    return profiles


def all_profiles() -> dict[str, TargetProfile]:
    """Every registered format's profiles, by name."""
    return _load(tuple(profile_files()))


def get_profile(name: str) -> TargetProfile:
    profiles = all_profiles()
    if name not in profiles:
        known = ", ".join(profiles) or "none"
        raise ConfigError(f"unknown target '{name}'; known targets: {known}")
    return profiles[name]


def default_targets() -> list[str]:
    """The profiles marked `default: true`: one per runtime."""
    return [p.name for p in all_profiles().values() if p.default]


def check_target(target: TargetProfile, spec=None) -> TargetProfile:
    """Ask the target's exporter whether its runtime can hold the target (and, given a spec, this model)."""
    exporter(target.format).check(target, spec)
    return target


def _validated(data: dict, where: str) -> TargetProfile:
    try:
        return TargetProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, where)) from None


def resolve_target(config: BuildConfig, name: str) -> TargetProfile:
    """A built-in profile with the config's overrides for it applied, re-validated and checked by its runtime."""
    base = get_profile(name)
    extra = config.overrides.get(name, {})
    target = _validated(deep_merge(base.model_dump(), extra), f"overrides.{name}") if extra else base
    if target.name != name:
        raise ConfigError(f"overrides.{name}.name: a target cannot be renamed by an override (got '{target.name}')")
    check_adapters(config, target)
    return check_target(target)


def check_adapters(config: BuildConfig, target: TargetProfile) -> None:
    """The adapters' mode is one the target's runtime holds (its registry entry's `adapter_modes`)."""
    from llmship.formats import get_format

    modes = get_format(target.format).adapter_modes
    if config.adapters.list and config.adapters.mode not in modes:
        raise ConfigError(f"adapters.mode {config.adapters.mode}: llmship does not ship separate adapters on "
                          f"{target.runtime} ({target.name}) yet; it holds {', '.join(modes)} (see `llmship targets`)")


# What a validate-time override may change: the gates, and evaluation-time threads. The rest describes how
# the artifact was built; changing it at validation would label a report with what was not built.
VALIDATE_OVERRIDABLE = ("gates", "threads", "description")


def target_from_manifest(manifest: dict, config: BuildConfig) -> TargetProfile:
    """The profile the artifact was built with, with the config's gate overrides for it applied."""
    name = manifest["target"]
    built = _validated(manifest["target_profile"], f"{name}: manifest target_profile")
    extra = config.overrides.get(name, {})
    target = _validated(deep_merge(manifest["target_profile"], extra), f"overrides.{name}")
    # The same config that built the artifact may be passed again (llmship build does): only a change counts.
    changed = sorted(k for k in type(target).model_fields
                     if k not in VALIDATE_OVERRIDABLE and getattr(target, k) != getattr(built, k))
    if changed:
        raise ConfigError(f"overrides.{name}.{changed[0]}: fixed when the artifact was built; at validation only "
                          f"{', '.join(VALIDATE_OVERRIDABLE)} can be overridden (rebuild to change the rest)")
    return target
