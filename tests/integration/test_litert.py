"""LiteRT (TFLite) target: litert-torch conversion into prefill_<T>/decode signatures, run on ai-edge-litert.

Conversions take tens of seconds each, so each artifact is built once per module (small max_context and
prefill lengths keep them quick) and shared by the tests that read it.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from llmship.config import TargetProfile
from llmship.errors import ConfigError
from llmship.models import build_decoder, load_model
from llmship.models.export import cache_inputs
from llmship.targets import get_profile
from llmship.validation import evaluate as ev
from llmship.validation.runners.reference import ReferenceRunner
from tests.helpers import FAMILY_CONFIGS, hf_model, loaded_from_hf

pytestmark = pytest.mark.litert

MAX_CONTEXT = 64
PREFILL = (4, 16)


def small_target(name: str, **changes) -> TargetProfile:
    data = get_profile(name).model_dump()
    data.update({"max_context": MAX_CONTEXT, "prefill_lengths": PREFILL, **changes})
    return TargetProfile.model_validate(data)


def build(loaded, target, out):
    from llmship.manifest import read_manifest
    from llmship.pipeline import export_artifact

    export_artifact(loaded, target, out)
    return out, read_manifest(out)


def open_litert(artifact):
    from llmship.validation.runners.litert import LiteRTRunner

    path, manifest = artifact
    return LiteRTRunner(path, manifest, threads=2)


def reference(loaded, max_context=MAX_CONTEXT) -> ReferenceRunner:
    return ReferenceRunner.from_decoder(build_decoder(loaded, max_context))


def prompt(loaded, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [loaded.spec.bos_token_id, *rng.integers(3, loaded.spec.vocab_size, n - 1).tolist()]


def plan(tokens, prefill_tokens, chunk, greedy_prompt, greedy_tokens=32) -> ev.EvalPlan:
    return ev.single_window_plan(tokens, prefill_tokens, chunk, (greedy_prompt,), greedy_tokens)


@pytest.fixture(scope="module")
def tiny_fp32(tiny, tmp_path_factory):
    return build(tiny, small_target("litert-fp32"), tmp_path_factory.mktemp("litert") / "tiny-fp32")


@pytest.fixture(scope="module")
def stories_fp32(stories, tmp_path_factory):
    return build(stories, small_target("litert-fp32"), tmp_path_factory.mktemp("litert") / "stories-fp32")


@pytest.fixture(scope="module")
def stories_int8(stories, tmp_path_factory):
    return build(stories, small_target("litert-int8"), tmp_path_factory.mktemp("litert") / "stories-int8")


# --- no conversion ---------------------------------------------------------------------------------

def test_plan_chunks_pads_into_the_smallest_signature_and_never_writes_past_the_cache():
    from llmship.validation.runners.litert import plan_chunks

    assert plan_chunks(3, 0, PREFILL, 64) == [(4, 3)]
    assert plan_chunks(5, 0, PREFILL, 64) == [(16, 5)]
    assert plan_chunks(20, 0, PREFILL, 64) == [(16, 16), (4, 4)]
    assert plan_chunks(10, 52, PREFILL, 64) == [(4, 4), (4, 4), (4, 2)]  # 52 + 16 > 64: no padding into prefill_16
    assert plan_chunks(2, 62, PREFILL, 64) == [(1, 1), (1, 1)]  # prefill_4 at 62 would write rows 64, 65
    for n, pos in [(7, 0), (16, 48), (13, 50), (1, 63), (30, 30)]:
        calls = plan_chunks(n, pos, PREFILL, 64)
        assert sum(real for _, real in calls) == n
        end = pos
        for length, real in calls:
            assert end + length <= 64 and real <= length
            end += real


def test_recipes_the_format_cannot_express_are_config_errors():
    from llmship.config import Recipe
    from llmship.exporters.tflite import check

    base = get_profile("litert-fp32")
    for bad in [dict(weights="pal4"), dict(weights="int4", activations="int8", group_size=48),
                dict(weights="int4"), dict(weights="int8", activations="int8", group_size=32),
                dict(weights="fp16", compute="fp16"), dict(weights="int4", activations="int8", embedding="int8"),
                dict(weights="int8", activations="int8", symmetric=False)]:
        with pytest.raises(ConfigError):
            check(base.model_copy(update={"recipe": Recipe(**bad)}))
    for name in ("litert-fp32", "litert-fp16", "litert-int8", "litert-int4"):
        check(get_profile(name))


def test_int4_layers_whose_width_is_not_a_whole_number_of_blocks_fall_back_to_int8(tiny):
    from llmship.config import Recipe
    from llmship.exporters.tflite import check
    from llmship.exporters.tflite_weights import int8_fallbacks

    def target(**recipe):
        return small_target("litert-int4", recipe=Recipe(**recipe))

    int4 = dict(weights="int4", activations="int8")
    assert int8_fallbacks(target(**int4, group_size=32), tiny.spec) == []  # widths 64 (hidden, heads x head_dim), 160
    assert int8_fallbacks(target(**int4, group_size=64), tiny.spec) == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert int8_fallbacks(target(weights="int8", activations="int8"), tiny.spec) == []
    with pytest.raises(ConfigError, match="hidden_size 64"):
        check(target(**int4, group_size=128), tiny.spec)  # the embedding and q/k/v/gate/up cannot fall back


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_litert_attention_computes_the_canonical_function(family):
    """The exporter swaps in grouped-query attention and dynamic_update_slice cache writes; same numbers."""
    from llmship.exporters.tflite import litert_decoder

    loaded = loaded_from_hf(hf_model(family))
    canonical = build_decoder(loaded, 32)
    ours = litert_decoder(canonical)
    assert ours is not canonical and all(not isinstance(layer.self_attn, type(ours.model.layers[0].self_attn))
                                         for layer in canonical.model.layers)  # the handed model is left as it was
    ids = torch.tensor([prompt(loaded, 12)])
    with torch.no_grad():
        caches = cache_inputs(canonical)
        n = len(caches) // 2
        a, ka, va = canonical.forward_with_cache(ids[:, :9], torch.tensor([0]), caches[:n], caches[n:])
        b, kb, vb = ours.forward_with_cache(ids[:, :9].int(), torch.tensor([0], dtype=torch.int32), caches[:n], caches[n:])
        a2, ka, va = canonical.forward_with_cache(ids[:, 9:], torch.tensor([9]), ka, va)
        b2, kb, vb = ours.forward_with_cache(ids[:, 9:].int(), torch.tensor([9], dtype=torch.int32), kb, vb)
    assert (torch.cat([a, a2], 1) - torch.cat([b, b2], 1)).abs().max().item() <= 1e-5
    assert max((x - y).abs().max().item() for x, y in zip(ka + va, kb + vb)) <= 1e-5


# --- builtin:tiny fp32 -----------------------------------------------------------------------------

def test_tiny_fp32_matches_reference_through_prefill_and_decode(tiny, tiny_fp32):
    runner, ref = open_litert(tiny_fp32), reference(tiny)
    assert "XNNPACK" in runner.executor
    tokens = prompt(tiny, 40)
    p = plan(tokens, prefill_tokens=20, chunk=16, greedy_prompt=tokens[:5])  # chunks of 16 and 4, then 20 decodes
    ours, theirs = ev.teacher_forced(runner, p), ev.teacher_forced(ref, p)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    greedy_ours, greedy_ref = ev.greedy(runner, p.prompts[0], 32, 16), ev.greedy(ref, p.prompts[0], 32, 16)
    assert ev.greedy_match(greedy_ours, greedy_ref) == 32


def test_padded_prefill_then_decode_matches_reference(tiny, tiny_fp32):
    """3 and 11 real tokens padded into prefill_4 / prefill_16; the junk rows they leave are overwritten by
    the decode steps that follow before any of them is attended."""
    runner, ref = open_litert(tiny_fp32), reference(tiny)
    for n in (3, 11):
        tokens = prompt(tiny, n + 12, seed=n)
        runner.reset()
        ref.reset()
        ours = [runner.prefill(tokens[:n], 0)]
        theirs = [ref.prefill(tokens[:n], 0)]
        assert ours[0].shape == (n, tiny.spec.vocab_size)
        for pos in range(n, len(tokens)):
            ours.append(runner.decode(tokens[pos], pos)[None])
            theirs.append(ref.decode(tokens[pos], pos)[None])
        assert np.abs(np.concatenate(ours) - np.concatenate(theirs)).max() <= 1e-4


def test_prefill_near_the_end_of_the_cache_matches_reference(tiny, tiny_fp32):
    """At position 52 a 10-token chunk cannot be padded into prefill_16 (rows 64+ do not exist): the runner
    falls back to exact and shorter signatures, and the logits still match."""
    runner, ref = open_litert(tiny_fp32), reference(tiny)
    tokens = prompt(tiny, 64, seed=3)
    for r in (runner, ref):
        r.reset()
        r.prefill(tokens[:16], 0)
        r.prefill(tokens[16:32], 16)
        r.prefill(tokens[32:48], 32)
        r.prefill(tokens[48:52], 48)
    ours, theirs = runner.prefill(tokens[52:62], 52), ref.prefill(tokens[52:62], 52)
    assert np.abs(ours - theirs).max() <= 1e-4
    ours, theirs = runner.prefill(tokens[62:64], 62), ref.prefill(tokens[62:64], 62)
    assert np.abs(ours - theirs).max() <= 1e-4
    with pytest.raises(ConfigError):
        runner.decode(tokens[0], 64)


def test_manifest_describes_every_signature_the_file_has(tiny, tiny_fp32):
    from ai_edge_litert.interpreter import Interpreter

    path, manifest = tiny_fp32
    assert manifest["kv_cache"]["held_as"] == "inputs"
    entries = manifest["entry_points"]
    assert set(entries) == {"prefill_4", "prefill_16", "decode"}
    interpreter = Interpreter(model_path=str(path / "model.tflite"))
    assert set(interpreter.get_signature_list()) == set(entries)
    for name, entry in entries.items():
        runner = interpreter.get_signature_runner(entry["signature"])
        for declared, actual in ((entry["inputs"], runner.get_input_details()), (entry["outputs"], runner.get_output_details())):
            assert {t["name"] for t in declared} == set(actual), name
            for t in declared:
                assert list(actual[t["name"]]["shape"]) == t["shape"], (name, t["name"])
                assert actual[t["name"]]["dtype"] == np.dtype(t["dtype"]), (name, t["name"])
        assert len(entry["inputs"]) == 2 + 2 * tiny.spec.num_layers


def test_weights_are_stored_once_for_all_signatures(tiny, tiny_fp32):
    from ai_edge_litert import schema_py_generated as schema

    path, manifest = tiny_fp32
    data = (path / "model.tflite").read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    sizes = [len(b.data) if b.data is not None else 0 for b in model.buffers]
    signature_subgraphs = {sd.subgraphIndex for sd in model.signatureDefs}
    assert len(signature_subgraphs) == 3
    weight_bytes = 4 * manifest["model"]["params"]
    big = {}
    for index, subgraph in enumerate(model.subgraphs):
        for tensor in subgraph.tensors:
            if sizes[tensor.buffer] >= 4096:
                big.setdefault(tensor.buffer, set()).add(index)
    assert all(users == signature_subgraphs for users in big.values())  # every weight read by every signature
    assert weight_bytes <= sum(sizes) <= 1.2 * weight_bytes  # plus the rope tables, no second copy
    assert len(data) < 2 * weight_bytes


# --- stories260K -----------------------------------------------------------------------------------

@pytest.mark.shared
def test_stories_fp32_top1_and_greedy_match_reference(stories, stories_fp32):
    runner, ref = open_litert(stories_fp32), reference(stories)
    tokens = ev.sample_text(ref, stories.spec.bos_token_id, 48, seed=0, vocab=stories.spec.vocab_size)
    p = plan(tokens, prefill_tokens=16, chunk=16, greedy_prompt=tokens[:6])
    ours, theirs = ev.teacher_forced(runner, p), ev.teacher_forced(ref, p)
    metrics, _ = ev.parity_metrics(ours, theirs, ev.next_tokens(tokens))
    assert metrics["top1_agreement"] == 1.0 and metrics["max_abs_err"] <= 1e-4
    assert ev.greedy_match(ev.greedy(runner, p.prompts[0], 32, 4), ev.greedy(ref, p.prompts[0], 32, 4)) == 32


@pytest.mark.shared
def test_stories_int8_is_smaller_and_within_its_gates(stories, stories_fp32, stories_int8):
    from ai_edge_litert import schema_py_generated as schema

    def weight_bytes(artifact):
        data = (artifact[0] / "model.tflite").read_bytes()
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
        return len(data), sum(len(b.data) for b in model.buffers if b.data is not None)

    (fp32_file, fp32_weights), (int8_file, int8_weights) = weight_bytes(stories_fp32), weight_bytes(stories_int8)
    assert int8_weights <= 0.32 * fp32_weights  # int8 matrices + per-channel scales; norms stay fp32
    assert int8_file < 0.6 * fp32_file  # the rest is the graph structure of three signatures
    runner, ref = open_litert(stories_int8), reference(stories)
    tokens = ev.sample_text(ref, stories.spec.bos_token_id, 64, seed=1, vocab=stories.spec.vocab_size)
    p = plan(tokens, prefill_tokens=16, chunk=16, greedy_prompt=tokens[:6])
    metrics, _ = ev.parity_metrics(ev.teacher_forced(runner, p), ev.teacher_forced(ref, p), p.targets())
    gates = get_profile("litert-int8").gates
    assert metrics["top1_agreement"] >= gates.top1_agreement_min
    assert metrics["kl_mean"] <= gates.kl_mean_max
    assert metrics["ppl"] / metrics["ppl_reference"] <= gates.ppl_ratio_max


# --- SmolLM2 ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_fp32_matches_reference(smollm2, tmp_path):
    loaded = load_model(smollm2)
    target = small_target("litert-fp32", max_context=128, prefill_lengths=(32,))
    artifact = build(loaded, target, tmp_path / "smollm2-fp32")
    runner, ref = open_litert(artifact), reference(loaded, 128)
    tokens = ev.sample_text(ref, loaded.spec.bos_token_id, 64, seed=0, vocab=loaded.spec.vocab_size)
    p = plan(tokens, prefill_tokens=32, chunk=32, greedy_prompt=tokens[:8])
    metrics, _ = ev.parity_metrics(ev.teacher_forced(runner, p), ev.teacher_forced(ref, p), p.targets())
    assert metrics["top1_agreement"] == 1.0 and metrics["kl_mean"] <= 1e-6
    assert ev.greedy_match(ev.greedy(runner, p.prompts[0], 32, 32), ev.greedy(ref, p.prompts[0], 32, 32)) == 32


# --- LiteRT-LM ------------------------------------------------------------------------------------------

@pytest.mark.shared
def test_litertlm_bundle_generates_the_reference_greedy_text(stories, stories_fp32, tmp_path):
    """LiteRT-LM's own engine runs the bundle: greedy text from the prompt is the FP32 reference's."""
    import litert_lm

    from llmship.packaging.litertlm import bundle

    path, _ = stories_fp32
    out = bundle(path, tmp_path / "stories.litertlm")
    assert (path / "model.tflite").read_bytes() in out.read_bytes()  # the validated file, byte for byte
    text = "Once upon a time"
    ids = [stories.spec.bos_token_id, *stories.tokenizer.encode(text, add_special_tokens=False).ids]
    expected = stories.tokenizer.decode(ev.greedy(reference(stories), ids, 32, len(ids)))
    engine = litert_lm.Engine(str(out), backend=litert_lm.Backend.CPU(thread_count=2), max_num_tokens=MAX_CONTEXT,
                              cache_dir=":nocache")
    session = engine.create_session(apply_prompt_template=False, max_output_tokens=32,
                                    sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=1.0, seed=0))  # greedy
    session.run_prefill([text])  # the engine adds BOS from the bundle's start token
    generated = session.run_decode().texts[0]
    assert len(expected.split()) > 10 and generated.strip() == expected.strip()


def test_litertlm_bundle_refuses_other_formats_and_modified_files(tiny, tiny_fp32, tmp_path):
    import shutil

    from llmship.errors import ModelError
    from llmship.packaging.litertlm import bundle

    with pytest.raises(ConfigError, match="tflite artifact"):
        bundle(build(tiny, small_target("pytorch-fp32"), tmp_path / "pt")[0])
    copy = tmp_path / "copy"
    shutil.copytree(tiny_fp32[0], copy)
    with open(copy / "model.tflite", "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\0" * 64)
    with pytest.raises(ModelError, match="model.tflite"):
        bundle(copy, tmp_path / "x.litertlm")
    assert not (tmp_path / "x.litertlm").exists()
