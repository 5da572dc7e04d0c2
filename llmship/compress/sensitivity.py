"""How much each matrix's quantization costs, per candidate grid: what mixed precision allocates bits by.

sensitivity(matrix, grid) estimates the KL of the model's output (against the FP32 model, on calibration
tokens) when only that matrix is rounded to that grid:
  - measured, for the reference candidate of each matrix (its cheapest grid): the matrix alone replaced by its
    round-to-nearest weights, the model run from that matrix's layer on (the hidden states entering each layer
    are computed once), KL averaged over the calibration positions;
  - for the other candidates of the matrix (larger groups, 8-bit), scaled from the measured one by the ratio of
    their Hessian-weighted weight errors tr(dW H dW^T), which is what the layer's output error is to second
    order (H from the same calibration inputs, as GPTQ's). Its ranking against measured KL is checked in tests
    and stated in the bench.
  - float candidates cost 0.
"""
from __future__ import annotations

import torch

from llmship.compress.algorithms import SHARED_INPUT, _run_layer
from llmship.compress.gptq import HessianAccumulator
from llmship.compress.grids import Grid
from llmship.compress.plan import EMBEDDING, HEAD, PROJECTIONS
from llmship.progress import bar


def _kl(logits: torch.Tensor, ref: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).mean())


class Probe:
    """The FP32 model on the calibration sequences, with every layer's input kept, to rerun from any layer."""

    def __init__(self, loaded, sequences: list[list[int]]):
        from llmship.models import build_decoder
        from llmship.models.decoder import causal_mask

        self.loaded = loaded
        length = max(len(s) for s in sequences)
        self.decoder = build_decoder(loaded, length)
        tokens = torch.tensor(sequences, dtype=torch.int64)
        self.positions = torch.arange(tokens.shape[1])
        d = self.decoder
        self.ropes = d.rope(self.positions)  # per layer (cos, sin)
        self.mask = causal_mask(self.positions, length)
        self.tokens = tokens
        with torch.no_grad():
            h = d.model.embed(tokens)
            self.inputs = []
            for i in range(len(d.model.layers)):
                self.inputs.append(h)
                h = self.layer(i, h)
            self.final = h
            self.logits = self.head(h)

    def layer(self, i: int, h):
        """Layer i of the model applied to its input h."""
        return _run_layer(self.decoder.model.layers[i], h, *self.ropes[i], self.positions, self.mask, self.decoder)

    def head(self, h):
        return self.decoder.lm_head(self.decoder.model.norm(h))

    def from_layer(self, start: int) -> torch.Tensor:
        h = self.inputs[start]
        for i in range(start, len(self.decoder.model.layers)):
            h = self.layer(i, h)
        return self.head(h)

    def kl_with(self, name: str, weight: torch.Tensor) -> float:
        """KL of the output with the weight of module `name` replaced by `weight` (then restored)."""
        d = self.decoder
        with torch.no_grad():
            if name == EMBEDDING:  # the lookup (and a head tied to it): the whole model
                original = d.model.embed_tokens.weight.data
                d.model.embed_tokens.weight.data = weight
                try:
                    h = d.model.embed(self.tokens)
                    for i in range(len(d.model.layers)):
                        h = self.layer(i, h)
                    return _kl(self.head(h), self.logits)
                finally:
                    d.model.embed_tokens.weight.data = original
            module = d.get_submodule(name)
            original = module.weight.data
            module.weight.data = weight
            try:
                if name == HEAD:
                    return _kl(self.head(self.final), self.logits)
                return _kl(self.from_layer(int(name.split(".")[2])), self.logits)
            finally:
                module.weight.data = original

    def hessians(self) -> dict[str, torch.Tensor]:
        """H of every projection's input (one per distinct input) and of the head's."""
        out: dict[str, torch.Tensor] = {}
        taps = {"attn_in": "self_attn.q_proj", "attn_out": "self_attn.o_proj", "mlp_in": "mlp.gate_proj", "mlp_mid": "mlp.down_proj"}
        with torch.no_grad():
            for i, layer in enumerate(self.decoder.model.layers):
                accs = {k: HessianAccumulator(layer.get_submodule(p).in_features) for k, p in taps.items()}
                hooks = [layer.get_submodule(taps[k]).register_forward_pre_hook(lambda m, a, acc=acc: acc.add(a[0]))
                         for k, acc in accs.items()]
                try:
                    self.layer(i, self.inputs[i])
                finally:
                    for h in hooks:
                        h.remove()
                for proj in PROJECTIONS:
                    out[f"model.layers.{i}.{proj}"] = accs[SHARED_INPUT[proj]].hessian
            acc = HessianAccumulator(self.decoder.spec.hidden_size)
            acc.add(self.decoder.model.norm(self.final))
            out[HEAD] = acc.hessian
        return out


def weighted_error(w: torch.Tensor, grid: Grid, hessian: torch.Tensor | None) -> float:
    """tr(dW H dW^T) for round-to-nearest on `grid` (plain squared error without a Hessian, e.g. the embedding)."""
    dw = (grid.dequantize(*grid.rtn(w, "mse")) - w).double()
    return float((dw @ hessian * dw).sum()) if hessian is not None else float((dw * dw).sum())


def sensitivities(loaded, candidates: dict[str, dict[str, Grid | None]], sequences: list[list[int]]) -> dict[str, dict[str, float]]:
    """{module: {candidate: estimated KL}} for every module's candidate grids (None = stays float: 0)."""
    probe = Probe(loaded, sequences)
    hessians = probe.hessians()
    out: dict[str, dict[str, float]] = {}
    for name, options in bar(candidates.items(), "sensitivity", len(candidates), unit="matrix"):
        w = loaded.weights[f"{name}.weight"].float()
        quantized = {k: g for k, g in options.items() if g is not None}
        out[name] = {k: 0.0 for k, g in options.items() if g is None}
        if not quantized:
            continue
        h = hessians.get(name)  # the tied embedding has none: its errors are weighted equally
        errors = {k: weighted_error(w, g, h) for k, g in quantized.items()}
        base = max(errors, key=errors.get)  # the coarsest candidate: its KL is measured, the others scaled
        grid = quantized[base]
        measured = probe.kl_with(name, grid.dequantize(*grid.rtn(w, "mse")))
        for k in quantized:
            out[name][k] = measured * (errors[k] / errors[base] if errors[base] > 0 else 0.0)
    return out
