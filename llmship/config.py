"""Configuration as data: YAML -> pydantic, unknown keys rejected, `--set a.b=c` merged before validation."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmship.errors import ConfigError

Precision = Literal["fp32", "fp16", "int8", "int4", "pal4"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(Strict):
    """A per-module rule: modules whose name matches `match` (a regular expression searched in names such as
    `model.layers.3.mlp.down_proj`, `model.embed_tokens`, `lm_head`) get these settings. Only the fields a rule
    sets apply (`group_size: null` set explicitly means the runtime's default: per output channel for int8 where
    the runtime has it, its default block for int4); later rules override earlier ones."""

    match: str
    weights: Literal["fp32", "fp16", "int8", "int4", "pal4"] | None = None
    group_size: int | None = Field(default=None, gt=0)
    symmetric: bool | None = None

    @field_validator("match")
    @classmethod
    def _compiles(cls, v):
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"match {v!r} is not a regular expression: {exc}") from None
        return v


class Budget(Strict):
    """A size the artifact must fit: `bytes` for the whole artifact, or `bytes_per_param`. The compression stage picks
    each matrix's grid (among the runtime's 4-bit groupings, 8-bit and float) to minimise the summed sensitivity."""

    bytes: float | None = Field(default=None, gt=0)
    bytes_per_param: float | None = Field(default=None, gt=0)
    sensitivity_tokens: int = Field(default=256, gt=1, le=8192)  # calibration tokens the sensitivities are measured on
    # bytes the format adds to the matrices (graph, metadata): reserved out of `bytes` (`--smallest` measures it)
    overhead_bytes: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one(self):
        if (self.bytes is None) == (self.bytes_per_param is None):
            raise ValueError("recipe.budget needs exactly one of bytes and bytes_per_param")
        return self


class Recipe(Strict):
    """What a target's quantization does: the grid of every weight (recipe-wide fields, then per-module `rules`)
    and the algorithm that puts the weights on it. Each runtime says which grids it can hold (its exporter's
    `check`); the compression stage builds the weights on that grid and every exporter ships them as they are.
"""

    weights: Precision = "fp32"
    activations: Literal["fp32", "fp16", "int8"] = "fp32"  # int8 = dynamic per-token activation quantization
    group_size: int | None = Field(default=None, gt=0)  # block / group size for int4 and palettization
    embedding: Precision | Literal["same"] = "same"  # the embedding (and a tied head) precision
    compute: Literal["fp32", "fp16"] = "fp32"
    # The integer grid: True = symmetric (no zero point), False = asymmetric (zero points / offsets),
    # None = the runtime's own default (what its exporter documents). Runtimes say which they can hold.
    symmetric: bool | None = None
    # How weights are put on the grid: round-to-nearest, GPTQ (calibrated), or the source's own blocks (GGUF).
    algorithm: Literal["rtn", "gptq", "source"] = "rtn"
    rules: tuple[Rule, ...] = ()  # applied after a budget's allocation: a rule always wins
    budget: Budget | None = None

    @model_validator(mode="after")
    def _group_size_needs_blocks(self):
        if self.group_size is not None and self.weights not in ("int4", "pal4", "int8"):
            raise ValueError(f"recipe.group_size is set but recipe.weights is {self.weights}")
        return self


class Gates(Strict):
    """Limits a report is checked against; None means the gate is off."""

    max_abs_err: float | None = None
    cosine_min: float | None = None
    top1_agreement_min: float | None = Field(default=None, ge=0, le=1)  # on positions without a near-tie (below)
    # Positions where the reference's two best logits are closer than this are near-ties the recipe's rounding
    # can flip: excluded from the gated top-1 (the report keeps the raw figure and the count excluded).
    top1_tie_margin: float = Field(default=1e-3, ge=0)
    kl_mean_max: float | None = Field(default=None, ge=0)
    kl_p99_max: float | None = Field(default=None, ge=0)
    ppl_ratio_max: float | None = Field(default=None, ge=1)
    greedy_match_min: float | None = Field(default=None, ge=0, le=1)  # fraction of greedy tokens that match
    # Conversion: the artifact against the compressed reference (the record's weights and the runtime's activation
    # quantization in PyTorch). It measures the converter, not the recipe, so its limits are tight for every recipe.
    conversion_kl_mean_max: float | None = Field(default=None, ge=0)
    conversion_kl_p99_max: float | None = Field(default=None, ge=0)
    conversion_top1_agreement_min: float | None = Field(default=None, ge=0, le=1)
    # For recipes that quantize activations at run time: conversion KL / the noise floor (what kernel-rounding-sized
    # differences alone produce through the dynamic quantization; see llmship/compress/reference.py).
    conversion_floor_ratio_max: float | None = Field(default=None, gt=0)
    bytes_per_param_max: float | None = Field(default=None, gt=0)
    size_bytes_max: int | None = Field(default=None, gt=0)
    decode_tok_s_min: float | None = Field(default=None, gt=0)
    ttft_ms_max: float | None = Field(default=None, gt=0)
    # Regression against --baseline: allowed worsening in percent.
    regression_size_pct: float = Field(default=5.0, ge=0)
    # 60%: 5 runs of decode on stories260K here spread from 0.49x to 1.45x of their median (shared 2-core machine).
    regression_decode_pct: float = Field(default=60.0, ge=0)
    regression_kl_pct: float = Field(default=10.0, ge=0)


class TargetProfile(Strict):
    name: str
    description: str = ""
    format: str  # a key of the format registry (llmship/formats.py)
    runtime: str = ""  # the format's runtime; filled in from the registry
    recipe: Recipe = Recipe()
    kv_cache_dtype: Literal["fp32", "fp16"] = "fp32"
    # sliding-window layers hold ring buffers of window + max(prefill_lengths) - 1 rows; false: every layer max_context
    kv_cache_ring: bool = True
    max_context: int = Field(default=512, gt=0, le=131072)  # the static KV cache holds this many positions
    prefill_lengths: tuple[int, ...] = Field(default=(32, 128), max_length=16)
    threads: int = Field(default=2, gt=0, le=256)
    device: str = "mid-range phone CPU, 2 big cores"
    default: bool = False  # part of the default target set (`make run`, a config without `targets`)
    gates: Gates = Gates()

    @field_validator("name")
    @classmethod
    def _file_name_safe(cls, v):
        # A target name becomes a directory name under the output directory: nothing that climbs out or hides.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v) or ".." in v:
            raise ValueError(f"target name {v!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                             "or digit (it names a directory)")
        return v

    @model_validator(mode="after")
    def _known_format(self):
        from llmship.formats import FORMATS

        entry = FORMATS.get(self.format)
        if entry is None:
            raise ValueError(f"format: unknown format '{self.format}'; known formats: {', '.join(FORMATS)}")
        if self.runtime and self.runtime != entry.runtime:
            raise ValueError(f"runtime: format {self.format} runs on '{entry.runtime}', not '{self.runtime}'")
        if not self.runtime:
            object.__setattr__(self, "runtime", entry.runtime)
        return self

    @field_validator("prefill_lengths")
    @classmethod
    def _positive_sorted(cls, v):
        if not v or any(n <= 0 for n in v):
            raise ValueError("prefill_lengths must be a non-empty list of positive lengths")
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _fits_context(self):
        if max(self.prefill_lengths) > self.max_context:
            raise ValueError(f"prefill_lengths {list(self.prefill_lengths)} exceed max_context {self.max_context}")
        return self


class Calibration(Strict):
    """Tokens the compression stage learns from (GPTQ's Hessians). Default: sampled from the FP32 reference with
    their own seed, in separate sequences from the evaluation's, so they never share tokens."""

    text: str | None = None
    tokens: int = Field(default=2048, gt=0, le=1_000_000)
    seed: int = 1
    sequence_length: int = Field(default=128, gt=1, le=8192)


class Evaluation(Strict):
    tokens: int = Field(default=1024, gt=1, le=1_000_000)  # scored tokens (per text file), in windows
    window: int | None = Field(default=None, gt=1)  # tokens per window; default min(max_context, 256)
    decode_tokens: int = Field(default=16, ge=0)  # each window ends with this many decode steps
    # text file(s), each a domain reported on its own; default: windows sampled from the FP32 reference with `seed`
    text: str | tuple[str, ...] | None = None
    seed: int = 0
    prompts: tuple[str, ...] = Field(default=("Once upon a time",), min_length=1)
    greedy_tokens: int = Field(default=32, gt=0, le=100_000)
    latency_runs: int = Field(default=16, gt=0, le=100_000)  # decode steps timed after warm-up


class Search(Strict):
    """`search: smallest` (or `llmship build --smallest`): from each target's recipe, lower a size budget in steps,
    export and validate each, keep the smallest artifact whose gates all pass."""

    mode: Literal["none", "smallest"] = "none"
    step: float = Field(default=0.1, gt=0, lt=1)  # each step's budget: this fraction of the first artifact's bytes less
    max_steps: int = Field(default=8, gt=0, le=50)
    # then prune: each step removes FFN channels for this fraction of the model's parameters more (healed with
    # compression.heal), from the target's own recipe; 0: no pruning steps
    prune_step: float = Field(default=0.0, ge=0, lt=1)


class Adapters(Strict):
    """LoRA / PEFT adapters over the model (llmship/adapters/): `merge` folds the one listed adapter into the
    weights before compression and export; `separate` ships the base once plus one adapter per name, on the
    runtimes whose registry entry holds it."""

    mode: Literal["merge", "separate"] = "merge"
    list: dict[str, str] = {}  # name -> PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
    # separate mode: how the shipped A and B are stored; auto: fp32 beside fp32 weights (fp32-level parity), else
    # fp16 (QLoRA-style: half the bytes, parity then includes the fp16 rounding of the adapter)
    dtype: Literal["auto", "fp16", "fp32"] = "auto"

    @field_validator("list")
    @classmethod
    def _names(cls, v):
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) or ".." in name:
                raise ValueError(f"adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (it names a file)")
        files = {}  # each names a file adapters/<name>.<ext>: one per name on a case-insensitive disk too (macOS)
        for name in v:
            other = files.setdefault(name.lower(), name)
            if other != name:
                raise ValueError(f"adapter names {other!r} and {name!r} name the same file on a case-insensitive file "
                                 "system (macOS, Windows)")
        return v

    @model_validator(mode="after")
    def _one_to_merge(self):
        if self.mode == "merge" and len(self.list) > 1:
            raise ValueError(f"mode merge folds one adapter into the weights; {len(self.list)} are listed "
                             "(use mode separate to ship several)")
        return self


class Prune(Strict):
    """Structured pruning by measured importance on the calibration tokens (llmship/compress/structure.py)."""

    ffn: float = Field(default=0.0, ge=0, lt=1)  # fraction of every layer's FFN channels removed
    heads: float = Field(default=0.0, ge=0, lt=1)  # fraction of each KV group's query heads removed (at least one stays)
    layers: int = Field(default=0, ge=0)  # whole decoder layers removed (the least change to the residual stream)


class Share(Strict):
    """MobileLLM's block sharing: `pairs` adjacent pairs of layers (the cheapest by measured KL) run one block."""

    pairs: int = Field(default=0, ge=0)


class Heal(Strict):
    """Distillation of the pruned student against the FP32 model on the calibration tokens (fixed seed, CPU)."""

    steps: int = Field(default=0, ge=0, le=100_000)
    # calibration tokens importance and healing learn from (sampled like calibration.tokens, or that text's last ones)
    tokens: int = Field(default=8192, gt=0, le=1_000_000)
    lr: float = Field(default=2e-4, gt=0, le=1)  # AdamW peak learning rate (cosine decay, 10% warm-up)
    batch: int = Field(default=4, gt=0, le=256)  # calibration sequences per step
    ce_weight: float = Field(default=0.1, ge=0, le=1)  # the rest of the loss is KL(teacher || student)


class Compression(Strict):
    """Structural compression before quantization: prune, heal, then each target's recipe quantizes the student.
    The FP32 reference stays the original model; the healed student is the compressed reference's starting point."""

    prune: Prune = Prune()
    share: Share = Share()
    heal: Heal = Heal()

    @property
    def active(self) -> bool:
        return self.prune.ffn > 0 or self.prune.heads > 0 or self.prune.layers > 0 or self.share.pairs > 0



class BuildConfig(Strict):
    model: str = "builtin:smollm2-135m"
    adapters: Adapters = Adapters()
    compression: Compression = Compression()
    targets: tuple[str, ...] = ()
    out: str = "dist"
    evaluation: Evaluation = Evaluation()
    calibration: Calibration = Calibration()
    search: Search = Search()
    overrides: dict[str, dict[str, Any]] = {}  # target name -> fields of its profile to override
    # `llmship build --platform NAME` builds these target sets into the app-ready layouts.
    platforms: dict[Literal["android", "ios"], tuple[str, ...]] = {
        "android": ("executorch-8da4w", "litert-int8", "onnx-int4"),
        "ios": ("coreml-int4", "executorch-8da4w"),
    }

    @model_validator(mode="after")
    def _healing_something(self):
        if self.compression.heal.steps and not self.compression.active and not self.search.prune_step:
            raise ValueError("compression.heal.steps is set but nothing is pruned or shared (compression.prune, "
                             "compression.share, search.prune_step)")
        return self


def parse_set(items: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML scalars/lists."""
    import yaml

    merged: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = merged
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"--set {item}: empty key segment in '{key}'")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parts[:i + 1])} is already set to a value, not a mapping")
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ConfigError(f"--set {item}: {key} already holds keys set by another --set")
        node[parts[-1]] = value
    return merged


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validation_message(exc: ValidationError, where: str) -> str:
    errs = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        errs.append(f"{loc}: {msg}" if loc else msg)
    return f"{where}: " + "; ".join(errs)


def load_config(path: str | Path | None, sets: list[str] | None = None) -> BuildConfig:
    import yaml

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = deep_merge(data, parse_set(sets or []))
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, str(path or "config"))) from None


def write_resolved(config: BuildConfig, targets: list[TargetProfile], path: Path) -> None:
    import yaml

    from llmship.manifest import write_text_atomic

    data = config.model_dump(mode="json")
    data["resolved_targets"] = {t.name: t.model_dump(mode="json") for t in targets}
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
