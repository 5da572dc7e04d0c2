"""First-party baselines ("anchors") measured beside llmship's artifacts in the same run.

Each module defines `run(ctx: BenchContext) -> list[dict]` returning rows of the results table
(see llmship.bench.ROW_FIELDS); an anchor that cannot run here returns its row with `error` set.
"""
from __future__ import annotations

ANCHORS = {
    "transformers-eager": "llmship.bench.anchors.transformers_eager",
    "executorch-llm-export": "llmship.bench.anchors.executorch_llm",
    "litert-torch-generative": "llmship.bench.anchors.litert_generative",
    "onnxruntime-genai-builder": "llmship.bench.anchors.ortgenai_builder",
}
