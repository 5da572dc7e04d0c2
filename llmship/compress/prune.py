"""Structured pruning by measured importance (Minitron's recipe, on the calibration tokens).

- FFN channel j of a layer: ||a_j||_2 over the calibration tokens (a = silu(gate) * up, the input of down_proj)
  times ||W_down[:, j]||_2: the size of what channel j adds to the residual stream. Every layer keeps the same
  number of channels, the highest-scoring ones, in their original order.
- Attention head h of a layer: ||o_h||_2 over the tokens (its attention output, the input of o_proj) times the
  Frobenius norm of o_proj's columns for it. Each KV group keeps the same number of its query heads (the KV heads
  all stay), so every layer keeps the same GQA layout.
- A layer: its block influence, 1 - mean cos(x_in, x_out) of the residual stream around it (ShortGPT): the layers
  that change the stream least are removed.

Both are measured in one pass of the FP32 model. The pruned model is an ordinary model of the same family with
fewer layers and a narrower FFN: every runtime runs it at full speed, unlike unstructured sparsity.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Importance:
    ffn: list  # per layer, each FFN channel's score [F]
    heads: list  # per layer, each query head's score [num_heads]
    layers: torch.Tensor  # per layer, its block influence [L]


def kept_width(ffn: int, fraction: float) -> int:
    """The FFN width after removing `fraction` of `ffn` channels, rounded to a multiple of 32 (8 below 256 channels)
    so 4-bit groups and kernels' tiles still divide it."""
    align = 32 if ffn >= 256 else 8
    return max(align, int(round(ffn * (1 - fraction) / align)) * align) if fraction > 0 else ffn


@torch.no_grad()
def importance(decoder, sequences: list[list[int]], batch: int = 4) -> Importance:
    """The score of every FFN channel, attention head and layer of `decoder` over `sequences`."""
    layers = decoder.model.layers
    spec = decoder.spec
    sq = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    head_sq = [torch.zeros(spec.num_heads, dtype=torch.float64) for _ in layers]
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)
    count = 0

    def channels(i):
        def hook(_module, args):  # the input of down_proj: one activation per FFN channel
            sq[i] += args[0].double().pow(2).sum(dim=(0, 1))
        return hook

    def heads(i):
        def hook(_module, args):  # the input of o_proj: the heads' outputs side by side
            head_sq[i] += args[0].double().reshape(-1, spec.num_heads, spec.head_dim).pow(2).sum(dim=(0, 2))
        return hook

    def influence(i):
        def hook(_module, args, out):  # the residual stream before and after layer i
            cos_sum[i] += torch.nn.functional.cosine_similarity(args[0].double(), out[0].double(), dim=-1).sum()
        return hook

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(channels(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(heads(i)))
        hooks.append(layer.register_forward_hook(influence(i)))
    try:
        tokens = torch.tensor(sequences, dtype=torch.int64)
        for start in range(0, len(tokens), batch):
            chunk = tokens[start:start + batch]
            run_sequences(decoder, chunk)
            count += chunk.numel()
    finally:
        for h in hooks:
            h.remove()
    ffn = [(s.sqrt() * layer.mlp.down_proj.weight.double().norm(dim=0)).float() for s, layer in zip(sq, layers)]
    head = [(s.sqrt() * layer.self_attn.o_proj.weight.double().reshape(-1, spec.num_heads, spec.head_dim).pow(2).sum(dim=(0, 2)).sqrt()).float()
            for s, layer in zip(head_sq, layers)]
    return Importance(ffn, head, (1 - cos_sum / count).float())


def kept_heads(scores: torch.Tensor, num_heads: int, num_kv_heads: int, per_group: int) -> torch.Tensor:
    """The query heads to keep, ascending: the best `per_group` of each KV group (heads g*group .. (g+1)*group - 1)."""
    group = num_heads // num_kv_heads
    keep = [g * group + torch.argsort(scores[g * group:(g + 1) * group], descending=True)[:per_group] for g in range(num_kv_heads)]
    return torch.sort(torch.cat(keep)).values


def run_sequences(decoder, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, vocab] of whole sequences from position 0 (a fresh cache per call; gradients flow)."""
    b, t = tokens.shape
    shape = (b, decoder.spec.num_kv_heads, decoder.max_context, decoder.spec.head_dim)
    dtype = decoder.k_cache_0.dtype
    ks = [torch.zeros(shape, dtype=dtype) for _ in range(decoder.spec.num_layers)]
    vs = [torch.zeros(shape, dtype=dtype) for _ in range(decoder.spec.num_layers)]
    return decoder.forward_with_cache(tokens, torch.zeros(1, dtype=torch.int64), ks, vs)[0]


def pruned(loaded, scores: Importance, ffn: float = 0.0, heads: float = 0.0, layers: int = 0):
    """(`loaded` with the `layers` least influential layers removed, every remaining layer's FFN cut to its best
    `kept_width` channels and each KV group's query heads to its best ones: new tensors, the original's untouched;
    what was kept, for the manifest)."""
    from llmship.errors import ConfigError

    spec = loaded.spec
    if layers >= spec.num_layers:
        raise ConfigError(f"compression.prune.layers {layers}: {loaded.source} has {spec.num_layers} layers; at least one must stay")
    drop = set(torch.argsort(scores.layers)[:layers].tolist()) if layers else set()
    keep = [i for i in range(spec.num_layers) if i not in drop]
    width = kept_width(spec.intermediate_size, ffn)
    group = spec.num_heads // spec.num_kv_heads
    per_group = max(1, int(round(group * (1 - heads))))
    hd = spec.head_dim
    weights, kept_by_layer = {}, {}
    for name, w in loaded.weights.items():
        if not name.startswith("model.layers."):
            weights[name] = w.clone()
            continue
        index, rest = name[len("model.layers."):].split(".", 1)
        i = int(index)
        if i in drop:
            continue
        if width < spec.intermediate_size and rest.startswith("mlp."):
            channels = torch.sort(torch.argsort(scores.ffn[i], descending=True)[:width]).values
            w = w.index_select(1 if rest == "mlp.down_proj.weight" else 0, channels)
        if per_group < group and rest.startswith(("self_attn.q_proj.", "self_attn.o_proj.weight")):
            kept = kept_by_layer.setdefault(i, kept_heads(scores.heads[i], spec.num_heads, spec.num_kv_heads, per_group))
            rows = (kept[:, None] * hd + torch.arange(hd)).reshape(-1)
            w = w.index_select(1 if rest == "self_attn.o_proj.weight" else 0, rows)
        weights[f"model.layers.{keep.index(i)}.{rest}"] = w.clone()
    per_layer = {f: tuple(v[i] for i in keep) if v is not None else None for f, v in
                 (("sliding_layers", spec.sliding_layers), ("rope_layers", spec.rope_layers))}
    student = dataclasses.replace(spec, num_layers=len(keep), intermediate_size=width, num_heads=per_group * spec.num_kv_heads,
                                  **per_layer)
    config = dict(loaded.config, num_hidden_layers=len(keep), intermediate_size=width,
                  num_attention_heads=student.num_heads, head_dim=hd)
    for key in ("layer_types", "no_rope_layers"):  # per-layer lists follow the layers kept
        if isinstance(config.get(key), list):
            config[key] = [config[key][i] for i in keep]
    kept = {"layers": keep, "ffn_width": width, "ffn_width_before": spec.intermediate_size, "num_heads": student.num_heads,
            "num_heads_before": spec.num_heads, "heads_per_layer": {str(keep.index(i)): h.tolist() for i, h in sorted(kept_by_layer.items())},
            "params_before": spec.num_params, "params": student.num_params}
    return dataclasses.replace(loaded, spec=student, config=config, weights=weights, source_blocks={}), kept
