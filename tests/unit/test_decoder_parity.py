"""The canonical model against transformers' own model (the test oracle), for every supported family."""
import pytest
import torch

from llmship.errors import ConfigError
from llmship.models import build_decoder
from llmship.validation.evaluate import greedy
from llmship.validation.runners.reference import ReferenceRunner
from tests.helpers import FAMILY_CONFIGS, hf_greedy, hf_logits, hf_model, loaded_from_hf

MAX_CONTEXT = 96


def chunked_logits(decoder, ids, prefill):
    decoder.reset_cache()
    first = decoder.prefill(torch.tensor([ids[:prefill]]), 0)
    rest = [decoder.decode(t, i) for i, t in enumerate(ids[prefill:], start=prefill)]
    return torch.cat([first, torch.stack(rest)]) if rest else first


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_matches_transformers_prefill_then_decode(family):
    hf = hf_model(family)
    decoder = build_decoder(loaded_from_hf(hf), MAX_CONTEXT)
    ids = torch.randint(3, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = chunked_logits(decoder, ids, prefill=17)
    ref = hf_logits(hf, ids)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_greedy_tokens_match_transformers(family):
    hf = hf_model(family, seed=3)
    runner = ReferenceRunner.from_decoder(build_decoder(loaded_from_hf(hf), MAX_CONTEXT))
    prompt = [1, 17, 42, 99, 5]
    assert greedy(runner, prompt, 32, chunk=4) == hf_greedy(hf, prompt, 32)


def test_tied_embedding_stays_one_tensor():
    decoder = build_decoder(loaded_from_hf(hf_model("llama-tied-gqa3")), MAX_CONTEXT)
    assert decoder.lm_head.weight is decoder.model.embed_tokens.weight
    names = [n for n, _ in decoder.named_parameters()]
    assert "lm_head.weight" not in names  # named_parameters de-duplicates shared tensors


def test_untied_head_is_its_own_tensor():
    decoder = build_decoder(loaded_from_hf(hf_model("qwen3-qknorm-headdim")), MAX_CONTEXT)
    assert decoder.lm_head.weight.data_ptr() != decoder.model.embed_tokens.weight.data_ptr()


def test_several_prefill_chunks_equal_one_prefill():
    decoder = build_decoder(loaded_from_hf(hf_model("smollm-like")), MAX_CONTEXT)
    ids = list(range(5, 55))
    one = decoder.prefill(torch.tensor([ids]), 0)
    decoder.reset_cache()
    parts = [decoder.prefill(torch.tensor([ids[s:s + 16]]), s) for s in range(0, len(ids), 16)]
    assert (torch.cat(parts) - one).abs().max().item() <= 1e-5
    # and decoding after either gives the same next logits
    after_chunks = decoder.decode(7, len(ids))
    decoder.reset_cache()
    decoder.prefill(torch.tensor([ids]), 0)
    assert (decoder.decode(7, len(ids)) - after_chunks).abs().max().item() <= 1e-5


def test_position_past_max_context_is_a_clear_error():
    decoder = build_decoder(loaded_from_hf(hf_model("llama-tied-gqa3")), 32)
    decoder.prefill(torch.tensor([[1] * 32]), 0)  # exactly fills the cache
    with pytest.raises(ConfigError, match="max_context 32"):
        decoder.decode(5, 32)
    with pytest.raises(ConfigError, match="do not fit"):
        decoder.prefill(torch.tensor([[1] * 10]), 25)


@pytest.mark.parametrize("family", ["mistral", "qwen2-bias"])
def test_a_sliding_window_shorter_than_the_context_is_applied_where_the_config_says(family):
    # The parity tests above run these families past their windows (10 and 13 positions); here the window is shown
    # to matter: the same weights with full attention are far from transformers.
    import dataclasses

    hf = hf_model(family)
    loaded = loaded_from_hf(hf)
    expected = {"mistral": (None, 10), "qwen2-bias": ((False, True), 13)}[family]
    assert (loaded.spec.sliding_layers, loaded.spec.sliding_window) == expected
    ids = torch.randint(3, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    full = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, sliding_window=None))
    assert (chunked_logits(build_decoder(full, MAX_CONTEXT), ids, prefill=17) - hf_logits(hf, ids)).abs().max().item() > 0.05


def test_which_layers_slide_comes_from_layer_types_or_the_familys_rule():
    from llmship.errors import ModelError
    from llmship.models.spec import spec_from_config

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=8)
    assert spec_from_config({**base, "model_type": "mistral"}).window_of(3) == 8
    assert spec_from_config({**base, "model_type": "llama"}).window_of(0) is None  # Llama has no window
    qwen2 = {**base, "model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 2}
    assert [spec_from_config(qwen2).window_of(i) for i in range(4)] == [None, None, 8, 8]
    assert spec_from_config({**qwen2, "use_sliding_window": False}).sliding_window is None
    smollm3 = {**base, "model_type": "smollm3", "use_sliding_window": True, "no_rope_layer_interval": 2}
    assert spec_from_config(smollm3).sliding_layers == (False, True, False, True)  # its NoPE layers
    types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert spec_from_config({**qwen2, "layer_types": types}).sliding_layers == (False, True, True, False)
    with pytest.raises(ModelError, match="layer_types must name sliding_attention or full_attention"):
        spec_from_config({**qwen2, "layer_types": ["full_attention"]})
    with pytest.raises(ModelError, match="sliding_window must be positive"):
        spec_from_config({**base, "model_type": "mistral", "sliding_window": 0})

def test_a_reference_scores_whole_windows_as_it_scores_chunks_and_decode_steps(tiny):
    """The references run each window as one forward pass (`whole_windows`); an artifact runs prefill chunks then
    decode steps. For the canonical model both give the same logits at every position, window after window."""
    import numpy as np

    from llmship.validation.evaluate import EvalPlan, Window, teacher_forced

    gen = torch.Generator().manual_seed(3)
    windows = tuple(Window(tuple(torch.randint(3, tiny.spec.vocab_size, (n,), generator=gen).tolist()), p)
                    for n, p in ((70, 54), (40, 40), (33, 1)))
    plan = EvalPlan(windows, 16, ((1, 2),), 4)
    runner = ReferenceRunner.from_decoder(build_decoder(tiny, MAX_CONTEXT), threads=1)
    stepwise, whole = teacher_forced(runner, plan), teacher_forced(runner, plan, whole_windows=True)
    assert stepwise.shape == whole.shape == (143, tiny.spec.vocab_size)
    assert np.abs(stepwise - whole).max() <= 1e-4


def test_smollm3_nope_layers_come_from_either_config_field():
    from llmship.errors import ModelError
    from llmship.models.spec import spec_from_config

    base = dict(model_type="smollm3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2)
    assert spec_from_config(base).rope_layers == (True, True, True, False)  # transformers' default interval 4
    assert spec_from_config({**base, "no_rope_layer_interval": 2}).rope_layers == (True, False, True, False)
    assert spec_from_config({**base, "no_rope_layers": [0, 1, 1, 0]}).rope_layers == (False, True, True, False)
    with pytest.raises(ModelError, match="no_rope_layers must list 0 or 1 for each of the 4 layers"):
        spec_from_config({**base, "no_rope_layers": [1, 1]})
    assert spec_from_config({**base, "model_type": "llama"}).rope_layers is None


def test_phi_longrope_uses_the_long_factors_past_the_pretraining_context():
    # transformers switches to the long factors once a sequence passes original_max_position_embeddings (128 here); a
    # cache longer than that uses them at every position, so one pass over 150 tokens matches transformers'.
    hf = hf_model("phi4mini-partial-longrope")
    loaded = loaded_from_hf(hf)
    ids = torch.randint(3, hf.config.vocab_size, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = hf_logits(hf, ids)
    assert (chunked_logits(build_decoder(loaded, 160), ids, prefill=140) - ref).abs().max().item() <= 1e-4
    # the short factors would be wrong here (an exporter that kept them would fail its parity gate)
    assert (chunked_logits(build_decoder(loaded, 128), ids[:128], prefill=120) - ref[:128]).abs().max().item() > 0.1


PHI = dict(model_type="phi3", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5, original_max_position_embeddings=64,
           rope_scaling={"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4})


def test_phi_partial_rotary_and_longrope_come_from_the_config():
    from llmship.errors import ModelError
    from llmship.models.spec import spec_from_config

    spec = spec_from_config(PHI)
    assert (spec.rotary_dim, spec.rope_dim, spec.rope_scaling["rope_type"]) == (8, 8, "longrope")
    assert spec.rope_scaling["original_max_position_embeddings"] == 64
    assert spec_from_config({**PHI, "partial_rotary_factor": 1.0, "rope_scaling": None}).rotary_dim is None
    for fields, message in (({"partial_rotary_factor": 0.2}, "rotates 3 dims; RoPE needs an even number"),
                            ({"partial_rotary_factor": 1.5}, "partial_rotary_factor must be in"),
                            ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4}},
                             "short_factor must list 4 positive numbers"),
                            ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [0.0] * 4}},
                             "long_factor must list 4 positive numbers")):
        with pytest.raises(ModelError, match=message):
            spec_from_config({**PHI, **fields})


def test_fused_projections_are_split_once_and_a_wrong_size_is_named():
    from llmship.errors import ModelError
    from llmship.models.weights import check_weights

    hf = hf_model("phi4mini-partial-longrope")
    loaded = loaded_from_hf(hf)
    state = hf.state_dict()
    qkv = state["model.layers.1.self_attn.qkv_proj.weight"]
    q, kv = 6 * 16, 2 * 16
    assert torch.equal(loaded.weights["model.layers.1.self_attn.k_proj.weight"], qkv[q:q + kv])
    assert torch.equal(loaded.weights["model.layers.1.mlp.up_proj.weight"], state["model.layers.1.mlp.gate_up_proj.weight"][80:])
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in loaded.weights)
    bad = {k: v.clone() for k, v in state.items()}
    bad["model.layers.0.mlp.gate_up_proj.weight"] = bad["model.layers.0.mlp.gate_up_proj.weight"][:-1]
    with pytest.raises(ModelError, match=r"model.layers.0.mlp.gate_up_proj.weight is \(159, 96\), not the 160 rows"):
        check_weights(loaded.spec, bad, "test")


# Gemma-3-270M's config.json as Google publishes it (the checkpoint's field names, before transformers 5's
# rope_parameters): what `spec_from_config` must read from a real download.
GEMMA3_270M = dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=262144, hidden_size=640,
                   intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, rms_norm_eps=1e-6,
                   rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None, sliding_window=512,
                   _sliding_window_pattern=6, attn_logit_softcapping=None, final_logit_softcapping=None,
                   max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"]
                   + ["sliding_attention"] * 5 + ["full_attention"])


def test_gemma3_270m_config_gives_its_published_shape():
    from llmship.models.spec import spec_from_config

    spec = spec_from_config(GEMMA3_270M)
    assert spec.num_params == 268_098_176  # "270M": 168M of it the 262,144 x 640 embedding
    assert [spec.window_of(i) for i in range(6)] == [512] * 5 + [None]
    assert (spec.rope_theta, spec.local_rope_theta, spec.attn_scale) == (1e6, 1e4, 256 ** -0.5)
    assert (spec.hidden_act, spec.norm_offset, spec.sandwich_norms, spec.qk_norm) == ("gelu_pytorch_tanh", 1.0, True, True)
    assert spec.embed_scale == 640 ** 0.5
    # without layer_types, transformers' pattern: every sixth layer global
    no_types = {k: v for k, v in GEMMA3_270M.items() if k != "layer_types"}
    assert spec_from_config(no_types).sliding_layers == spec.sliding_layers


def test_gemma3_config_forms_agree_and_what_is_not_computed_is_refused():
    from llmship.errors import ModelError
    from llmship.models.spec import spec_from_config

    hf = hf_model("gemma3-local-global")
    saved = spec_from_config(hf.config.to_dict())  # transformers 5's nested rope_parameters
    assert (saved.local_rope_theta, saved.rope_theta, saved.rope_scaling) == (10000.0, 1e6, {"rope_type": "linear", "factor": 2.0})
    legacy = {k: v for k, v in hf.config.to_dict().items() if k != "rope_parameters"}
    legacy.update(rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert spec_from_config(legacy) == saved
    for fields, message in (({"final_logit_softcapping": 30.0}, "final_logit_softcapping 30.0 is not supported"),
                            ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0 is not supported"),
                            ({"use_bidirectional_attention": True}, "an embedding model"),
                            ({"hidden_activation": "relu"}, "unsupported activation 'relu'")):
        with pytest.raises(ModelError, match=message):
            spec_from_config({**legacy, **fields})


@pytest.mark.parametrize("feature", ["norm_offset", "sandwich_norms", "embed_scale", "attn_scale", "local_rope_theta",
                                     "hidden_act", "window"])
def test_each_gemma3_feature_matters(feature):
    """The parity tests above pass on the Gemma 3 config; each feature switched off in turn is far from transformers,
    so each is really computed (not a no-op on these random weights)."""
    import dataclasses

    hf = hf_model("gemma3-local-global")
    loaded = loaded_from_hf(hf)
    off = {"norm_offset": 0.0, "sandwich_norms": False, "embed_scale": None, "attn_scale": None,
           "local_rope_theta": None, "hidden_act": "silu", "window": None}[feature]
    spec = dataclasses.replace(loaded.spec, **({"sliding_window": off} if feature == "window" else {feature: off}))
    weights = loaded.weights
    if feature == "sandwich_norms":  # the block without its extra norms: their tensors go unused
        weights = {k: v for k, v in weights.items() if "feedforward_layernorm" not in k}
    ids = torch.randint(3, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = chunked_logits(build_decoder(dataclasses.replace(loaded, spec=spec, weights=weights), MAX_CONTEXT), ids, prefill=17)
    assert (ours - hf_logits(hf, ids)).abs().max().item() > 0.05


def _chunked(decoder, ids, chunk, check=True):
    outs = []
    for pos in range(0, len(ids), chunk):
        part = torch.tensor([ids[pos:pos + chunk]])
        outs.append(decoder.prefill(part, pos) if check else decoder(part, torch.tensor([pos]))[0])
    return torch.cat(outs)


@pytest.mark.parametrize("family", ["gemma3-local-global", "mistral", "qwen2-bias"])
def test_sliding_window_layers_hold_ring_buffers_that_match_transformers(family):
    """An artifact's decoder (chunk set) keeps window + chunk - 1 rows in each sliding-window layer and max_context in
    the others; over 60 tokens (6x the window) in chunks of 1, 4 and 7 it matches transformers. One row fewer than
    that sizing (a chunk of 4 written into a ring sized for 3) overwrites keys the chunk's first queries still need."""
    hf = hf_model(family)
    loaded = loaded_from_hf(hf)
    ids = torch.randint(3, hf.config.vocab_size, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(hf, ids)
    windows = [loaded.spec.window_of(i) for i in range(loaded.spec.num_layers)]
    assert build_decoder(loaded, MAX_CONTEXT).cache_lengths == [MAX_CONTEXT] * len(windows)  # the reference: no ring
    for chunk in (1, 4, 7):
        decoder = build_decoder(loaded, MAX_CONTEXT, chunk=chunk)
        assert decoder.cache_lengths == [MAX_CONTEXT if w is None else w + chunk - 1 for w in windows]
        assert (_chunked(decoder, ids, chunk) - ref).abs().max().item() <= 1e-4
    short = build_decoder(loaded, MAX_CONTEXT, chunk=3)
    with pytest.raises(ConfigError, match="take at most 3"):
        short.prefill(torch.tensor([ids[:4]]), 0)
    assert (_chunked(short, ids, 4, check=False) - ref).abs().max().item() > 0.05


def test_gemma3_270m_ring_buffers_hold_less_than_half_the_cache_at_2048():
    """The figure the README states: Gemma-3-270M's shapes, max_context 2048, prefill chunks of 128."""
    from llmship.models.decoder import cache_lengths
    from llmship.models.spec import spec_from_config

    spec = spec_from_config(GEMMA3_270M)
    lengths = cache_lengths(spec, 2048, 128)
    assert sorted(set(lengths)) == [639, 2048] and lengths.count(639) == 15
    row = 2 * spec.num_kv_heads * spec.head_dim * 4  # K and V, fp32
    assert (sum(lengths) * row, 18 * 2048 * row) == (32_212_992, 75_497_472)
