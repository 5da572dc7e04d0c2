"""Shared test helpers: random-weight configs of every supported family, built through transformers."""
from __future__ import annotations

import torch

# Awkward on purpose: odd GQA ratios, vocab sizes that are not multiples of 8, explicit head_dim.
FAMILY_CONFIGS = {
    "llama-tied-gqa3": dict(model_type="llama", vocab_size=331, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "llama3-rope-scaling": dict(model_type="llama", vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-attention-bias": dict(model_type="llama", vocab_size=203, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    "mistral": dict(model_type="mistral", vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, sliding_window=10),  # shorter than the tests' sequences
    "qwen2-bias": dict(model_type="qwen2", vocab_size=277, hidden_size=56, intermediate_size=112, num_hidden_layers=2,
                       num_attention_heads=7, num_key_value_heads=1, tie_word_embeddings=True,
                       use_sliding_window=True, sliding_window=13, max_window_layers=1),  # layer 0 global, layer 1 windowed
    "qwen3-qknorm-headdim": dict(model_type="qwen3", vocab_size=313, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False),
    "smollm3-nope": dict(model_type="smollm3", vocab_size=347, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, no_rope_layer_interval=2,
                         pad_token_id=0),
    # Phi-4-mini's shape of Phi-3: fused qkv/gate_up, a quarter of each head left unrotated, LongRoPE (short factors
    # inside the 128-token pretraining context, cos/sin scaled by sqrt(1 + ln 8 / ln 128)), tied head, GQA 3.
    "phi4mini-partial-longrope": dict(model_type="phi3", vocab_size=317, hidden_size=96, intermediate_size=80,
                                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                      tie_word_embeddings=True, partial_rotary_factor=0.75, max_position_embeddings=1024,
                                      original_max_position_embeddings=128, pad_token_id=0,
                                      rope_scaling={"type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 5.0],
                                                    "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}),
    # Gemma 3's text model: local (window 10) and global layers with a RoPE base each (the global one linearly scaled),
    # q/k norms, four (1 + w) norms per block, GeGLU, embedding times sqrt(hidden), a softmax scale of 24 ** -0.5 where
    # head_dim (32, not hidden / heads) would give 32 ** -0.5; GQA 3, tied head.
    "gemma3-local-global": dict(model_type="gemma3_text", vocab_size=307, hidden_size=96, intermediate_size=128,
                                num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                                query_pre_attn_scalar=24, sliding_window=10, tie_word_embeddings=True, pad_token_id=0,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                 "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 1000000.0}}),
    "smollm-like": dict(model_type="llama", vocab_size=389, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=100000.0),
}


def hf_model(name: str, seed: int = 0):
    """A transformers model with seeded random weights (peaked enough that argmax is never a near-tie)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(FAMILY_CONFIGS[name])
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("max_position_embeddings", 256)
    config = AutoConfig.for_model(model_type, rms_norm_eps=1e-5, initializer_range=0.08, bos_token_id=1, eos_token_id=2,
                                  **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    offset = 0.0 if model_type == "gemma3_text" else 1.0  # Gemma stores its norm weights minus 1
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(offset + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def loaded_from_hf(model, source: str = "test"):
    from llmship.models.builtin import byte_tokenizer
    from llmship.models.loaded import LoadedModel
    from llmship.models.weights import check_weights
    from llmship.models.spec import spec_from_config

    config = model.config.to_dict()
    spec = spec_from_config(config)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    check_weights(spec, weights, source)
    return LoadedModel(source, config, spec, weights, byte_tokenizer(spec.vocab_size))


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
    return out[0, len(prompt):].tolist()


def llama_cpp_permute(w, n_head: int):
    """llama.cpp's converter layout for llama q/k rows (interleaved rope pairs); what a GGUF holds."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(loaded, path, quantize_matrices: bool = False):
    """Write `loaded` as a llama-architecture GGUF the way llama.cpp's converter lays it out."""
    import gguf
    import numpy as np

    spec = loaded.spec
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(spec.num_layers)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_vocab_size(spec.vocab_size)
    vocab = loaded.tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens[-1] = "Ġt"  # the target of the one merge below
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["Ġ t"])  # one merge: the GPT-2 converter needs a non-empty list
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for name, t in loaded.weights.items():
        a = t.numpy().astype(np.float32)
        if name in names:
            gname = names[name]
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            gname = f"blk.{layer}.{per_layer[rest]}"
        if gname.endswith("attn_q.weight"):
            a = llama_cpp_permute(a, spec.num_heads)
        elif gname.endswith("attn_k.weight"):
            a = llama_cpp_permute(a, spec.num_kv_heads)
        if quantize_matrices and a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_from_loaded(loaded):
    """transformers' own model on a loaded source's weights (the oracle for a source llmship built itself)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(loaded.config)
    config = AutoConfig.for_model(config.pop("model_type"), **{k: v for k, v in config.items() if k not in ("architectures",)})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(loaded.weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if loaded.spec.tie_word_embeddings:
        model.tie_weights()
    return model


def peft_adapter(model, out_dir, r: int = 4, targets=("q_proj", "v_proj"), seed: int = 0, alpha: float = 8.0,
                 rslora: bool = False, rank_pattern=None, alpha_pattern=None):
    """A PEFT LoRA adapter for `model` written with the `peft` library (seeded, non-zero A and B), and transformers +
    peft's merged model (the oracle). `model` is left as it was."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, use_rslora=rslora,
                        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():  # B large enough that the adapter moves the logits well above kernel rounding
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(str(out_dir))
    return peft_model.merge_and_unload().eval()


def runtime_marks(target: str, full: bool = False) -> list:
    """The marker of the runtime a target (or a runtime name) needs, none for pytorch, plus `full` when the case is
    make test-full's only."""
    import pytest

    runtime = target.split("-")[0]
    return ([] if runtime == "pytorch" else [getattr(pytest.mark, runtime)]) + ([pytest.mark.full] if full else [])


def target_params(names, keep=()) -> list:
    """pytest params of target names, each marked with its runtime; those not in `keep` run in make test-full only."""
    import pytest

    return [pytest.param(n, marks=runtime_marks(n, full=n not in keep)) for n in names]
