"""ExecuTorch target: model.pte on ExecuTorch's runtime (XNNPACK) against the FP32 reference."""
from __future__ import annotations

import numpy as np
import pytest

from llmship.errors import ConfigError

pytestmark = pytest.mark.executorch

CONTEXT, PREFILL = 96, (8, 24)  # small cache and chunks: parity does not depend on them, CI time does


def profile(name: str, **changes):
    from llmship.targets import get_profile

    return get_profile(name).model_copy(update={"max_context": CONTEXT, "prefill_lengths": PREFILL, **changes})


def export(loaded, target, out):
    from llmship.manifest import read_manifest
    from llmship.pipeline import export_artifact

    export_artifact(loaded, target, out)
    return out, read_manifest(out)


def reference(loaded, context=CONTEXT):
    from llmship.models import build_decoder
    from llmship.validation.runners.reference import ReferenceRunner

    return ReferenceRunner.from_decoder(build_decoder(loaded, context))


def runner(artifact):
    from llmship.validation.runners.executorch import ExecuTorchRunner

    return ExecuTorchRunner(artifact[0], artifact[1], threads=2)


def parity(runner_, ref, tokens, prompt, chunk=PREFILL[0], prefill_tokens=PREFILL[1], greedy_steps=32):
    """Teacher-forced logits (prefill chunks, then one decode step per token) and greedy generation."""
    from llmship.validation import evaluate as ev

    plan = ev.EvalPlan(tuple(tokens), prefill_tokens, chunk, (tuple(prompt),), greedy_steps)
    ours, theirs = ev.teacher_forced(runner_, plan), ev.teacher_forced(ref, plan)
    metrics, _ = ev.parity_metrics(ours, theirs, plan.tokens)
    metrics["greedy"] = ev.greedy_match(ev.greedy(runner_, prompt, greedy_steps, chunk), ev.greedy(ref, prompt, greedy_steps, chunk))
    return metrics


@pytest.fixture(scope="module")
def tiny_fp32(tiny, tmp_path_factory):
    return export(tiny, profile("executorch-fp32"), tmp_path_factory.mktemp("et") / "tiny-fp32")


def test_fp32_parity_tiny(tiny, tiny_fp32):
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, tiny.spec.vocab_size, size=64).tolist()
    m = parity(runner(tiny_fp32), reference(tiny), tokens, prompt=tokens[:5])
    assert m["top1_agreement"] == 1.0
    assert m["greedy"] == 32
    assert m["max_abs_err"] < 1e-3 and m["kl_mean"] < 1e-8


@pytest.mark.shared
def test_fp32_parity_stories(stories, tmp_path):
    artifact = export(stories, profile("executorch-fp32"), tmp_path / "stories-fp32")
    ref = reference(stories)
    from llmship.validation import evaluate as ev

    tokens = ev.sample_text(ref, stories.spec.bos_token_id, 80, seed=0, vocab=stories.spec.vocab_size)
    prompt = [stories.spec.bos_token_id, *stories.tokenizer.encode("Once upon a time").ids]
    m = parity(runner(artifact), ref, tokens, prompt)
    assert m["top1_agreement"] == 1.0
    assert m["greedy"] == 32
    assert m["max_abs_err"] < 1e-3


def test_decode_sees_the_cache_prefill_wrote(tiny, tiny_fp32):
    """prefill through one method, decode through the other: decode's logits depend on what prefill wrote
    and match the reference for that history."""
    et, ref = runner(tiny_fp32), reference(tiny)
    rng = np.random.default_rng(2)
    token = 7
    outs = []
    for _ in range(2):
        history = rng.integers(3, tiny.spec.vocab_size, size=PREFILL[1]).tolist()
        et.reset(), ref.reset()
        et.prefill(history, 0), ref.prefill(history, 0)
        ours, theirs = et.decode(token, len(history)), ref.decode(token, len(history))
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        outs.append(ours)
    assert np.abs(outs[0] - outs[1]).max() > 0.1  # a different prefill changes what decode computes


def test_a_new_sequence_does_not_see_the_old_one(tiny, tiny_fp32):
    et, ref = runner(tiny_fp32), reference(tiny)
    rng = np.random.default_rng(3)
    long = rng.integers(3, tiny.spec.vocab_size, size=PREFILL[1]).tolist()
    short = rng.integers(3, tiny.spec.vocab_size, size=5).tolist()
    et.prefill(long, 0)
    for pos, tok in enumerate(long[:10], start=len(long)):
        et.decode(tok, pos)
    et.reset(), ref.reset()
    np.testing.assert_allclose(et.prefill(short, 0), ref.prefill(short, 0), atol=1e-4)
    np.testing.assert_allclose(et.decode(9, len(short)), ref.decode(9, len(short)), atol=1e-4)


def test_pte_carries_the_llm_runner_metadata(tiny, tiny_fp32):
    from executorch.runtime import Runtime

    path, manifest = tiny_fp32
    program = Runtime.get().load_program(path / "model.pte")
    value = {name: program.load_method(name).execute([]) for name in program.method_names
             if name.startswith(("get_", "use_", "enable_"))}
    assert value["get_max_context_len"] == [manifest["max_context"]]
    assert value["get_max_seq_len"] == [max(manifest["prefill_lengths"])]
    assert value["get_vocab_size"] == [tiny.spec.vocab_size]
    assert value["get_bos_id"] == [manifest["model"]["bos_token_id"]]
    assert value["get_eos_ids"] == manifest["model"]["eos_token_ids"]
    assert value["use_kv_cache"] == [True]
    assert {"prefill", "decode"} <= program.method_names
    entry = manifest["entry_points"]
    assert entry["prefill"]["inputs"][0]["shape"] == [1, "T"] and entry["decode"]["method"] == "decode"
    assert manifest["kv_cache"]["held_as"] == "state"


def test_runner_rejects_positions_outside_the_cache(tiny_fp32):
    et = runner(tiny_fp32)
    with pytest.raises(ConfigError):
        et.decode(5, CONTEXT)
    with pytest.raises(ConfigError):
        et.prefill([5] * (PREFILL[1] + 1), 0)


# ---------------------------------------------------------------- recipes and size

def test_recipes_xnnpack_cannot_keep_are_rejected(tiny):
    from llmship.config import Recipe
    from llmship.exporters.executorch import check, quant_plan
    from llmship.targets import get_profile

    base = get_profile("executorch-fp32")
    for recipe in (Recipe(weights="int8"),  # weight-only: XNNPACK would dequantize it to fp32 at export
                   Recipe(weights="fp16"), Recipe(weights="pal4", group_size=16), Recipe(compute="fp16"),
                   Recipe(weights="int8", activations="int8", group_size=32),
                   Recipe(weights="int4", activations="int8", group_size=16),  # XNNPACK groups are multiples of 32
                   Recipe(weights="int4", activations="int8", symmetric=False)):  # no zero points on XNNPACK
        with pytest.raises(ConfigError):
            check(base.model_copy(update={"recipe": recipe}), tiny.spec)
    plan = quant_plan(Recipe(weights="int4", activations="int8", group_size=64, embedding="int8"), tiny.spec)
    assert (plan.linears.bits, plan.linears.group) == (4, 64)
    assert plan.embedding == plan.lm_head and plan.embedding.bits == 8  # tied head follows the embedding


# A one-layer model with a large vocabulary: its weights, not the program's flatbuffers, dominate the file,
# so a single misquantized table moves the size far outside the tolerance.
SIZE_CONFIG = {
    "model_type": "llama", "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}


@pytest.fixture(scope="module")
def size_model():
    from llmship.models.builtin import byte_tokenizer, random_weights
    from llmship.models.loaded import LoadedModel
    from llmship.models.spec import spec_from_config

    spec = spec_from_config(SIZE_CONFIG)
    return LoadedModel("test:size", dict(SIZE_CONFIG), spec, random_weights(SIZE_CONFIG), byte_tokenizer(spec.vocab_size))


def size_verdict(pte: bytes, spec, plan) -> tuple[int, int]:
    from llmship.exporters.executorch import expected_weight_bytes, pte_weight_bytes, size_tolerance

    expected = expected_weight_bytes(spec, plan, CONTEXT)
    return pte_weight_bytes(pte) - expected, len(pte) - expected - size_tolerance(spec, expected)


@pytest.mark.shared
def test_8da4w_stories_matches_its_recipe_size_and_gates(stories, tmp_path):
    """A real 8da4w artifact: its weights take the bytes the recipe implies (so nothing is stored twice that
    should not be, and nothing is left fp32), and its parity passes the target's gates."""
    from llmship.exporters.executorch import expected_weight_bytes, quant_plan
    from llmship.validation import evaluate as ev

    target = profile("executorch-8da4w")
    path, manifest = export(stories, target, tmp_path / "stories-8da4w")
    plan = quant_plan(target.recipe, stories.spec)
    expected = expected_weight_bytes(stories.spec, plan, CONTEXT)
    weights_over, total_over = size_verdict((path / "model.pte").read_bytes(), stories.spec, plan)
    assert abs(weights_over) <= expected // 100, f"weights differ from the recipe's {expected} bytes by {weights_over}"
    assert total_over <= 0
    quant = manifest["executorch"]["quantization"]
    # stories260K's intermediate size 172 is no multiple of 32: down_proj falls back to int8 per channel.
    assert quant["int8_fallback"] == [f"layers.{i}.mlp.down_proj" for i in range(stories.spec.num_layers)]
    assert manifest["executorch"]["tied_embedding"]["stored"] == "twice"

    ref = reference(stories)
    tokens = ev.sample_text(ref, stories.spec.bos_token_id, 80, seed=0, vocab=stories.spec.vocab_size)
    m = parity(runner((path, manifest)), ref, tokens, prompt=tokens[:8])
    gates = target.gates
    assert m["kl_mean"] <= gates.kl_mean_max and m["top1_agreement"] >= gates.top1_agreement_min
    assert m["ppl"] / m["ppl_reference"] <= gates.ppl_ratio_max


@pytest.mark.parametrize("fault", [None, "lm_head", "embedding"])
def test_size_check_catches_a_table_left_fp32(size_model, fault):
    """Planted fault: the 8da4w export with the head (or the embedding) left fp32 falls outside the size the
    recipe implies; the faultless export of the same model falls inside. (The decode method alone: the
    weights are the same for both methods, and it halves the conversion time.)"""
    import dataclasses

    from llmship.exporters.executorch import build_pte, expected_weight_bytes, quant_plan
    from llmship.models import build_decoder

    target = profile("executorch-8da4w")
    plan = quant_plan(target.recipe, size_model.spec)
    built = dataclasses.replace(plan, **{fault: None}) if fault else plan
    pte, _ = build_pte(build_decoder(size_model, CONTEXT), target, built, methods=("decode",))
    weights_over, total_over = size_verdict(pte, size_model.spec, plan)
    if fault is None:
        assert abs(weights_over) <= expected_weight_bytes(size_model.spec, plan, CONTEXT) // 100 and total_over <= 0
    else:  # an fp32 vocab x hidden table is 4 bytes a weight instead of about 1
        assert weights_over > 2 * size_model.spec.vocab_size * size_model.spec.hidden_size
        assert total_over > 0


def test_size_check_catches_a_quantized_head_stored_twice(size_model):
    """Planted fault: a second copy of the head, quantized like the head, in the graph (as a module holding
    its own copy of a tied matrix would add): the int8 vocab x hidden bytes show up over the recipe's size."""
    import copy

    from llmship.exporters.executorch import build_pte, quant_plan
    from llmship.models import build_decoder

    target = profile("executorch-8da4w")
    plan = quant_plan(target.recipe, size_model.spec)
    decoder = build_decoder(size_model, CONTEXT)
    decoder.lm_head.duplicate = copy.deepcopy(decoder.lm_head)  # quantize_ quantizes it with the head's config
    decoder.lm_head.register_forward_hook(lambda head, args, out: out + 0.0 * head.duplicate(args[0]))
    pte, _ = build_pte(decoder, target, plan, methods=("decode",))
    weights_over, total_over = size_verdict(pte, size_model.spec, plan)
    assert weights_over > 0.9 * size_model.spec.vocab_size * size_model.spec.hidden_size  # one more int8 table
    assert total_over > 0


# ---------------------------------------------------------------- SmolLM2

@pytest.mark.smollm2
@pytest.mark.slow
def test_fp32_parity_smollm2(smollm2, tmp_path):
    from llmship.models import load_model
    from llmship.validation import evaluate as ev

    loaded = load_model(smollm2)
    artifact = export(loaded, profile("executorch-fp32", max_context=160, prefill_lengths=(32, 64)), tmp_path / "smol")
    ref = reference(loaded, 160)
    tokens = ev.sample_text(ref, loaded.spec.bos_token_id, 96, seed=0, vocab=loaded.spec.vocab_size)
    bos = [loaded.spec.bos_token_id] if loaded.spec.bos_token_id is not None else []
    prompt = [*bos, *loaded.tokenizer.encode("Once upon a time").ids]
    m = parity(runner(artifact), ref, tokens, prompt, chunk=32, prefill_tokens=64)
    assert m["top1_agreement"] == 1.0
    assert m["greedy"] == 32
