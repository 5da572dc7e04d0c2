"""LoRA adapters read from PEFT directories and merged into the canonical model, against transformers + peft's own
merge (the oracle); every bad adapter is a one-line error with exit 3 naming what is wrong."""
from __future__ import annotations

import re

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmship.adapters import load_source, merged, read_adapter
from llmship.config import Adapters, BuildConfig
from llmship.errors import ConfigError, ModelError
from llmship.models import build_decoder
from tests.helpers import ALL_PROJECTIONS, hf_from_loaded, hf_logits, peft_adapter
from tests.unit.test_decoder_parity import chunked_logits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CASES = {
    "r4-qv": dict(r=4, targets=("q_proj", "v_proj")),
    "r8-all": dict(r=8, targets=ALL_PROJECTIONS, alpha=16.0),
    "r8-all-rslora": dict(r=8, targets=ALL_PROJECTIONS, rslora=True, seed=1),
    "patterns": dict(r=4, targets=ALL_PROJECTIONS, rank_pattern={"down_proj": 8}, alpha_pattern={"v_proj": 32.0}, seed=2),
}


def source(name, stories_dir=None):
    from llmship.models import load_model

    return load_model("builtin:tiny" if name == "tiny" else str(stories_dir))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model", ["tiny", "stories"])
def test_merged_canonical_model_matches_transformers_and_peft(model, case, request, tmp_path):
    loaded = source(model, request.getfixturevalue("stories_dir") if model == "stories" else None)
    base = hf_from_loaded(loaded)
    oracle = peft_adapter(base, tmp_path / "ad", **CASES[case])
    ids = torch.randint(3, loaded.spec.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    adapter = read_adapter(tmp_path / "ad", "ad")
    ours = chunked_logits(build_decoder(merged(loaded, adapter), 64), ids, prefill=17)
    expected = hf_logits(oracle, ids)
    assert (ours - expected).abs().max().item() <= 1e-4
    # ... and the adapter moved the model (a merge that did nothing would also pass the line above otherwise)
    assert (expected - hf_logits(base, ids)).abs().max().item() > 1e-2
    n_layers = loaded.spec.num_layers
    assert len(adapter.lora) == n_layers * len(CASES[case]["targets"])


def test_the_base_weights_are_left_as_they_were(tiny, tmp_path):
    peft_adapter(hf_from_loaded(tiny), tmp_path / "ad")
    before = tiny.weights["model.layers.0.self_attn.q_proj.weight"].clone()
    out = merged(tiny, read_adapter(tmp_path / "ad", "ad"))
    assert torch.equal(tiny.weights["model.layers.0.self_attn.q_proj.weight"], before)
    assert not torch.equal(out.weights["model.layers.0.self_attn.q_proj.weight"], before)
    assert out.adapters["mode"] == "merge" and out.adapters["list"][0]["modules"] == 2 * tiny.spec.num_layers


@pytest.fixture
def adapter_dir(tiny, tmp_path):
    peft_adapter(hf_from_loaded(tiny), tmp_path / "ad")
    return tmp_path / "ad"


def edit_config(path, **fields):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(fields)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def rename_tensors(path, old, new):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file({k.replace(old, new): v for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))


@pytest.fixture
def other_base_adapter(tmp_path):
    """An adapter trained for another base (hidden size 48: builtin:tiny and stories260K have 64)."""
    from tests.helpers import hf_model

    peft_adapter(hf_model("llama-tied-gqa3"), tmp_path / "other")
    return tmp_path / "other"


def test_an_adapter_for_another_base_names_the_module(other_base_adapter):
    with pytest.raises(ModelError, match=r"model\.layers\.0\.self_attn\.q_proj is .* another base"):
        load_source("builtin:tiny", Adapters(list={"ad": str(other_base_adapter)}))


def test_a_target_module_the_base_lacks_names_the_module(adapter_dir, tiny):
    rename_tensors(adapter_dir, "layers.1.self_attn.v_proj", "layers.1.self_attn.x_proj")
    with pytest.raises(ModelError, match=r"model\.layers\.1\.self_attn\.x_proj is not a linear projection"):
        merged(tiny, read_adapter(adapter_dir, "ad"))


@pytest.mark.parametrize("fault, message", [
    (lambda p: edit_config(p, use_dora=True), "use_dora=True is not supported"),
    (lambda p: edit_config(p, bias="all"), "bias='all' is not supported"),
    (lambda p: edit_config(p, peft_type="IA3"), "peft_type 'IA3'"),
    (lambda p: edit_config(p, r=0), "r must be a positive number"),
    (lambda p: edit_config(p, r=8), "has rank 4 but adapter_config.json says r=8"),
    (lambda p: (p / "adapter_config.json").write_text("{not json"), "is not valid JSON"),
    (lambda p: (p / "adapter_config.json").unlink(), "has no adapter_config.json"),
    (lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"), "only pickle weights"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\0" * 10), "cannot read adapter weights"),
    (lambda p: rename_tensors(p, "q_proj.lora_B", "q_proj.lora_C"), "is not a LoRA A/B matrix"),
    (lambda p: save_file({k: v for k, v in load_file(str(p / "adapter_model.safetensors")).items() if "q_proj.lora_B" not in k},
                         str(p / "adapter_model.safetensors")), "has lora_A without its partner"),
])
def test_a_bad_adapter_is_a_one_line_error(adapter_dir, fault, message):
    fault(adapter_dir)
    with pytest.raises(ModelError, match=message):
        read_adapter(adapter_dir, "ad")


def test_the_cli_says_it_in_one_line_with_exit_3_and_writes_nothing(other_base_adapter, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "llmship", "export", "--model", "builtin:tiny", "--target", "pytorch-fp32",
                           "--out", str(out), "--adapter", str(other_base_adapter)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "q_proj" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_merge_takes_one_adapter_and_separate_is_refused_where_not_held(tmp_path):
    from llmship.targets import resolve_target

    with pytest.raises(ValueError, match="mode merge folds one adapter"):
        Adapters(list={"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="adapter name"):
        Adapters(list={"../a": "x"})
    config = BuildConfig(adapters=Adapters(mode="separate", list={"a": "x", "b": "y"}))
    with pytest.raises(ConfigError, match=r"adapters.mode separate: .* pytorch \(pytorch-fp32\)"):
        resolve_target(config, "pytorch-fp32")  # the reference format: no runtime mechanism to write
    assert resolve_target(config, "executorch-8da4w").name == "executorch-8da4w"  # ExecuTorch holds it (methods)
    assert resolve_target(config, "onnx-fp32").name == "onnx-fp32"  # ONNX Runtime holds it (.onnx_adapter files)
    assert resolve_target(config, "coreml-int4").name == "coreml-int4"  # Core ML holds it (multifunction)
    assert resolve_target(config, "litert-int8").name == "litert-int8"  # LiteRT holds it (signatures)
    with pytest.raises(ValueError, match="case-insensitive"):
        Adapters(mode="separate", list={"Chat": "x", "chat": "y"})
    assert sorted(Adapters(mode="separate", list={"a-b": "x", "a_b": "y"}).list) == ["a-b", "a_b"]  # two files


def test_targets_lists_the_adapter_modes(capsys):
    from llmship import cli

    assert cli.main(["targets"]) == 0
    out = capsys.readouterr().out
    assert out.count("adapters: merge") == out.count(" gates: ")
    separate = out.count("adapters: merge, separate")
    held = len(re.findall(r"^(?:onnx|coreml|litert|executorch)-", out, re.M))
    assert separate == held and re.search(r"^pytorch-", out, re.M)  # separate on the four device runtimes, not the reference


@pytest.mark.parametrize("mode", ["merge", "separate"])
def test_a_lora_on_phi3s_fused_projections_is_split_onto_the_canonical_ones(mode, tmp_path):
    from llmship.adapters import separate
    from llmship.adapters.branch import with_branches
    from tests.helpers import hf_model, loaded_from_hf

    hf = hf_model("phi4mini-partial-longrope")
    loaded = loaded_from_hf(hf)
    oracle = peft_adapter(hf, tmp_path / "ad", r=4, targets=("qkv_proj", "gate_up_proj", "o_proj", "down_proj"))
    adapter = read_adapter(tmp_path / "ad", "ad")
    assert len(adapter.lora) == 2 * 4 and any(m.endswith("qkv_proj") for m in adapter.lora)
    ids = torch.randint(3, loaded.spec.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    if mode == "merge":
        decoder = build_decoder(merged(loaded, adapter), 64)
    else:
        carried = separate(loaded, [adapter], "fp32")
        (fitted,) = carried.lora
        assert sorted({m.rsplit(".", 1)[1] for m in fitted.lora}) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                                     "up_proj", "v_proj"]
        decoder = with_branches(build_decoder(carried, 64), fitted, "fp32")
    ours = chunked_logits(decoder, ids, prefill=17)
    assert (ours - hf_logits(oracle, ids)).abs().max().item() <= 1e-4
    assert (hf_logits(oracle, ids) - hf_logits(hf, ids)).abs().max().item() > 1e-2


def test_an_adapter_passed_as_inputs_computes_what_its_stored_branches_do(tiny, tmp_path):
    """adapters/inputs.py: each adapter's file, read back and padded to the largest rank (zeros where the file has no
    module), fed to the one decoder that takes adapters as inputs, gives the logits of the decoder with that adapter's
    stored branches (the compressed reference); with two ranks and two module sets, the padding is exercised."""
    from llmship.adapters import inputs as lora_inputs
    from llmship.adapters.branch import with_branches

    base = hf_from_loaded(tiny)
    peft_adapter(base, tmp_path / "qv", r=4, alpha=4.0)
    peft_adapter(base, tmp_path / "all", r=8, targets=ALL_PROJECTIONS, alpha=16.0, seed=1)
    loaded = load_source("builtin:tiny", Adapters(mode="separate", list={"qv": str(tmp_path / "qv"), "all": str(tmp_path / "all")}))
    slots = lora_inputs.slots(build_decoder(loaded, 64), loaded.lora)
    assert {s.rank for s in slots} == {8} and len(slots) == 7 * tiny.spec.num_layers
    (tmp_path / "out").mkdir()
    files = lora_inputs.write_files(tmp_path / "out", loaded.lora, "fp16")
    tokens, pos = torch.randint(3, tiny.spec.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0)), torch.zeros(1, dtype=torch.long)
    for adapter in loaded.lora:
        fed = lora_inputs.read_inputs(tmp_path / "out" / files[adapter.name], [s.manifest() for s in slots])
        branched, feed = lora_inputs.with_inputs(build_decoder(loaded, 64), slots)
        model = lora_inputs.taking_inputs(branched, feed, slots)
        with torch.no_grad():
            got = model(tokens, pos, *(torch.from_numpy(fed[n]) for s in slots for n in s.inputs))
            want = with_branches(build_decoder(loaded, 64), adapter, "fp16")(tokens, pos)
        assert (got - want).abs().max().item() < 1e-5, adapter.name
        assert (got - build_decoder(loaded, 64)(tokens, pos)).abs().max().item() > 1e-3, adapter.name  # it does something


def test_an_adapter_file_that_does_not_fit_the_model_is_refused(tiny, tmp_path):
    from llmship.adapters import inputs as lora_inputs

    slot = lora_inputs.Slot("model.layers.0.self_attn.q_proj", 64, 64, 4).manifest()
    a, b = slot["file_names"]
    for tensors, message in (({a: torch.zeros(64, 8)}, "rank up to 4"), ({a: torch.zeros(32, 4)}, "shape"),
                             ({"model.layers.9.mlp.up_proj.lora_A": torch.zeros(64, 4)}, "adapts no module")):
        save_file(tensors, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ValueError, match=message):
            lora_inputs.read_inputs(tmp_path / "bad.safetensors", [slot])
    save_file({a: torch.ones(64, 2), b: torch.ones(2, 64)}, str(tmp_path / "ok.safetensors"))
    fed = lora_inputs.read_inputs(tmp_path / "ok.safetensors", [slot])
    assert fed[slot["a"]][:, :2].sum() == 128 and not fed[slot["a"]][:, 2:].any() and not fed[slot["b"]][2:].any()
