"""The compression stage: between the canonical model and the exporters.

Input: the loaded FP32 model, the grid every quantized matrix must land on (the target's runtime says which
grids it can hold: its exporter's `weight_plan`), the runtime's activation scheme, the algorithm, and
calibration settings. Output: a WeightRecord (llmship/compress/record.py) that every exporter ships exactly,
and from which the compressed reference (llmship/compress/reference.py) is built for the conversion check.

Records are cached on disk by a key over everything they depend on (the weights being quantized, the grids,
the algorithm, the calibration settings and this package's code), so validation rebuilds the same record
without recomputing GPTQ, and a rebuild of an unchanged target reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from llmship.compress.grids import Grid
from llmship.compress.record import QuantizedTensor, WeightRecord
from llmship.progress import say


def cache_dir() -> Path:
    return Path(os.environ.get("LLMSHIP_CACHE") or Path.home() / ".cache" / "llmship")


def code_digest() -> str:
    """The compression stage's own source: a changed algorithm must not reuse an old record."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def record_key(loaded, grids: dict[str, Grid], activations: dict, algorithm: str, calibration: dict) -> str:
    from llmship.compress.algorithms import NEEDS_CALIBRATION

    h = hashlib.sha256(json.dumps({"grids": {n: asdict(g) for n, g in sorted(grids.items())}, "activations": activations,
                                   "algorithm": algorithm, "code": code_digest(),
                                   "calibration": calibration if algorithm in NEEDS_CALIBRATION else None},
                                  sort_keys=True).encode())
    for name in sorted(grids):  # the weights themselves: a test's planted fault must not reuse a clean record
        h.update(loaded.weights[f"{name}.weight"].float().contiguous().numpy().tobytes())
    if algorithm == "source":
        for name in sorted(grids):
            b = loaded.source_blocks.get(name)
            h.update(b"-" if b is None else (b.kind.encode() + b.codes.numpy().tobytes() + b.d.numpy().tobytes()))
    return h.hexdigest()


def build_record(loaded, grids: dict[str, Grid], activations: dict, algorithm: str, calibration, evaluation,
                 eval_text: str | None = None) -> WeightRecord:
    """The record for these grids (from the cache when an identical one was built before)."""
    from llmship.compress.algorithms import ALGORITHMS, NEEDS_CALIBRATION
    from llmship.compress.calibration import calibration_sequences

    settings = calibration.model_dump(mode="json")
    key = record_key(loaded, grids, activations, algorithm, settings)
    path = cache_dir() / "records" / f"{key}.safetensors"
    if path.is_file():
        try:
            return WeightRecord.load(path)
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    sequences = None
    if algorithm in NEEDS_CALIBRATION:
        say(f"calibration: {calibration.tokens} tokens ({'text ' + calibration.text if calibration.text else 'sampled from the reference'})")
        sequences = calibration_sequences(loaded, calibration, evaluation, eval_text)
    notes: dict = {}
    quantized = ALGORITHMS[algorithm](loaded, grids, sequences, notes)
    tensors = {name: QuantizedTensor(name, grids[name], *quantized[name]) for name in grids}
    record = WeightRecord(tensors, activations, algorithm, notes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        record.save(path)
    except OSError:
        pass  # no cache: the next build recomputes
    return record


def grids_from_manifest(compression: dict) -> dict[str, Grid]:
    return {name: Grid(**g) for name, g in compression["grids"].items()}


def rebuild_record(loaded, compression: dict, calibration, evaluation, eval_text: str | None = None) -> WeightRecord:
    """The record an artifact was built from, rebuilt (or read from the cache) from its manifest's `compression`;
    ManifestError when it is not the same record (a different source, or a changed compression stage)."""
    from llmship.config import Calibration, Evaluation
    from llmship.errors import ManifestError

    settings = Calibration(**compression["calibration"]) if compression.get("calibration") else calibration
    seed = compression.get("evaluation_seed", evaluation.seed)
    record = build_record(loaded, grids_from_manifest(compression), compression["activations"], compression["algorithm"],
                          settings, Evaluation(seed=seed, text=evaluation.text), eval_text)
    if record.digest() != compression["digest"]:
        raise ManifestError(f"the compressed weights rebuilt from {loaded.source} (digest {record.digest()[:12]}) are not the ones "
                            f"the artifact was built with ({compression['digest'][:12]}): a different source, or another "
                            "llmship version; rebuild the artifact")
    return record
