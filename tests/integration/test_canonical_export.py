"""torch.export of both entry points for every family: the programs the exporters consume."""
import pytest
import torch

from llmship.models import build_decoder, load_model
from llmship.models.export import cache_inputs, export_cache_io, export_stateful
from tests.helpers import FAMILY_CONFIGS, hf_greedy, hf_logits, hf_model, loaded_from_hf


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_stateful_export_shares_one_cache_between_prefill_and_decode(family):
    hf = hf_model(family)
    decoder = build_decoder(loaded_from_hf(hf), 48)
    programs = export_stateful(decoder, max_prefill=16)
    for name, ep in programs.items():  # after functionalization every cache buffer is a mutation output
        mutated = ep.run_decompositions().graph_signature.buffers_to_mutate
        assert len(mutated) == 2 * decoder.spec.num_layers, name
    # Run the exported programs on one module state: prefill 11 tokens, then 5 decode steps.
    ids = torch.randint(3, hf.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    decoder.reset_cache()
    prefill, decode = programs["prefill"].module(), programs["decode"].module()
    decode.load_state_dict(prefill.state_dict(), strict=False)
    out = [prefill(torch.tensor([ids[:11]]), torch.tensor([0]))[0]]
    # the two programs hold separate buffer copies; hand the cache over as ExecuTorch's shared buffers would
    for name, buf in prefill.named_buffers():
        decode.get_buffer(name).copy_(buf)
    for pos in range(11, 16):
        out.append(decode(torch.tensor([[ids[pos]]]), torch.tensor([pos]))[0])
    assert (torch.cat(out) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["llama-tied-gqa3", "qwen3-qknorm-headdim", "llama3-rope-scaling"])
def test_cache_io_export_matches_reference(family):
    hf = hf_model(family)
    decoder = build_decoder(loaded_from_hf(hf), 32)
    ep = export_cache_io(decoder, prefill_len=None).module()
    ids = [1, 7, 9, 11, 13, 15]
    caches = cache_inputs(decoder)
    logits, *caches = ep(torch.tensor([ids[:4]]), torch.tensor([0]), *caches)
    step, *caches = ep(torch.tensor([ids[4:]]), torch.tensor([4]), *caches)
    assert (torch.cat([logits[0], step[0]]) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


@pytest.mark.smollm2
def test_smollm2_matches_transformers_loading_the_same_gguf(smollm2):
    """Independent loaders: transformers reads the GGUF itself (its own dequantization and q/k layout)."""
    from transformers import AutoModelForCausalLM

    from llmship.models.builtin import smollm2_gguf_path
    from llmship.validation.evaluate import greedy
    from llmship.validation.runners.reference import ReferenceRunner

    path = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    loaded = load_model(smollm2)
    decoder = build_decoder(loaded, 128)
    ids = loaded.tokenizer.encode("Once upon a time, in a small village by the sea, there lived").ids
    decoder.reset_cache()
    first = decoder.prefill(torch.tensor([ids[:8]]), 0)
    rest = [decoder.decode(t, i) for i, t in enumerate(ids[8:], start=8)]
    assert (torch.cat([first, torch.stack(rest)]) - hf_logits(hf, ids)).abs().max().item() <= 1e-4
    prompt = loaded.tokenizer.encode("Once upon a time").ids
    assert greedy(ReferenceRunner.from_decoder(decoder), prompt, 32, chunk=32) == hf_greedy(hf, prompt, 32)


@pytest.mark.shared
def test_stories260k_greedy_matches_transformers(stories_dir):
    from transformers import AutoModelForCausalLM

    from llmship.validation.evaluate import greedy
    from llmship.validation.runners.reference import ReferenceRunner

    hf = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32).eval()
    loaded = load_model(str(stories_dir))
    decoder = build_decoder(loaded, 128)
    ids = loaded.tokenizer.encode("Once upon a time there was a little girl named Lily. She").ids
    decoder.reset_cache()
    first = decoder.prefill(torch.tensor([ids[:5]]), 0)
    rest = [decoder.decode(t, i) for i, t in enumerate(ids[5:], start=5)]
    assert (torch.cat([first, torch.stack(rest)]) - hf_logits(hf, ids)).abs().max().item() <= 1e-4
    prompt = loaded.tokenizer.encode("Once upon a time").ids
    tokens = greedy(ReferenceRunner.from_decoder(decoder), prompt, 32, chunk=32)
    assert tokens == hf_greedy(hf, prompt, 32)
    assert loaded.tokenizer.decode(tokens).startswith(", there was a little girl named Lily")  # llama2.c's published sample
