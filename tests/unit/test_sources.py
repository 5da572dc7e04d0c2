"""Model sources: Hugging Face directories, GGUF files, builtins, and every kind of bad input."""
import json
import shutil

import pytest
import torch

from llmship.errors import ConfigError, ModelError
from llmship.models import build_decoder, load_model
from llmship.models.builtin import TINY_CONFIG
from tests.helpers import hf_logits, hf_model, loaded_from_hf, write_gguf


def save_hf_dir(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def test_hf_directory_round_trip(tmp_path):
    from llmship.models.builtin import byte_tokenizer

    hf = hf_model("qwen2-bias")
    path = save_hf_dir(hf, byte_tokenizer(hf.config.vocab_size), tmp_path / "qwen2")
    loaded = load_model(str(path))
    assert loaded.spec.model_type == "qwen2" and loaded.spec.qkv_bias and not loaded.spec.o_bias
    assert loaded.source == str(path.resolve())
    decoder = build_decoder(loaded, 64)
    ids = [1, 5, 9, 200, 3]
    assert (decoder.prefill(torch.tensor([ids]), 0) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_stories260k_loads_with_its_tokenizer(stories_dir):
    loaded = load_model(str(stories_dir))
    assert loaded.spec.num_params == sum(t.numel() for t in loaded.weights.values()) == 260_032
    assert loaded.tokenizer.encode("Once upon a time").ids[0] == loaded.spec.bos_token_id == 1


def test_builtin_tiny_is_seeded_and_awkward():
    a, b = load_model("builtin:tiny"), load_model("builtin:tiny")
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert a.spec.vocab_size % 8 != 0 and a.spec.num_heads // a.spec.num_kv_heads == 2
    assert a.tokenizer.get_vocab_size() == TINY_CONFIG["vocab_size"]


@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q8_0"])
def test_gguf_round_trip_unpermutes_llama_qk(tmp_path, quantized):
    hf = hf_model("smollm-like")
    original = loaded_from_hf(hf)
    path = tmp_path / "m.gguf"
    write_gguf(original, path, quantize_matrices=quantized)
    loaded = load_model(str(path))
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "rope_theta", "tie_word_embeddings")
    assert [getattr(loaded.spec, f) for f in fields] == [getattr(original.spec, f) for f in fields]
    assert loaded.spec.rms_norm_eps == pytest.approx(original.spec.rms_norm_eps)
    q = "model.layers.1.self_attn.q_proj.weight"
    tol = 0.02 * original.weights[q].abs().max().item() if quantized else 0.0
    assert (loaded.weights[q] - original.weights[q]).abs().max().item() <= tol
    ids = [1, 40, 41, 300, 7, 8]
    logits = build_decoder(loaded, 32).prefill(torch.tensor([ids]), 0)
    assert (logits - hf_logits(hf, ids)).abs().max().item() <= (0.15 if quantized else 1e-4)  # Q8_0 rounding vs a wrong layout (O(1))
    assert loaded.tokenizer.token_to_id("Ġt") == original.spec.vocab_size - 1  # the GGUF vocabulary, in order


# --- bad input: each is one clear ModelError (exit code 3) ------------------------------------------------

def _expect(source, match):
    with pytest.raises(ModelError, match=match) as info:
        load_model(str(source))
    assert info.value.exit_code == 3 and "\n" not in str(info.value)


def test_missing_directory(tmp_path):
    _expect(tmp_path / "nope", "not found")


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    _expect(tmp_path, "no weights")


def test_truncated_safetensors(tmp_path, stories_dir):
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(stories_dir / f, tmp_path / f)
    data = (stories_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect(tmp_path, "truncated or corrupt")


def test_corrupt_safetensors_header(tmp_path, stories_dir):
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(stories_dir / f, tmp_path / f)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _expect(tmp_path, "cannot read weights")


def test_truncated_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(loaded_from_hf(hf_model("llama-tied-gqa3")), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    _expect(path, "GGUF")


def test_pickle_only_checkpoint_is_refused_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    _expect(tmp_path, "arbitrary code")


@pytest.mark.parametrize("model_type,arch", [("gpt2", "GPT2LMHeadModel"), ("mixtral", "MixtralForCausalLM"), ("gemma2", "Gemma2ForCausalLM"), ("gemma3", "Gemma3ForConditionalGeneration")])
def test_unsupported_architecture_names_it_and_the_supported_list(tmp_path, model_type, arch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
    _expect(tmp_path, f"'{model_type}'.*supported: llama, mistral, qwen2, qwen3")


def test_weights_that_do_not_fit_the_config(tmp_path, stories_dir):
    shutil.copy(stories_dir / "model.safetensors", tmp_path)
    shutil.copy(stories_dir / "tokenizer.json", tmp_path)
    cfg = json.loads((stories_dir / "config.json").read_text())
    cfg["hidden_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _expect(tmp_path, "do not match config.json")


def test_offline_hub_id_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    _expect("someorg/some-model", "downloads no weights")


def test_unknown_builtin():
    with pytest.raises(ModelError, match="builtin:tiny"):
        load_model("builtin:gpt5")


def test_max_context_must_be_positive():
    with pytest.raises(ConfigError):
        build_decoder(load_model("builtin:tiny"), 0)
