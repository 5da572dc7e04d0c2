"""The `pytorch` format: the canonical model's FP32 weights as safetensors, run by the reference runner.

It is the identity target: validating it measures the validation stage itself (zero error expected),
and planting a fault in its weights file shows the gates catch a drifting artifact.
"""
from __future__ import annotations

from llmship.errors import ConfigError
from llmship.exporters import ExportJob, ExportResult, tensor_spec

MODEL_FILE = "model.safetensors"


def check(target, spec=None) -> None:
    r = target.recipe
    for field, value in (("recipe.weights", r.weights), ("recipe.activations", r.activations), ("recipe.compute", r.compute),
                         ("kv_cache_dtype", target.kv_cache_dtype)):
        if value != "fp32":
            raise ConfigError(f"{target.name}: {field} {value} is not available for pytorch (the FP32 reference): fp32 only")
    if r.embedding not in ("same", "fp32") or r.symmetric is not None or r.group_size is not None:
        raise ConfigError(f"{target.name}: recipe.embedding/symmetric/group_size have no meaning for fp32 pytorch weights")


def weight_plan(target, spec) -> tuple[dict, dict]:
    return {}, {}  # FP32 weights, nothing to quantize


def export(job: ExportJob) -> ExportResult:
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in job.decoder.state_dict().items() if k != "lm_head.weight" or not job.loaded.spec.tie_word_embeddings}
    save_file(weights, str(job.out_dir / MODEL_FILE))
    spec, c = job.loaded.spec, job.target.max_context
    cache = [tensor_spec(f"{kv}_cache_{i}", "float32", [1, spec.num_kv_heads, c, spec.head_dim], "cache")
             for i in range(spec.num_layers) for kv in ("k", "v")]

    def entry(t):
        return {"file": MODEL_FILE, "inputs": [tensor_spec("tokens", "int64", [1, t], "tokens"),
                                                tensor_spec("input_pos", "int64", [1], "positions")],
                "outputs": [tensor_spec("logits", "float32", [1, t, spec.vocab_size], "logits")], "state": cache}

    return ExportResult(entry_points={"prefill": entry("T"), "decode": entry(1)}, kv_cache={"held_as": "state", "dtype": "float32"})
