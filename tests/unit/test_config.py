"""Config: YAML -> pydantic with unknown keys rejected, --set overrides, target resolution."""
import pytest
import yaml

from llmship.config import BuildConfig, load_config, parse_set, write_resolved
from llmship.targets import resolve_target
from llmship.errors import ConfigError
from llmship.targets import all_profiles, get_profile


def write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_unknown_key_is_rejected_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="evaluation.tokenz: unknown key") as info:
        load_config(write(tmp_path, {"evaluation": {"tokenz": 3}}))
    assert info.value.exit_code == 2


def test_bad_value_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="evaluation.tokens"):
        load_config(write(tmp_path, {"evaluation": {"tokens": -5}}))


def test_set_overrides_merge_before_validation(tmp_path):
    cfg = load_config(write(tmp_path, {"evaluation": {"tokens": 64, "seed": 3}}), ["evaluation.tokens=32", "out=/tmp/x"])
    assert (cfg.evaluation.tokens, cfg.evaluation.seed, cfg.out) == (32, 3, "/tmp/x")
    with pytest.raises(ConfigError, match="evaluation.bogus: unknown key"):
        load_config(None, ["evaluation.bogus=1"])


def test_parse_set_reads_yaml_scalars_and_lists():
    assert parse_set(["a.b=1", "c=[x, y]", "d=0.5", "e=text"]) == {"a": {"b": 1}, "c": ["x", "y"], "d": 0.5, "e": "text"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["novalue"])


def test_target_overrides_are_validated_with_the_profile():
    cfg = BuildConfig(overrides={"pytorch-fp32": {"max_context": 256, "gates": {"kl_mean_max": 0.5}}})
    t = resolve_target(cfg, "pytorch-fp32")
    assert t.max_context == 256 and t.gates.kl_mean_max == 0.5 and t.gates.top1_agreement_min == 1.0
    with pytest.raises(ConfigError, match="overrides.pytorch-fp32: prefill_lengths"):
        resolve_target(BuildConfig(overrides={"pytorch-fp32": {"max_context": 16}}), "pytorch-fp32")
    with pytest.raises(ConfigError, match="gates.top1_agreement_min"):
        resolve_target(BuildConfig(overrides={"pytorch-fp32": {"gates": {"top1_agreement_min": 2}}}), "pytorch-fp32")


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown target 'onnx-int3'.*pytorch-fp32") as info:
        get_profile("onnx-int3")
    assert info.value.exit_code == 2


def test_builtin_profiles_are_valid_and_named_runtime_precision():
    profiles = all_profiles()
    assert "pytorch-fp32" in profiles
    for name, p in profiles.items():
        assert name.count("-") >= 1 and p.max_context >= max(p.prefill_lengths)


def test_resolved_config_is_written(tmp_path):
    cfg = load_config(None, ["evaluation.tokens=40"])
    write_resolved(cfg, [get_profile("pytorch-fp32")], tmp_path / "r.yaml")
    data = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert data["evaluation"]["tokens"] == 40 and data["resolved_targets"]["pytorch-fp32"]["format"] == "pytorch"
    assert BuildConfig.model_validate({k: v for k, v in data.items() if k != "resolved_targets"}) == cfg


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
