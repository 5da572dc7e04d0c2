"""The compression algorithms, one registry entry each: given the model, the grid of every matrix and the
calibration sequences, return the codes, scales and zero points of every matrix on its grid.

  rtn     round-to-nearest on the grid, each group's scale chosen by a clip search on the weight error
  gptq    GPTQ (llmship/compress/gptq.py) layer by layer: each layer's Hessians come from the inputs the
          already-quantized layers before it produce on the calibration sequences (sequential GPTQ). The
          embedding (and a head tied to it) is a lookup table first: it is rounded to nearest.
  source  the source's own blocks (a GGUF's Q4_0 / Q4_1 / Q8_0) where the grid can hold them exactly;
          elsewhere round-to-nearest, and the record says which matrices and why
"""
from __future__ import annotations

import torch

from llmship.compress.gptq import GptqFailed, HessianAccumulator, gptq
from llmship.compress.grids import Grid
from llmship.compress.plan import EMBEDDING, PROJECTIONS
from llmship.progress import bar

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
# inputs shared by several projections: one Hessian each
SHARED_INPUT = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
                "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "mlp_mid"}


def weight_of(loaded, name: str) -> torch.Tensor:
    return loaded.weights[f"{name}.weight"].float()


def rtn(loaded, grids: dict[str, Grid], sequences=None, notes=None) -> dict[str, Quantized]:
    return {name: grid.rtn(weight_of(loaded, name), "mse") for name, grid in bar(grids.items(), "rtn", len(grids), unit="matrix")}


def gptq_sequential(loaded, grids: dict[str, Grid], sequences, notes: dict) -> dict[str, Quantized]:
    """GPTQ through the model, one layer at a time, on the calibration sequences (a list of token lists)."""
    from llmship.models import build_decoder
    from llmship.models.decoder import causal_mask

    length = max(len(s) for s in sequences)
    # The decoder shares the source's tensors; the projections it quantizes as it goes get their own copies, so the
    # source (and with it the FP32 reference of the same process) keeps its weights.
    own = {f"{name}.weight": loaded.weights[f"{name}.weight"].clone() for name in grids if name.startswith("model.layers.")}
    decoder = build_decoder(loaded, length, weights={**loaded.weights, **own})
    out: dict[str, Quantized] = {}
    tokens = torch.tensor(sequences, dtype=torch.int64)
    positions = torch.arange(tokens.shape[1])
    ropes = decoder.rope(positions)  # per layer (cos, sin)
    mask = causal_mask(positions, length)
    with torch.no_grad():
        hidden = decoder.model.embed(tokens)
        for i, layer in enumerate(bar(decoder.model.layers, "gptq", len(decoder.model.layers), unit="layer")):
            prefix = f"model.layers.{i}."
            todo = {p: grids[prefix + p] for p in PROJECTIONS if prefix + p in grids}
            if todo:
                hessians = _layer_hessians(layer, hidden, *ropes[i], positions, mask, decoder, set(SHARED_INPUT[p] for p in todo))
                for proj, grid in todo.items():
                    module = layer.get_submodule(proj)
                    quantized = _gptq_or_rtn(module.weight.float(), hessians[SHARED_INPUT[proj]], grid, prefix + proj, notes)
                    out[prefix + proj] = quantized
                    module.weight.copy_(grid.dequantize(*quantized))  # the next layers see this layer quantized
            hidden = _run_layer(layer, hidden, *ropes[i], positions, mask, decoder)
        head = "lm_head"
        if head in grids:
            acc = HessianAccumulator(decoder.spec.hidden_size)
            acc.add(decoder.model.norm(hidden))
            out[head] = _gptq_or_rtn(weight_of(loaded, head), acc.hessian, grids[head], head, notes)
    if EMBEDDING in grids:
        out[EMBEDDING] = grids[EMBEDDING].rtn(weight_of(loaded, EMBEDDING), "mse")
        notes.setdefault("round_to_nearest", []).append(EMBEDDING)
    return out


def _run_layer(layer, hidden, cos, sin, positions, mask, decoder, batch: int = 8):
    """The layer applied to every calibration sequence (fresh cache each: sequences start at position 0)."""
    outs = []
    for b0 in range(0, hidden.shape[0], batch):
        x = hidden[b0:b0 + batch]
        shape = (x.shape[0], decoder.spec.num_kv_heads, decoder.max_context, decoder.spec.head_dim)
        kc, vc = torch.zeros(shape), torch.zeros(shape)
        outs.append(layer(x, cos, sin, positions, mask, kc, vc, False)[0])
    return torch.cat(outs)


def _layer_hessians(layer, hidden, cos, sin, positions, mask, decoder, wanted: set[str]) -> dict[str, torch.Tensor]:
    """Hessians of the inputs of the layer's projections (one per distinct input), from one pass over the data."""
    taps = {"attn_in": "self_attn.q_proj", "attn_out": "self_attn.o_proj", "mlp_in": "mlp.gate_proj", "mlp_mid": "mlp.down_proj"}
    accs = {k: HessianAccumulator(layer.get_submodule(taps[k]).in_features) for k in wanted}
    hooks = [layer.get_submodule(taps[k]).register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0]))
             for k, acc in accs.items()]
    try:
        _run_layer(layer, hidden, cos, sin, positions, mask, decoder)
    finally:
        for h in hooks:
            h.remove()
    return {k: acc.hessian for k, acc in accs.items()}


def _gptq_or_rtn(weight, hessian, grid, name, notes) -> Quantized:
    try:
        return gptq(weight, hessian, grid)
    except GptqFailed as exc:
        notes.setdefault("gptq_failed", {})[name] = exc.reason
        return exc.fallback


def source_blocks(loaded, grids: dict[str, Grid], sequences=None, notes=None) -> dict[str, Quantized]:
    """The source's own quantized blocks on grids that hold them exactly; round-to-nearest for the rest."""
    from llmship.compress import source

    out = {}
    for name, grid in grids.items():
        kept = loaded.source_blocks.get(name)
        reason = "the source stores it in float" if kept is None else source.fits(kept, grid)
        if reason is None:
            out[name] = source.on(kept, grid)
            if kept.kind == "Q4_1" and grid.zero_dtype != "fp32":
                notes.setdefault("source_zero_point_rounded", []).append(name)
        else:
            notes.setdefault("source_grid_not_kept", {})[name] = reason
            out[name] = grid.rtn(weight_of(loaded, name), "mse")
    return out


ALGORITHMS = {"rtn": rtn, "gptq": gptq_sequential, "source": source_blocks}
NEEDS_CALIBRATION = {"gptq"}
