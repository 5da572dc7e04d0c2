"""Evaluation through a runner's own entry points: teacher-forced logits over windows, and greedy generation.

The evaluation text is cut into windows of up to `max_context` tokens. Each window starts a fresh cache, goes
mostly through the prefill entry point (in chunks of the longest prefill length) and ends with a few decode
steps, so both entry points and the cache are exercised at every range of positions, while most tokens are
scored at prefill's speed. Default text: windows sampled from the FP32 reference (temperature 1, batched),
seeded; or a user's text files (each a domain, reported on its own), read from their start.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from llmship.errors import ConfigError
from llmship.progress import bar

# Fewer scored tokens than this and top-1 / KL are anecdotes, not measurements.
MIN_TEXT_TOKENS = 16
DEFAULT_WINDOW = 256


@dataclass(frozen=True)
class Window:
    tokens: tuple[int, ...]
    prefill_tokens: int  # the first this many go through prefill (in chunks); the rest through decode
    domain: str = "sampled"  # the text it comes from


@dataclass(frozen=True)
class EvalPlan:
    windows: tuple[Window, ...]
    chunk: int  # prefill chunk length
    prompts: tuple[tuple[int, ...], ...]  # greedy-generation prompts (token ids)
    greedy_tokens: int

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(t for w in self.windows for t in w.tokens)

    def targets(self) -> np.ndarray:
        """The next token at every scored position, -1 at a window's last position (nothing follows it)."""
        out = []
        for w in self.windows:
            out += list(w.tokens[1:]) + [-1]
        return np.asarray(out, dtype=np.int64)

    def domains(self) -> np.ndarray:
        return np.asarray([w.domain for w in self.windows for _ in w.tokens])


def single_window_plan(tokens, prefill_tokens: int, chunk: int, prompts, greedy_tokens: int) -> EvalPlan:
    return EvalPlan((Window(tuple(tokens), prefill_tokens),), chunk, tuple(tuple(p) for p in prompts), greedy_tokens)


def teacher_forced(runner, plan: EvalPlan, desc: str = "teacher-forced", whole_windows: bool = False) -> np.ndarray:
    """Logits [N, vocab] at every position of every window: prefill chunks, then one decode step per token (how an
    artifact runs, so both of its entry points and its cache are exercised).

    `whole_windows` is for the PyTorch references, whose logits do not depend on the entry point (one function;
    fp32 summation order aside): each window is one forward pass. A reference's decode step reads every weight for
    one token, so for SmolLM2 a 256-token window costs about what 10 decode steps do instead of 2 chunks + 16 steps."""
    out = []
    for w in bar(plan.windows, desc, len(plan.windows), unit="window"):
        runner.reset()
        toks = w.tokens
        if whole_windows:
            out.append(np.asarray(runner.prefill(toks, 0), dtype=np.float32))
            continue
        for start in range(0, w.prefill_tokens, plan.chunk):
            out.append(np.asarray(runner.prefill(toks[start:min(start + plan.chunk, w.prefill_tokens)], start), dtype=np.float32))
        for pos in range(w.prefill_tokens, len(toks)):
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
    """One sequence of n tokens sampled from a reference runner (temperature 1) with a fixed seed."""
    rng = np.random.default_rng(seed)
    reference.reset()
    tokens = [bos if bos is not None else int(rng.integers(vocab))]
    logits = reference.prefill(tokens, 0)[-1]
    for pos in bar(range(1, n), "sampling eval text", n - 1):
        p = np.exp(logits - logits.max())
        tokens.append(int(rng.choice(len(p), p=p / p.sum())))
        logits = reference.decode(tokens[-1], pos)
    return tokens


def _with_bos(ids: list[int], bos: int | None) -> list[int]:
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def text_files(evaluation, eval_text: str | None) -> list[str]:
    if eval_text:
        return [eval_text]
    text = evaluation.text
    return [] if not text else [text] if isinstance(text, str) else list(text)


def text_windows(tokenizer, bos: int | None, path: str, total: int, window: int, decode: int) -> list[Window]:
    """Windows over a text file from its start: each begins with BOS (when the model has one) and continues the text."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"evaluation text file not found: {path}")
    ids = tokenizer.encode(p.read_text(errors="replace")).ids
    needed = min(total, MIN_TEXT_TOKENS)
    if len(ids) + (bos is not None) < needed:
        raise ConfigError(f"evaluation text {path} gives {len(ids)} tokens; at least {needed} are needed for the "
                          "metrics to mean anything")
    lead = [] if bos is None else [bos]
    windows, pos, left = [], 0, total
    while left > len(lead) and pos < len(ids):
        take = min(window, left) - len(lead)
        toks = tuple(lead + ids[pos:pos + take])
        windows.append(Window(toks, max(1, len(toks) - min(decode, len(toks) // 4)), p.name))
        pos, left = pos + take, left - len(toks)
    return windows


def sampled_windows(make_reference, bos: int | None, total: int, window: int, decode: int, seed: int,
                    weights_digest: str | None = None) -> list[Window]:
    """Windows sampled from the reference model (`make_reference()` builds its decoder, only when they are not on
    disk), all in one batch. With the digest of the decoder's weights they are kept on disk like the reference's logits: sampling
    decodes every token, and the other targets of a build (and a re-validation) evaluate the same windows."""
    from llmship.compress.calibration import sample_sequences
    from llmship.validation import cache

    count = max(1, -(-total // window))
    length = min(window, total) if count == 1 else window

    def sample() -> dict:
        return {"tokens": np.asarray(sample_sequences(make_reference(), bos, count, length, seed), dtype=np.int64)}

    found = cache.cached("sampled", (weights_digest, bos, count, length, seed), sample) if weights_digest else sample()
    sequences = found["tokens"].tolist()
    return [Window(tuple(s), max(1, len(s) - min(decode, len(s) // 4))) for s in sequences]


def make_plan(make_reference, tokenizer, spec, target, evaluation, eval_text: str | None,
              weights_digest: str | None = None) -> EvalPlan:
    """The evaluation plan for one target: windows of at most max_context, prompts for greedy generation.
    `make_reference`: builds the FP32 reference's decoder, called only when windows must be sampled."""
    window = min(evaluation.window or DEFAULT_WINDOW, target.max_context)
    decode = evaluation.decode_tokens
    bos = spec.bos_token_id
    files = text_files(evaluation, eval_text)
    if files:
        windows = [w for f in files for w in text_windows(tokenizer, bos, f, evaluation.tokens, window, decode)]
    else:
        windows = sampled_windows(make_reference, bos, evaluation.tokens, window, decode, evaluation.seed, weights_digest)
    longest = max(target.prefill_lengths)
    prompts = tuple(tuple(_with_bos(tokenizer.encode(p).ids, bos)[:longest]) for p in evaluation.prompts)
    greedy_tokens = min(evaluation.greedy_tokens, target.max_context - max(map(len, prompts)))
    return EvalPlan(tuple(windows), longest, prompts, greedy_tokens)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64 (fp32 artifacts differ from the reference by KL ~1e-12)."""
    y = x.astype(np.float64)
    y -= y.max(axis=-1, keepdims=True)
    y -= np.log(np.exp(y).sum(axis=-1, keepdims=True))
    return y


ROWS = 16  # positions per block of per_token: a block's float64 work stays in cache (6x faster than whole arrays)


def per_token(logits: np.ndarray, ref: np.ndarray, targets: np.ndarray, tie_margin: float = 0.0) -> dict[str, np.ndarray]:
    """Per-position values every metric is a statistic of."""
    if logits.shape != ref.shape:
        raise ConfigError(f"artifact logits have shape {logits.shape}, reference {ref.shape}")
    parts = [_per_token(logits[a:a + ROWS], ref[a:a + ROWS], targets[a:a + ROWS], tie_margin)
             for a in range(0, max(len(ref), 1), ROWS)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _per_token(logits, ref, targets, tie_margin) -> dict[str, np.ndarray]:
    lp, lq = log_softmax(ref), log_softmax(logits)
    kl = np.maximum(np.einsum("ij,ij->i", np.exp(lp), lp - lq), 0.0)
    top2 = np.partition(ref, -2, axis=-1)[:, -2:]  # [second best, best]
    idx = np.nonzero(targets >= 0)[0]
    err = np.abs(logits.astype(np.float64) - ref)
    return {
        "kl": kl,
        "top1": (logits.argmax(-1) == ref.argmax(-1)).astype(np.float64),
        "clear": (top2[:, 1] - top2[:, 0]) > tie_margin,  # the reference's best token stands out of rounding's reach
        "abs_err": err.max(-1), "abs_err_mean": err.mean(-1),
        "cosine": (logits * ref).sum(-1) / (np.linalg.norm(logits, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-30),
        "nll": -lq[idx, targets[idx]], "nll_reference": -lp[idx, targets[idx]],
        "delta_p": np.exp(lq[idx, targets[idx]]) - np.exp(lp[idx, targets[idx]]),
    }


def next_tokens(tokens: Sequence[int]) -> np.ndarray:
    """The targets of one plain sequence: each position predicts the next token; the last predicts nothing."""
    return np.append(np.asarray(tokens[1:], dtype=np.int64), -1)


def parity_metrics(logits: np.ndarray, ref: np.ndarray, targets: np.ndarray, tie_margin: float = 0.0,
                   seed: int = 0) -> tuple[dict, dict]:
    """Numbers for report.json's `parity` (each statistic with its 95% interval under `intervals`), and
    per-position series for the report's plots and for paired regression tests. `targets`: the next token at
    each position, -1 where none follows (EvalPlan.targets, or next_tokens of a plain sequence)."""
    from llmship.validation.statistics import interval, mean_interval

    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) != len(logits):
        raise ConfigError(f"{len(targets)} targets for {len(logits)} positions")
    if not bool(np.isfinite(logits).all()):
        # NaN/Inf logits: no metric measures anything, and each must fail its gate. Errors are null (a gate on a
        # value not measured fails); agreement and cosine take their worst values.
        metrics = {"max_abs_err": None, "mean_abs_err": None, "cosine_min": -1.0, "top1_agreement": 0.0, "top1_clear": 0.0,
                   "kl_mean": None, "kl_median": None, "kl_p99": None, "kl_p999": None, "kl_max": None, "delta_p_mean": None,
                   "ppl_reference": float(np.exp(reference_nll(ref, targets).mean())), "ppl": None, "eval_tokens": int(len(logits)),
                   "ties_excluded": 0, "finite": False, "intervals": {}}
        return metrics, {"kl": [], "max_abs_err": []}
    v = per_token(logits, ref, targets, tie_margin)
    clear = v["clear"]
    ratio = v["nll"] - v["nll_reference"]
    metrics = {
        "max_abs_err": float(v["abs_err"].max()),
        "mean_abs_err": float(v["abs_err_mean"].mean()),
        "cosine_min": float(np.nan_to_num(v["cosine"], nan=-1.0).min()),
        "top1_agreement": float(v["top1"].mean()),
        # top-1 where the reference's top two logits are further apart than `tie_margin`: a flip inside a near-tie
        # is rounding, not disagreement
        "top1_clear": float(v["top1"][clear].mean()) if clear.any() else 1.0,
        "ties_excluded": int((~clear).sum()),
        "kl_mean": float(v["kl"].mean()),
        "kl_median": float(np.median(v["kl"])),
        "kl_p99": float(np.percentile(v["kl"], 99)),
        "kl_p999": float(np.percentile(v["kl"], 99.9)),
        "kl_max": float(v["kl"].max()),
        "delta_p_mean": float(v["delta_p"].mean()) if len(v["delta_p"]) else 0.0,
        "ppl_reference": float(np.exp(v["nll_reference"].mean())),
        "ppl": float(np.exp(v["nll"].mean())),
        "eval_tokens": int(len(logits)),
        "finite": True,
    }
    lo, hi = mean_interval(ratio, seed)
    metrics["intervals"] = {
        "kl_mean": list(mean_interval(v["kl"], seed)),
        "kl_p99": list(interval(v["kl"], lambda x: np.percentile(x, 99), seed)),
        "top1_agreement": list(mean_interval(v["top1"], seed)),
        "top1_clear": list(mean_interval(v["top1"][clear], seed)) if clear.sum() > 1 else [metrics["top1_clear"]] * 2,
        "delta_p_mean": list(mean_interval(v["delta_p"], seed)) if len(v["delta_p"]) > 1 else [0.0, 0.0],
        "ppl_ratio": [float(np.exp(lo)), float(np.exp(hi))],
    }
    series = {"kl": downsample(v["kl"]), "max_abs_err": downsample(v["abs_err"]),
              "kl_per_token": [float(f"{x:.6g}") for x in v["kl"]]}
    return metrics, series


def reference_nll(ref: np.ndarray, targets: np.ndarray) -> np.ndarray:
    scored = targets >= 0
    return -log_softmax(ref[scored])[np.arange(int(scored.sum())), targets[scored]]


PLOT_POINTS = 512


def downsample(values: np.ndarray, points: int = PLOT_POINTS) -> list[float]:
    """At most `points` values for a plot: each bucket's largest (a long evaluation's spikes stay visible)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) > points:
        edges = np.linspace(0, len(values), points + 1).astype(int)
        values = np.array([values[a:b].max() for a, b in zip(edges[:-1], edges[1:])])
    return [round(float(x), 8) for x in values]


def greedy_match(ours: Sequence[int], ref: Sequence[int]) -> int:
    """Tokens that agree before the first divergence (after it the continuations are unrelated)."""
    n = 0
    for a, b in zip(ours, ref):
        if a != b:
            break
        n += 1
    return n
