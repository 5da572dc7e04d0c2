"""The `pytorch` format: the canonical model's FP32 weights as safetensors, run by the reference runner.

It is the identity target: validating it measures the validation stage itself (zero error expected),
and planting a fault in its weights file shows the gates catch a drifting artifact.
"""
from __future__ import annotations

from llmship.exporters import ExportJob, ExportResult, tensor_spec


def export(job: ExportJob) -> ExportResult:
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in job.loaded.weights.items()}
    save_file(weights, str(job.out_dir / "model.safetensors"))
    spec, c = job.loaded.spec, job.target.max_context
    cache = [tensor_spec(f"{kv}_cache_{i}", "float32", [1, spec.num_kv_heads, c, spec.head_dim])
             for i in range(spec.num_layers) for kv in ("k", "v")]
    entry = {"file": "model.safetensors", "inputs": [tensor_spec("tokens", "int64", [1, "T"]), tensor_spec("input_pos", "int64", [1])],
             "outputs": [tensor_spec("logits", "float32", [1, "T", spec.vocab_size])], "state": cache}
    return ExportResult(
        entry_points={"prefill": entry, "decode": dict(entry, inputs=[tensor_spec("tokens", "int64", [1, 1]), tensor_spec("input_pos", "int64", [1])])},
        kv_cache={"held_as": "state", "dtype": "float32"},
        toolchain=("safetensors",),
    )
