"""Evaluation through a runner's own entry points: teacher-forced logits and greedy generation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmship.errors import ConfigError
from llmship.progress import bar


# Fewer scored tokens than this and top-1 / KL are anecdotes, not measurements.
MIN_TEXT_TOKENS = 16


@dataclass(frozen=True)
class EvalPlan:
    tokens: tuple[int, ...]  # teacher-forced sequence
    prefill_tokens: int  # how many of them go through prefill (in chunks); the rest through decode
    chunk: int  # prefill chunk length
    prompts: tuple[tuple[int, ...], ...]  # greedy-generation prompts (token ids)
    greedy_tokens: int


def teacher_forced(runner, plan: EvalPlan, desc: str = "teacher-forced") -> np.ndarray:
    """Logits [N, vocab] at every position: prefill chunks first, then one decode step per token."""
    runner.reset()
    toks, out = plan.tokens, []
    for start in range(0, plan.prefill_tokens, plan.chunk):
        out.append(np.asarray(runner.prefill(toks[start:min(start + plan.chunk, plan.prefill_tokens)], start), dtype=np.float32))
    for pos in bar(range(plan.prefill_tokens, len(toks)), desc, len(toks) - plan.prefill_tokens):
        out.append(np.asarray(runner.decode(toks[pos], pos), dtype=np.float32)[None, :])
    return np.concatenate(out, axis=0)


def greedy(runner, prompt: Sequence[int], steps: int, chunk: int) -> list[int]:
    runner.reset()
    logits = None
    for start in range(0, len(prompt), chunk):
        logits = runner.prefill(prompt[start:start + chunk], start)
    token = int(np.argmax(logits[-1]))
    out, pos = [token], len(prompt)
    while len(out) < steps:
        token = int(np.argmax(runner.decode(token, pos)))
        out.append(token)
        pos += 1
    return out


def sample_text(reference, bos: int | None, n: int, seed: int, vocab: int) -> list[int]:
    """Evaluation tokens sampled from the FP32 reference (temperature 1) with a fixed seed: text the model
    finds plausible, so the metrics are measured where the model is used, and no data file is needed."""
    rng = np.random.default_rng(seed)
    reference.reset()
    tokens = [bos if bos is not None else int(rng.integers(vocab))]
    logits = reference.prefill(tokens, 0)[-1]
    for pos in bar(range(1, n), "sampling eval text", n - 1):
        p = np.exp(logits - logits.max())
        tokens.append(int(rng.choice(len(p), p=p / p.sum())))
        logits = reference.decode(tokens[-1], pos)
    return tokens


def make_plan(reference, tokenizer, spec, target, evaluation, eval_text: str | None) -> EvalPlan:
    n = min(evaluation.tokens, target.max_context)
    bos = spec.bos_token_id
    text = eval_text or evaluation.text
    if text:
        from pathlib import Path

        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"evaluation text file not found: {text}")
        ids = tokenizer.encode(path.read_text(errors="replace")).ids
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        needed = min(n, MIN_TEXT_TOKENS)
        if len(ids) < needed:
            raise ConfigError(f"evaluation text {text} gives {len(ids)} tokens; at least {needed} are needed for the "
                              "metrics to mean anything")
        tokens = ids[:n]
    else:
        tokens = sample_text(reference, bos, n, evaluation.seed, spec.vocab_size)
    chunk = min(target.prefill_lengths)
    prefill = max(1, min(len(tokens) // 2, max(target.prefill_lengths)))
    prompts = []
    for p in evaluation.prompts:
        ids = tokenizer.encode(p).ids
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        prompts.append(tuple(ids[: max(target.prefill_lengths)]))
    return EvalPlan(tuple(tokens), prefill, chunk, tuple(prompts), min(evaluation.greedy_tokens, target.max_context - max(map(len, prompts))))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def parity_metrics(logits: np.ndarray, ref: np.ndarray, tokens: Sequence[int]) -> tuple[dict, dict]:
    """Numbers for report.json's `parity`, and per-position series for the report's plots."""
    if logits.shape != ref.shape:
        raise ConfigError(f"artifact logits have shape {logits.shape}, reference {ref.shape}")
    diff = np.abs(logits.astype(np.float64) - ref.astype(np.float64))
    cos = (logits * ref).sum(-1) / (np.linalg.norm(logits, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-30)
    lp, lq = log_softmax(ref), log_softmax(logits)
    kl = np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)
    targets = np.asarray(tokens[1:])
    idx = np.arange(len(targets))
    nll, nll_ref = -lq[idx, targets], -lp[idx, targets]
    finite = bool(np.isfinite(logits).all())
    if not finite:
        # NaN/Inf logits: no metric measures anything, and each must fail its gate. Errors are null (a gate on a
        # value not measured fails); agreement and cosine take their worst values.
        metrics = {"max_abs_err": None, "mean_abs_err": None, "cosine_min": -1.0, "top1_agreement": 0.0, "kl_mean": None,
                   "kl_p99": None, "ppl_reference": float(np.exp(nll_ref.mean())), "ppl": None,
                   "eval_tokens": int(len(tokens)), "finite": False}
        return metrics, {"kl": [], "max_abs_err": []}
    metrics = {
        "max_abs_err": float(diff.max()),
        "mean_abs_err": float(diff.mean()),
        "cosine_min": float(np.nan_to_num(cos, nan=-1.0).min()),
        "top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "ppl_reference": float(np.exp(nll_ref.mean())),
        "ppl": float(np.exp(nll.mean())),
        "eval_tokens": int(len(tokens)),
        "finite": True,
    }
    series = {"kl": [round(float(v), 8) for v in kl], "max_abs_err": [round(float(v), 6) for v in diff.max(-1)]}
    return metrics, series


def greedy_match(ours: Sequence[int], ref: Sequence[int]) -> int:
    """Tokens that agree before the first divergence (after it the continuations are unrelated)."""
    n = 0
    for a, b in zip(ours, ref):
        if a != b:
            break
        n += 1
    return n
