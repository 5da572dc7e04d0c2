"""Reference results computed once and reused: the FP32 reference's and a record's compressed reference's logits
over an evaluation plan, kept on disk (next to the compression records) by a key over everything they depend on.
A build validates several targets of one model on the same plan: the FP32 reference runs once for all of them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def code_digest() -> str:
    """The code that computes reference logits: the canonical model, adapters, compression and the evaluation."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted([*(root / "models").glob("*.py"), *(root / "adapters").glob("*.py"), root / "validation" / "evaluate.py", *(root / "compress").glob("*.py")]):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def plan_digest(plan) -> str:
    return hashlib.sha256(json.dumps({"windows": [[list(w.tokens), w.prefill_tokens] for w in plan.windows], "chunk": plan.chunk,
                                      "prompts": [list(p) for p in plan.prompts], "greedy": plan.greedy_tokens}).encode()).hexdigest()


def key(*parts) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()


def cached(name: str, parts: tuple, compute) -> dict[str, np.ndarray]:
    """`compute()` -> {name: array}, stored as <cache>/references/<name>-<key>.npz and read back next time."""
    from llmship.compress import cache_dir

    path = cache_dir() / "references" / f"{name}-{key(code_digest(), *parts)}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except Exception:  # a damaged entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    result = compute()
    try:
        from llmship.outputs import write_atomically

        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: np.savez(tmp, **result))
    except OSError:
        pass
    return result
