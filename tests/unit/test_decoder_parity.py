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


def test_sliding_window_smaller_than_context_is_refused():
    hf = hf_model("mistral")
    loaded = loaded_from_hf(hf)
    with pytest.raises(ConfigError, match="sliding_window"):
        build_decoder(loaded, 8192)


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
