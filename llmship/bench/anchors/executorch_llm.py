"""Anchor: ExecuTorch's own LLM export — `executorch.extension.llm.export.export_llm` (export_llama with
model class `smollm2`, i.e. the example Llama2Model on a Meta-format checkpoint), XNNPACK, run with
ExecuTorch's runtime through its Python bindings.

The example's own `smollm2/convert_weights.py` goes through torchtune, which this environment does not
have, so the HF → Meta conversion (key renames and the q/k row permutation HF applies for its rotate-half
RoPE) is done here, as the same mapping; params.json mirrors the example's 135M_config.json fields, read
from the checkpoint's config.json so stories260K (quick mode) converts the same way. The conversion runs
once and its wall time is added to each recipe's export time.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

TOOL, RUNTIME = "executorch-llm-export", "executorch"
WARMUP_STEPS = 3
# The flags of ExecuTorch's shipped examples/models/llama/config/llama_xnnpack.yaml, at group size 32 (llmship's
# executorch-8da4w group) with its 4-bit/32 embedding quantization; fp32 is the same export without quantization.
COMMON = ["base.model_class=smollm2", "model.use_kv_cache=True", "model.use_sdpa_with_kv_cache=True",
          "model.dtype_override=fp32", "backend.xnnpack.enabled=True", "backend.xnnpack.extended_ops=True"]
RECIPES = {"8da4w": ["quantization.qmode=8da4w", "quantization.group_size=32", "quantization.embedding_quantize='4,32'"],
           "fp32": []}
MAX_CONTEXT = 512  # KV cache positions, as llmship's targets


def run(ctx) -> list[dict]:
    from llmship.bench import row
    from llmship.bench.measure import measure_payload, measured_row, run_measured

    work = ctx.workdir / "executorch-llm-export"
    work.mkdir(parents=True, exist_ok=True)
    bases = {r: row(runtime=RUNTIME, tool=TOOL, recipe=r, model=ctx.model) for r in RECIPES}
    ckpt, params = work / "meta" / "consolidated.pth", work / "meta" / "params.json"
    if "8da4w" in str(ckpt) or "int8" in str(ckpt):  # Llama2Model would take the checkpoint for a pre-quantized one
        return [{**b, "error": f"the work directory's path {work} contains '8da4w' or 'int8'"} for b in bases.values()]
    conv = run_measured([sys.executable, "-m", __name__, "convert", json.dumps({"hf_dir": str(ctx.hf_dir), "checkpoint": str(ckpt),
                                                                                "params": str(params)})])
    if conv.returncode != 0:
        return [{**b, "error": f"convert: {conv.error_line()}"} for b in bases.values()]
    gen = json.loads((ctx.hf_dir / "generation_config.json").read_text())
    eos = gen.get("eos_token_id") or []
    metadata = json.dumps({"get_bos_id": gen.get("bos_token_id"), "get_eos_ids": eos if isinstance(eos, list) else [eos]})
    rows = []
    for recipe, overrides in RECIPES.items():
        out = work / recipe
        out.mkdir(exist_ok=True)
        pte = out / "model.pte"  # output_name without ".pte" is placed in output_dir; with it, in hydra's cwd
        pte.unlink(missing_ok=True)
        print(f"bench: {TOOL} {recipe}: export", flush=True)
        exp = run_measured([sys.executable, "-m", "executorch.extension.llm.export.export_llm", *COMMON, *overrides,
                            f"base.checkpoint={ckpt}", f"base.params={params}", f"base.metadata='{metadata}'",
                            # the export takes chunks of up to max_seq_length - 1 tokens: room for the whole prompt
                            f"export.max_seq_length={len(ctx.prompt_tokens) + 1}", f"export.max_context_length={MAX_CONTEXT}",
                            f"export.output_dir={out}", "export.output_name=model",
                            # hydra's run directory (its log, and the cwd during the export) is the recipe's own
                            f"hydra.run.dir={out}", "hydra.output_subdir=null"],
                           cwd=out, env={**os.environ, "HYDRA_FULL_ERROR": "1"})  # else its last line is a hint, not the error
        base = {**bases[recipe], "export_s": conv.wall_s + exp.wall_s, "export_peak_rss_mb": max(conv.peak_rss_mb, exp.peak_rss_mb)}
        if exp.returncode != 0 or not pte.is_file():
            rows.append({**base, "error": f"export: {exp.error_line()}"})
            continue
        size = pte.stat().st_size
        base.update(bytes=size, bytes_per_param=size / ctx.params)
        print(f"bench: {TOOL} {recipe}: measure", flush=True)
        rows.append(measured_row(__name__, base, measure_payload(ctx, pte=str(pte))))
    return rows


def convert(hf_dir: Path, checkpoint: Path, params: Path) -> None:
    """HF Llama checkpoint → Meta layout (what examples/models/smollm2/convert_weights.py produces) + params.json."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or dim // heads
    rope = config.get("rope_parameters") or {}
    theta = config.get("rope_theta") or rope.get("rope_theta", 10000.0)
    if (rope.get("rope_type") or "default") != "default" or config.get("attention_bias"):
        raise ValueError(f"this conversion covers plain Llama (default RoPE, no attention bias), not {rope} / bias")

    def unpermute(w: torch.Tensor, n: int) -> torch.Tensor:
        # HF stores q/k rows as [first halves | second halves] per head (rotate-half RoPE); Meta interleaves pairs.
        return w.view(n, 2, head_dim // 2, -1).transpose(1, 2).reshape(n * head_dim, -1)

    hf = load_file(str(hf_dir / "model.safetensors"))
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    meta = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
            "output.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
    for i in range(config["num_hidden_layers"]):
        for hf_name, meta_name in names.items():
            w = hf[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name in ("self_attn.q_proj", "self_attn.k_proj"):
                w = unpermute(w, heads if hf_name == "self_attn.q_proj" else kv_heads)
            meta[f"layers.{i}.{meta_name}.weight"] = w.contiguous()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(meta, checkpoint)
    params.write_text(json.dumps({
        "dim": dim, "ffn_dim_multiplier": 1, "hidden_dim": config["intermediate_size"], "n_heads": heads, "n_kv_heads": kv_heads,
        "n_layers": config["num_hidden_layers"], "norm_eps": config["rms_norm_eps"], "rope_theta": float(theta),
        "use_scaled_rope": False, "vocab_size": config["vocab_size"], "use_hf_rope": False, "attention_qkv_bias": False,
        "head_dim": head_dim}, indent=2))


def _measure(args: dict) -> dict:
    import numpy as np
    import torch

    # Importing these registers the kernels the exported program calls (llama::sdpa_with_kv_cache,
    # llama::update_cache, quantized_decomposed::embedding_4bit) with the runtime.
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    from llmship.bench.measure import timing_and_parity

    # XNNPACK runs on the runtime's one process-wide threadpool; this sets its size.
    portable_lib._unsafe_reset_threadpool(args["threads"])
    t0 = time.perf_counter()
    method = Runtime.get().load_program(Path(args["pte"])).load_method("forward")
    load_s = time.perf_counter() - t0

    def forward(tokens: list[int], pos: int) -> np.ndarray:
        (logits,) = method.execute([torch.tensor([tokens], dtype=torch.long), torch.tensor([pos], dtype=torch.long)])
        return logits.reshape(-1, logits.shape[-1])[-1].numpy()  # the last position's logits, as the export outputs

    prompt = args["prompt"]
    times = []
    for _ in range(3):  # each prefill starts at position 0, so it overwrites the previous one's cache entries
        t0 = time.perf_counter()
        token = int(np.argmax(forward(prompt, 0)))
        times.append(time.perf_counter() - t0)
    ttft = float(np.median(times))
    pos, step_s = len(prompt), []
    for i in range(WARMUP_STEPS + args["steps"]):
        t0 = time.perf_counter()
        token = int(np.argmax(forward([token], pos)))
        if i >= WARMUP_STEPS:
            step_s.append(time.perf_counter() - t0)
        pos += 1
    # Teacher-forced: one token per call from position 0, so every position's logits come out of the cache path.
    logits = np.stack([forward([t], i) for i, t in enumerate(args["eval"])])
    return timing_and_parity(args, load_s, ttft, sum(step_s), len(step_s), logits)


def _convert(args: dict) -> None:
    convert(Path(args["hf_dir"]), Path(args["checkpoint"]), Path(args["params"]))


if __name__ == "__main__":
    from llmship.bench.measure import child_main

    child_main(globals())
