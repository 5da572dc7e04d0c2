"""torch.export of the canonical model's two entry points; the exporters consume these programs."""
from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from llmship.models.decoder import CacheIODecoder, MobileDecoder


def example_tokens(t: int, dtype=torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros((1, t), dtype=dtype), torch.zeros((1,), dtype=torch.int64)


def export_stateful(decoder: MobileDecoder, max_prefill: int, token_dtype=torch.int64, more: tuple = ()) -> dict[str, ExportedProgram]:
    """prefill (T dynamic in [1, max_prefill], traced at 2) and decode (T = 1), the KV cache as mutated buffers;
    `more`: example tensors of inputs after (tokens, input_pos) (a module taking them as *args)."""
    programs = {}
    with torch.no_grad():
        if max_prefill > 1:
            seq = Dim("seq_len", min=1, max=max_prefill)
            shapes = ({1: seq}, None, *(None for _ in more))
            programs["prefill"] = torch.export.export(
                decoder, (*example_tokens(min(2, max_prefill), token_dtype), *more),
                dynamic_shapes=(shapes,) if more else shapes, strict=False
            )
        programs["decode"] = torch.export.export(decoder, (*example_tokens(1, token_dtype), *more), strict=False)
    return programs


def cache_inputs(decoder: MobileDecoder, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.zeros(shape, dtype=dtype) for shape in decoder.cache_shapes for _ in ("k", "v")]


def export_cache_io(decoder: MobileDecoder, prefill_len: int | None, token_dtype=torch.int64) -> ExportedProgram:
    """The functional graph (caches in, caches out) for one token count: `prefill_len`, or dynamic if None."""
    module = CacheIODecoder(decoder)
    t = 2 if prefill_len is None else prefill_len
    args = (*example_tokens(t, token_dtype), *cache_inputs(decoder))
    dynamic = None
    if prefill_len is None:
        seq = Dim("seq_len", min=1, max=decoder.max_chunk)
        dynamic = ({1: seq}, None, tuple([None] * (2 * decoder.spec.num_layers)))
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
