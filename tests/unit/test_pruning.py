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
    """FFN channel j: ||silu(gate) * up||_2 over every token times ||W_down[:, j]||_2; head h: ||o_h||_2 times the norm
    of o_proj's columns for it; layer i: 1 - mean cosine of the residual stream before and after it. The oracle reads
    transformers' model, not the canonical one."""
    seqs = sequences(tiny.spec.vocab_size)
    got = importance(build_decoder(tiny, 24), seqs, batch=4)
    scores, influence = got.ffn, got.layers
    hf = hf_from_loaded(tiny)
    acts, outs = {}, {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a, i=i: acts.setdefault(i, []).append(a[0].double()))
             for i, layer in enumerate(hf.model.layers)]
    hooks += [layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a, i=i: outs.setdefault(i, []).append(a[0].double()))
              for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        out = hf(torch.tensor(seqs), output_hidden_states=True)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(hf.model.layers):
        a = torch.cat(acts[i]).reshape(-1, layer.mlp.down_proj.in_features)
        expected = a.pow(2).sum(0).sqrt() * layer.mlp.down_proj.weight.double().norm(dim=0)
        torch.testing.assert_close(scores[i].double(), expected, rtol=1e-4, atol=1e-6)
        hd, o = tiny.spec.head_dim, torch.cat(outs[i]).reshape(-1, tiny.spec.num_heads, tiny.spec.head_dim)
        w = layer.self_attn.o_proj.weight.double()
        expected = torch.stack([o[:, h].pow(2).sum().sqrt() * w[:, h * hd:(h + 1) * hd].norm() for h in range(tiny.spec.num_heads)])
        torch.testing.assert_close(got.heads[i].double(), expected, rtol=1e-4, atol=1e-6)
    hs = out.hidden_states  # the last one is after the final norm: the last layer's influence is checked by ordering only
    for i in range(tiny.spec.num_layers - 1):
        cos = F.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1).mean()
        assert abs(float(influence[i]) - float(1 - cos)) < 1e-5


def test_pruned_model_is_the_original_with_those_channels_heads_and_layer_switched_off(tiny):
    """Removing channels, heads and a layer equals zeroing what they add to the residual stream (down_proj's and
    o_proj's columns; the layer's o_proj and down_proj): the pruned model computes exactly the original's function
    minus those parts."""
    from llmship.compress.prune import kept_heads

    seqs = sequences(tiny.spec.vocab_size)
    scores = importance(build_decoder(tiny, 24), seqs)
    student, kept = pruned(tiny, scores, ffn=0.5, heads=0.5, layers=1)
    dropped = int(torch.argmin(scores.layers))
    assert kept["layers"] == [i for i in range(tiny.spec.num_layers) if i != dropped]
    assert student.spec.num_layers == tiny.spec.num_layers - 1 and student.spec.intermediate_size == kept["ffn_width"] == 80
    assert student.spec.num_heads == kept["num_heads"] == 2 and student.spec.num_kv_heads == tiny.spec.num_kv_heads == 2
    assert kept["params"] == student.spec.num_params < kept["params_before"]
    off, hd = dict(tiny.weights), tiny.spec.head_dim
    for i in range(tiny.spec.num_layers):
        p = f"model.layers.{i}"
        if i == dropped:
            off[f"{p}.self_attn.o_proj.weight"] = torch.zeros_like(off[f"{p}.self_attn.o_proj.weight"])
            off[f"{p}.mlp.down_proj.weight"] = torch.zeros_like(off[f"{p}.mlp.down_proj.weight"])
            continue
        removed = torch.argsort(scores.ffn[i], descending=True)[kept["ffn_width"]:]
        w = off[f"{p}.mlp.down_proj.weight"].clone()
        w[:, removed] = 0
        off[f"{p}.mlp.down_proj.weight"] = w
        heads = kept_heads(scores.heads[i], tiny.spec.num_heads, tiny.spec.num_kv_heads, 1)
        assert [int(h) // 2 for h in heads] == [0, 1]  # one query head of each KV group, the better one
        assert all(scores.heads[i][h] >= scores.heads[i][h ^ 1] for h in heads.tolist())
        w = off[f"{p}.self_attn.o_proj.weight"].clone()
        for h in set(range(tiny.spec.num_heads)) - set(heads.tolist()):
            w[:, h * hd:(h + 1) * hd] = 0
        off[f"{p}.self_attn.o_proj.weight"] = w
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
    student, _ = pruned(tiny, importance(teacher, seqs), ffn=0.5, layers=1)
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
    student, _ = pruned(stories, importance(teacher, train), ffn=0.25, layers=1)
    decoder = build_decoder(student, 128)
    before = _kl_to(teacher, decoder, held_out)
    result = heal(decoder, teacher, train, Heal(steps=60, lr=1e-3, batch=4), seed=3)
    after = _kl_to(teacher, decoder, held_out)
    assert result["loss"][-1] < result["loss"][0]
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("sets, message", [
    (["compression.heal.steps=10"], "nothing is pruned"),
    (["compression.prune.ffn=1.0"], "compression.prune.ffn"),
])
def test_structural_settings_that_cannot_be_built_are_exit_2(sets, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, sets)
    assert err.value.exit_code == 2


def test_removing_every_layer_is_refused(tiny):
    from llmship.compress.prune import Importance

    n = tiny.spec.num_layers
    scores = Importance([torch.ones(tiny.spec.intermediate_size)] * n, [torch.ones(tiny.spec.num_heads)] * n,
                        torch.arange(n, dtype=torch.float32))
    with pytest.raises(ConfigError, match="at least one must stay"):
        pruned(tiny, scores, layers=n)


def test_a_shared_block_is_one_module_at_two_depths_with_its_own_caches(tiny):
    """Layer 1 running layer 0's block computes exactly what the original model computes with layer 1's weights set
    to layer 0's; the block's parameters exist once, each depth keeps its own KV cache."""
    from llmship.compress.share import with_shared

    shared = with_shared(tiny, [0])
    assert shared.spec.shared_layers == (0, 0, 2) and shared.spec.weight_layers == [0, 2]
    assert not any(n.startswith("model.layers.1.") for n in shared.weights)
    per_layer = sum(w.numel() for n, w in tiny.weights.items() if n.startswith("model.layers.1."))
    assert shared.spec.num_params == tiny.spec.num_params - per_layer
    decoder = build_decoder(shared, 24)
    assert decoder.model.layers[0] is decoder.model.layers[1]
    assert sum(p.numel() for p in decoder.parameters()) == shared.spec.num_params
    copied = dict(tiny.weights)
    copied.update({n.replace("model.layers.0.", "model.layers.1."): w for n, w in tiny.weights.items() if n.startswith("model.layers.0.")})
    tokens = torch.tensor(sequences(tiny.spec.vocab_size)[:2])
    with torch.no_grad():
        torch.testing.assert_close(run_sequences(decoder, tokens), run_sequences(build_decoder(tiny, 24, weights=copied), tokens))
        # stepwise through the static cache: prefill then decode, each depth reading its own cache
        step = build_decoder(shared, 24)
        step.prefill(tokens[0, :10], 0)
        last = step.decode(int(tokens[0, 10]), 10)
        torch.testing.assert_close(last, run_sequences(decoder, tokens[:1, :11])[0, -1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(step.k_cache_0, step.k_cache_1)


def test_pairs_are_chosen_by_measured_cost_and_never_overlap(tiny):
    from llmship.compress.share import choose, pair_costs

    costs = pair_costs(tiny, sequences(tiny.spec.vocab_size))
    assert set(costs) == {0, 1} and all(c > 0 for c in costs.values())
    assert choose(costs, 1, "tiny") == [min(costs, key=costs.get)]
    assert choose({0: 0.3, 1: 0.1, 2: 0.2, 3: 0.4}, 2, "m") == [1, 3]
    with pytest.raises(ConfigError, match="only 1 adjacent pairs"):
        choose(costs, 2, "tiny")
