"""Calibration tokens: what GPTQ (and sensitivity measurements) learn the model's activations from.

Default: sequences sampled from the FP32 reference (temperature 1) with the calibration seed, all in one batch
so sampling 2,048 tokens costs 128 batched decode steps, not 2,048 single ones. The evaluation samples its own
sequence with its own seed, so the two never share tokens; the same seed for both is refused.
From a text file: the file's last tokens (the evaluation reads a file from its start), cut into sequences; when
the evaluation reads the same file, the two spans must not overlap.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmship.errors import ConfigError


def sample_sequences(decoder, bos: int | None, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` sequences of `length` tokens sampled from `decoder` (a MobileDecoder, max_context >= length)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = decoder.spec.vocab_size
    first = torch.full((count, 1), bos, dtype=torch.int64) if bos is not None else torch.randint(vocab, (count, 1), generator=gen)
    dtype = decoder.k_cache_0.dtype
    ks = [torch.zeros((count, *shape[1:]), dtype=dtype) for shape in decoder.cache_shapes]
    vs = [torch.zeros((count, *shape[1:]), dtype=dtype) for shape in decoder.cache_shapes]
    tokens = [first]
    with torch.no_grad():
        for pos in range(length - 1):
            logits, ks, vs = decoder.forward_with_cache(tokens[-1], torch.tensor([pos]), ks, vs)
            probs = torch.softmax(logits[:, -1].double(), dim=-1)
            tokens.append(torch.multinomial(probs, 1, generator=gen))
    return torch.cat(tokens, dim=1).tolist()


def text_sequences(tokenizer, bos: int | None, path: str, total: int, length: int) -> list[list[int]]:
    """The last `total` tokens of a text file, as sequences of `length` (each starting with BOS when the model has one)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"calibration text file not found: {path}")
    ids = tokenizer.encode(p.read_text(errors="replace")).ids
    body = length - (1 if bos is not None else 0)
    n = max(1, total // length)
    if len(ids) < n * body:
        raise ConfigError(f"calibration text {path} gives {len(ids)} tokens; {n * body} are needed "
                          f"(calibration.tokens {total} in sequences of {length})")
    tail = ids[len(ids) - n * body:]
    return [([bos] if bos is not None else []) + tail[i * body:(i + 1) * body] for i in range(n)]


def calibration_sequences(loaded, calibration, evaluation, eval_text: str | None = None) -> list[list[int]]:
    """The calibration sequences a build uses (deterministic for a source and settings)."""
    from llmship.models import build_decoder

    spec, length = loaded.spec, calibration.sequence_length
    count = max(1, calibration.tokens // length)
    eval_file = eval_text or evaluation.text
    if calibration.text:
        if eval_file and Path(eval_file).resolve() == Path(calibration.text).resolve():
            ids = len(loaded.tokenizer.encode(Path(eval_file).read_text(errors="replace")).ids)
            if ids < evaluation.tokens + count * length:
                raise ConfigError(f"calibration.text and the evaluation text are both {eval_file}, which gives {ids} tokens: "
                                  f"too few for {evaluation.tokens} evaluation and {count * length} calibration tokens apart")
        return text_sequences(loaded.tokenizer, spec.bos_token_id, calibration.text, calibration.tokens, length)
    if not eval_file and calibration.seed == evaluation.seed:
        raise ConfigError(f"calibration.seed and evaluation.seed are both {calibration.seed}: calibration and evaluation "
                          "would sample the same tokens; give them different seeds")
    decoder = build_decoder(loaded, length)
    return sample_sequences(decoder, spec.bos_token_id, count, length, calibration.seed)


def as_array(sequences: list[list[int]]) -> np.ndarray:
    return np.asarray(sequences, dtype=np.int64)
