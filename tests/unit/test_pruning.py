"""Structured pruning and healing (llmship/compress/prune.py, heal.py, structure.py) on builtin:tiny: the importance
scores against their textbook formulas computed through transformers' own model, the pruned model against the
original with the same channels and layer switched off, and healing's loss and determinism."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from llmship.compress.heal import distillation_loss, heal
from llmship.compress.prune import importance, kept_width, pruned, run_sequences
from llmship.config import Heal, load_config
from llmship.errors import ConfigError
from llmship.models import build_decoder, load_model
from tests.helpers import hf_from_loaded


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny")


def sequences(vocab: int, count: int = 6, length: int = 24, seed: int = 0) -> list[list[int]]:
    return torch.randint(vocab, (count, length), generator=torch.Generator().manual_seed(seed)).tolist()


def test_kept_width_rounds_to_kernel_multiples():
    assert kept_width(1536, 0.25) == 1152  # SmolLM2: 36 groups of 32
    assert kept_width(172, 0.25) == 128  # stories260K: multiples of 8 below 256 channels
    assert kept_width(160, 0.0) == 160
    assert kept_width(64, 0.99) == 8  # never below one tile


def test_importance_is_the_textbook_score_through_transformers(tiny):
    """FFN channel j: ||silu(gate) * up||_2 over every token times ||W_down[:, j]||_2; layer i: 1 - mean cosine of the
    residual stream before and after it. The oracle reads transformers' model, not the canonical one."""
    seqs = sequences(tiny.spec.vocab_size)
    scores, influence = importance(build_decoder(tiny, 24), seqs, batch=4)
    hf = hf_from_loaded(tiny)
    acts = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a, i=i: acts.setdefault(i, []).append(a[0].double()))
             for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        out = hf(torch.tensor(seqs), output_hidden_states=True)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(hf.model.layers):
        a = torch.cat(acts[i]).reshape(-1, layer.mlp.down_proj.in_features)
        expected = a.pow(2).sum(0).sqrt() * layer.mlp.down_proj.weight.double().norm(dim=0)
        torch.testing.assert_close(scores[i].double(), expected, rtol=1e-4, atol=1e-6)
    hs = out.hidden_states  # the last one is after the final norm: the last layer's influence is checked by ordering only
    for i in range(tiny.spec.num_layers - 1):
        cos = F.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1).mean()
        assert abs(float(influence[i]) - float(1 - cos)) < 1e-5


def test_pruned_model_is_the_original_with_those_channels_and_layer_switched_off(tiny):
    """Removing channels and a layer equals zeroing what they add to the residual stream (down_proj's columns; the
    layer's o_proj and down_proj): the pruned model computes exactly the original's function minus those parts."""
    seqs = sequences(tiny.spec.vocab_size)
    scores, influence = importance(build_decoder(tiny, 24), seqs)
    student, kept = pruned(tiny, scores, influence, ffn=0.5, layers=1)
    dropped = int(torch.argmin(influence))
    assert kept["layers"] == [i for i in range(tiny.spec.num_layers) if i != dropped]
    assert student.spec.num_layers == tiny.spec.num_layers - 1 and student.spec.intermediate_size == kept["ffn_width"] == 80
    assert kept["params"] == student.spec.num_params < kept["params_before"]
    off = dict(tiny.weights)
    for i in range(tiny.spec.num_layers):
        p = f"model.layers.{i}"
        if i == dropped:
            off[f"{p}.self_attn.o_proj.weight"] = torch.zeros_like(off[f"{p}.self_attn.o_proj.weight"])
            off[f"{p}.mlp.down_proj.weight"] = torch.zeros_like(off[f"{p}.mlp.down_proj.weight"])
            continue
        removed = torch.argsort(scores[i], descending=True)[kept["ffn_width"]:]
        assert float(scores[i][removed].max()) <= float(torch.sort(scores[i], descending=True).values[kept["ffn_width"] - 1])
        w = off[f"{p}.mlp.down_proj.weight"].clone()
        w[:, removed] = 0
        off[f"{p}.mlp.down_proj.weight"] = w
    tokens = torch.tensor(seqs[:2])
    with torch.no_grad():
        expected = run_sequences(build_decoder(tiny, 24, weights=off), tokens)
        got = run_sequences(build_decoder(student, 24), tokens)
        original = run_sequences(build_decoder(tiny, 24), tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - original).abs().max() > 1e-2  # and that is not the original's function


def test_distillation_loss_is_kl_plus_cross_entropy():
    torch.manual_seed(0)
    s, t, tokens = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(11, (2, 5))
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(distillation_loss(s, t, tokens, 0.25), 0.75 * kl + 0.25 * ce)


def _kl_to(teacher, student, tokens) -> float:
    with torch.no_grad():
        t, s = F.log_softmax(run_sequences(teacher, tokens), -1), F.log_softmax(run_sequences(student, tokens), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_healing_is_deterministic_and_leaves_its_input_alone(tiny):
    seqs = sequences(tiny.spec.vocab_size, 8, 24, seed=1)
    teacher = build_decoder(tiny, 24)
    student, _ = pruned(tiny, *importance(teacher, seqs), ffn=0.5, layers=1)
    trained = []
    for _ in range(2):
        decoder = build_decoder(dataclasses.replace(student, weights={n: w.clone() for n, w in student.weights.items()}), 24)
        result = heal(decoder, teacher, seqs, Heal(steps=12, lr=1e-3, batch=4), seed=3)
        assert len(result["loss"]) == 12 and result["seconds_per_step"] > 0
        trained.append([p.detach().clone() for p in decoder.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*trained))  # same seed, same student
    assert not torch.equal(trained[0][0], student.weights["model.embed_tokens.weight"])  # it did train
    assert not any(p.requires_grad for p in decoder.parameters())


@pytest.mark.shared
def test_healing_wins_back_most_of_the_kl_pruning_cost_on_held_out_text(stories):
    """stories260K (a trained model) with a quarter of its FFN and one layer removed, healed on sequences sampled from
    it: KL to the original on other sampled sequences drops by more than half."""
    from llmship.compress.calibration import sample_sequences

    teacher = build_decoder(stories, 128)
    train = sample_sequences(teacher, 1, 32, 128, seed=1)
    held_out = torch.tensor(sample_sequences(teacher, 1, 4, 128, seed=2))
    student, _ = pruned(stories, *importance(teacher, train), ffn=0.25, layers=1)
    decoder = build_decoder(student, 128)
    before = _kl_to(teacher, decoder, held_out)
    result = heal(decoder, teacher, train, Heal(steps=60, lr=1e-3, batch=4), seed=3)
    after = _kl_to(teacher, decoder, held_out)
    assert result["loss"][-1] < result["loss"][0]
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("sets, message", [
    (["compression.prune.heads=0.25"], "head pruning is not built yet"),
    (["compression.share.pairs=2"], "layer sharing is not built yet"),
    (["compression.heal.steps=10"], "nothing is pruned"),
    (["compression.prune.ffn=1.0"], "compression.prune.ffn"),
])
def test_structural_settings_that_cannot_be_built_are_exit_2(sets, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, sets)
    assert err.value.exit_code == 2


def test_removing_every_layer_is_refused(tiny):
    scores = [torch.ones(tiny.spec.intermediate_size)] * tiny.spec.num_layers
    with pytest.raises(ConfigError, match="at least one must stay"):
        pruned(tiny, scores, torch.arange(tiny.spec.num_layers, dtype=torch.float32), ffn=0.0, layers=tiny.spec.num_layers)
