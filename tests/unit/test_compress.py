"""The compression stage's parts: grids, the record, per-module rules, the source's own blocks, calibration."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from llmship.compress.grids import asymmetric, palette, symmetric
from llmship.errors import ConfigError


def q4_1_matrix(n=8, k=128, seed=0):
    """A matrix stored as a GGUF Q4_1 tensor would be: w = m + d * q per block of 32, d and m fp16."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, generator=g) * 9e-3 + 1e-3).half().float()
    m = (torch.rand(n, k // 32, generator=g) * 0.1 - 0.08).half().float()
    q = torch.randint(0, 16, (n, k), generator=g)
    q[:, ::32], q[:, 1::32] = 0, 15  # every block spans its whole grid, as Q4_1 blocks do
    w = m.repeat_interleave(32, 1) + d.repeat_interleave(32, 1) * q
    return w, q, d, m


def test_round_to_nearest_on_an_asymmetric_fp16_grid_reproduces_q4_1_blocks():
    w, q, d, _ = q4_1_matrix()
    grid = asymmetric(4, 32, scale_dtype="fp16", zero_point="float", zero_dtype="fp16")
    codes, scale, zero = grid.rtn(w, "minmax")
    assert torch.equal(codes.long(), q)
    err = (grid.dequantize(codes, scale, zero) - w).abs()
    assert err.max() <= 0.05 * d.min()  # only the fp16 rounding of the offset


@pytest.mark.parametrize("grid", [symmetric(4, 32, "bf16"), symmetric(8, None, full_range=False),
                                  asymmetric(4, 32, zero_point="int"), asymmetric(8, 64, zero_point="float")])
def test_codes_and_scales_lie_on_the_grid_and_dequantize_textbook(grid):
    w = torch.randn(16, 192)
    codes, scale, zero = grid.rtn(w, "mse")
    assert grid.qmin <= codes.min() and codes.max() <= grid.qmax
    assert torch.equal(grid.round_scale(scale), scale)  # exactly what the runtime stores
    k = w.shape[1]
    g = grid.group_size or k
    textbook = torch.stack([(codes[:, j].float() - (0 if zero is None else zero[:, j // g])) * scale[:, j // g] for j in range(k)], 1)
    assert torch.allclose(grid.dequantize(codes, scale, zero), textbook)
    rtn_err = (grid.dequantize(codes, scale, zero) - w).pow(2).mean()
    step = scale.mean()
    assert rtn_err < step ** 2  # within a grid step on average


def test_a_partial_last_group_is_padded_like_the_runtime_pads_k():
    grid = asymmetric(4, 32, zero_point="int")
    w = torch.randn(4, 80)  # 2.5 groups
    codes, scale, zero = grid.rtn(w)
    assert scale.shape == (4, 3) and codes.shape == (4, 80)
    assert (grid.dequantize(codes, scale, zero) - w).abs().max() < scale.max()


def test_the_record_round_trips_and_its_digest_tracks_every_byte(tmp_path):
    from llmship.compress.record import QuantizedTensor, WeightRecord

    grid = symmetric(4, 32, "bf16")
    w = torch.randn(8, 64)
    t = QuantizedTensor("model.layers.0.mlp.up_proj", grid, *grid.rtn(w))
    pal = palette(4, 4)
    p = QuantizedTensor("model.embed_tokens", pal, *pal.rtn(torch.randn(16, 64)))
    record = WeightRecord({t.name: t, p.name: p}, {t.name: {"scheme": "int8_per_token_asymmetric"}}, "rtn", {"x": [1]})
    record.save(tmp_path / "r.safetensors")
    back = WeightRecord.load(tmp_path / "r.safetensors")
    assert back.digest() == record.digest()
    assert torch.equal(back.tensors[t.name].dequantize(), t.dequantize()) and back.activations == record.activations
    changed = dataclasses.replace(t, scale=t.scale.clone())
    changed.scale[0, 0] = changed.scale[0, 1]
    assert WeightRecord({t.name: changed, p.name: p}, record.activations, "rtn", {"x": [1]}).digest() != record.digest()


def test_rules_override_in_order_and_a_rule_that_matches_nothing_is_refused():
    from llmship.compress.plan import module_rules
    from llmship.config import Recipe
    from llmship.models.builtin import TINY_CONFIG
    from llmship.models.spec import spec_from_config

    spec = spec_from_config(TINY_CONFIG)
    recipe = Recipe.model_validate({"weights": "int4", "activations": "int8", "group_size": 32, "embedding": "int8",
                                    "rules": [{"match": r"layers\.(0|2)\.mlp\.down_proj", "weights": "int8", "group_size": None},
                                              {"match": r"layers\.2\.", "symmetric": True}]})
    rules = module_rules(recipe, spec)
    assert (rules["model.layers.0.mlp.down_proj"].weights, rules["model.layers.0.mlp.down_proj"].group_size) == ("int8", None)
    assert rules["model.layers.2.mlp.down_proj"].symmetric is True and rules["model.layers.2.mlp.down_proj"].weights == "int8"
    assert rules["model.layers.1.mlp.down_proj"].weights == "int4" and rules["model.embed_tokens"].weights == "int8"
    assert "lm_head" not in rules  # tied: the embedding's entry serves the head
    with pytest.raises(ConfigError, match=r"recipe.rules\[0\].match"):
        module_rules(Recipe.model_validate({"weights": "int4", "activations": "int8", "rules": [{"match": "no_such_proj"}]}), spec)
    with pytest.raises(Exception, match="regular expression"):
        Recipe.model_validate({"rules": [{"match": "(unclosed"}]})


def test_the_sources_q4_1_blocks_are_kept_where_a_grid_holds_them_and_refused_with_a_reason_elsewhere():
    from llmship.compress import source
    from llmship.models.loaded import SourceBlocks

    w, q, d, m = q4_1_matrix()
    blocks = SourceBlocks("Q4_1", 32, q.to(torch.int8), d, m)
    onnx_grid = asymmetric(4, 32, zero_point="float")
    assert source.fits(blocks, onnx_grid) is None
    codes, scale, zero = source.on(blocks, onnx_grid)
    assert (onnx_grid.dequantize(codes, scale, zero) - w).abs().max() < 1e-6  # the file's own weights
    assert "symmetric" in source.fits(blocks, symmetric(4, 32, "bf16"))
    assert "groups of 64" in source.fits(blocks, asymmetric(4, 64, zero_point="float"))
    q8 = SourceBlocks("Q8_0", 32, torch.randint(-127, 128, (8, 64), dtype=torch.int8), d[:, :2], None)
    on_int_zero = asymmetric(8, 32, zero_point="int")
    codes, scale, zero = source.on(q8, on_int_zero)
    expected = q8.codes.float() * q8.d.repeat_interleave(32, 1)
    assert torch.equal(on_int_zero.dequantize(codes, scale, zero), expected)


def test_calibration_is_sampled_apart_from_the_evaluation(tiny):
    from llmship.compress.calibration import calibration_sequences
    from llmship.config import Calibration, Evaluation
    from llmship.models import build_decoder
    from llmship.validation.evaluate import sample_text
    from llmship.validation.runners.reference import ReferenceRunner

    calibration, evaluation = Calibration(tokens=96, sequence_length=32), Evaluation(tokens=32)
    sequences = calibration_sequences(tiny, calibration, evaluation)
    assert len(sequences) == 3 and all(len(s) == 32 for s in sequences)
    assert sequences == calibration_sequences(tiny, calibration, evaluation)  # deterministic
    evaluated = sample_text(ReferenceRunner.from_decoder(build_decoder(tiny, 32)), tiny.spec.bos_token_id, 32, evaluation.seed,
                            tiny.spec.vocab_size)
    windows = {tuple(s[i:i + 8]) for s in sequences for i in range(1, len(s) - 7)}  # past the shared BOS
    assert not any(tuple(evaluated[i:i + 8]) in windows for i in range(1, len(evaluated) - 7))
    with pytest.raises(ConfigError, match="same tokens"):
        calibration_sequences(tiny, Calibration(seed=0), Evaluation(seed=0))


def test_a_calibration_text_that_overlaps_the_evaluation_text_is_refused(tiny, tmp_path):
    from llmship.compress.calibration import calibration_sequences
    from llmship.config import Calibration, Evaluation

    text = tmp_path / "t.txt"
    text.write_text("abcdefgh " * 40)
    with pytest.raises(ConfigError, match="too few"):
        calibration_sequences(tiny, Calibration(text=str(text), tokens=256, sequence_length=64), Evaluation(tokens=200, text=str(text)))
    sequences = calibration_sequences(tiny, Calibration(text=str(text), tokens=64, sequence_length=32), Evaluation(tokens=16))
    ids = tiny.tokenizer.encode(text.read_text()).ids
    assert sequences[-1][1:] == ids[-31:]  # the file's last tokens: the evaluation reads from its start


def test_the_compressed_reference_quantizes_inputs_of_quantized_linears_only(tiny):
    from llmship.compress.activations import int8_per_token_asymmetric
    from llmship.compress.algorithms import rtn
    from llmship.compress.record import QuantizedTensor, WeightRecord
    from llmship.compress.reference import FakeQuantLinear, compressed_reference

    grid = symmetric(4, 32, "bf16")
    name = "model.layers.1.mlp.up_proj"
    t = QuantizedTensor(name, grid, *rtn(tiny, {name: grid})[name])
    record = WeightRecord({name: t}, {name: {"scheme": "int8_per_token_asymmetric"}}, "rtn")
    decoder = compressed_reference(tiny, record, 32)
    up = decoder.model.layers[1].mlp.up_proj
    assert isinstance(up, FakeQuantLinear) and torch.equal(up.linear.weight, t.dequantize())
    assert not isinstance(decoder.model.layers[0].mlp.up_proj, FakeQuantLinear)
    x = torch.randn(1, 5, up.linear.in_features)
    assert torch.equal(up(x), torch.nn.functional.linear(int8_per_token_asymmetric(x), t.dequantize()))


def test_gptq_leaves_the_source_weights_as_they_were(tiny, tmp_path, monkeypatch):
    """GPTQ quantizes layer by layer through a decoder; the source it came from (whose weights the FP32 reference of
    the same process is built on) keeps its own values. A build once validated against a half-quantized reference."""
    from llmship.compress import build_record
    from llmship.config import Calibration, Evaluation

    monkeypatch.setenv("LLMSHIP_CACHE", str(tmp_path))
    grid = symmetric(4, 32)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    before = {n: tiny.weights[f"{n}.weight"].clone() for n in names if f"{n}.weight" in tiny.weights}
    record = build_record(tiny, {n: grid for n in before}, {}, "gptq", Calibration(tokens=256, sequence_length=64), Evaluation())
    for n, w in before.items():
        assert torch.equal(tiny.weights[f"{n}.weight"], w), n
        assert not torch.equal(record.tensors[n].dequantize(), w)


def test_cache_entries_are_written_whole_under_a_name_of_the_writers_own(tmp_path):
    """Builds sharing ~/.cache/llmship (a release gate's jobs on one runner) write the same entry at once: each writes
    its own temporary file and renames it, so a reader sees a whole entry or none, and a failed write leaves the old."""
    import os

    import numpy as np

    from llmship.outputs import write_atomically

    path, seen = tmp_path / "entry.npz", []

    def write(tmp):
        seen.append(tmp.name)
        np.savez(tmp, a=np.arange(3))

    write_atomically(path, write)
    assert str(os.getpid()) in seen[0] and seen[0].endswith(".npz")  # numpy would append .npz to any other name
    with np.load(path) as data:
        assert data["a"].tolist() == [0, 1, 2]

    def fails(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(path, fails)
    assert [p.name for p in tmp_path.iterdir()] == ["entry.npz"]
    with np.load(path) as data:
        assert data["a"].tolist() == [0, 1, 2]
