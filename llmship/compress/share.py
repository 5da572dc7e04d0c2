"""MobileLLM's immediate block-wise weight sharing, applied to a trained model: two adjacent layers run one block
(the first one's weights), so the file loses a layer's weights while the depth, and each layer's own KV cache, stay.

Which pairs: every adjacent pair whose layers attend alike (same RoPE and window) is tried on the calibration
tokens: layer i+1 runs layer i's block, and the KL of the output against the unshared model is that pair's cost.
The `pairs` cheapest pairs that do not overlap are shared; healing then trains each shared block for both depths.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from llmship.errors import ConfigError


def with_shared(loaded, firsts: list[int]):
    """`loaded` with layer i+1 running layer i's block for every i in `firsts` (its own tensors dropped)."""
    spec = loaded.spec
    owners = list(range(spec.num_layers)) if spec.shared_layers is None else list(spec.shared_layers)
    for i in firsts:
        owners[i + 1] = owners[i]
    sharers = tuple(f"model.layers.{i}." for i in range(spec.num_layers) if owners[i] != i)
    return dataclasses.replace(loaded, spec=dataclasses.replace(spec, shared_layers=tuple(owners)),
                               weights={n: w for n, w in loaded.weights.items() if not n.startswith(sharers)})


def candidates(spec) -> list[int]:
    """First layers of the adjacent pairs that may share a block: both own their weights and attend alike."""
    rope = spec.rope_layers or (True,) * spec.num_layers
    return [i for i in range(spec.num_layers - 1) if spec.owner_of(i) == i and spec.owner_of(i + 1) == i + 1
            and rope[i] == rope[i + 1] and spec.window_of(i) == spec.window_of(i + 1)]


@torch.no_grad()
def pair_costs(loaded, sequences: list[list[int]], batch: int = 4, count: int = 8) -> dict[int, float]:
    """For each candidate pair (by its first layer), the mean KL of the model's output when it shares that pair's block,
    against the model as it is, on the first `count` sequences."""
    from llmship.compress.prune import run_sequences
    from llmship.models import build_decoder

    tokens = torch.tensor(sequences[:count], dtype=torch.int64)
    length = tokens.shape[1]
    reference = build_decoder(loaded, length)
    ref = [F.log_softmax(run_sequences(reference, tokens[b:b + batch]).double(), -1) for b in range(0, len(tokens), batch)]
    costs = {}
    for i in candidates(loaded.spec):
        decoder = build_decoder(with_shared(loaded, [i]), length)
        kl = [(r.exp() * (r - F.log_softmax(run_sequences(decoder, tokens[b:b + batch]).double(), -1))).sum(-1)
              for r, b in zip(ref, range(0, len(tokens), batch))]
        costs[i] = float(torch.cat([k.reshape(-1) for k in kl]).mean())
    return costs


def choose(costs: dict[int, float], pairs: int, source: str) -> list[int]:
    """The `pairs` cheapest pairs that do not overlap (greedy by cost), as their first layers in order."""
    chosen: list[int] = []
    for i in sorted(costs, key=lambda i: (costs[i], i)):
        if len(chosen) < pairs and all(abs(i - j) > 1 for j in chosen):
            chosen.append(i)
    if len(chosen) < pairs:
        raise ConfigError(f"compression.share.pairs {pairs}: {source} has only {len(chosen)} adjacent pairs of layers that "
                          "attend alike and do not overlap")
    return sorted(chosen)
