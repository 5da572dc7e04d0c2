"""Anchor: litert-torch's generative SmolLM2 example — `examples/smollm` (its `SmolLM2` model class and
`get_model_config_v2`, built by `utilities/model_builder` from the HF checkpoint) converted by
`utilities/converter.convert_to_tflite` with its `none` (fp32) and `dynamic_int8` recipes, run on
ai-edge-litert's Interpreter through the `prefill_<T>` / `decode` signatures, as the example's C++
text generator does.

The example's config is for SmolLM2-135M; its dimensions are overwritten from the checkpoint's config.json
(a no-op on SmolLM2) so stories260K (quick mode) goes through the same builder. The converter's default
export emits no logits from prefill, so the first token comes, as in the example's runner, from a prefill of
all prompt tokens but the last followed by one decode step of the last; teacher-forced logits come from
decode steps.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

TOOL, RUNTIME = "litert-torch-generative", "litert"
RECIPES = {"fp32": "none", "dynamic-int8": "dynamic_int8"}  # our recipe name → the converter's --quantize value
PREFILL_LENGTHS = (32, 128)  # as llmship's litert targets
KV_CACHE_MAX_LEN = 512
WARMUP_STEPS = 3


def run(ctx) -> list[dict]:
    from llmship.bench import row
    from llmship.bench.measure import measure_payload, measured_row, run_measured

    rows = []
    for recipe, quantize in RECIPES.items():
        out = ctx.workdir / "litert-torch-generative" / recipe
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.tflite"):
            old.unlink()
        base = row(runtime=RUNTIME, tool=TOOL, recipe=recipe, model=ctx.model)
        print(f"bench: {TOOL} {recipe}: export", flush=True)
        exp = run_measured([sys.executable, "-m", __name__, "export", json.dumps({"hf_dir": str(ctx.hf_dir), "out": str(out),
                                                                                  "quantize": quantize})])
        files = sorted(out.glob("*.tflite"))
        base.update(export_s=exp.wall_s, export_peak_rss_mb=exp.peak_rss_mb)
        if exp.returncode != 0 or len(files) != 1:
            rows.append({**base, "error": f"export: {exp.error_line()}"})
            continue
        size = files[0].stat().st_size
        base.update(bytes=size, bytes_per_param=size / ctx.params)
        print(f"bench: {TOOL} {recipe}: measure", flush=True)
        rows.append(measured_row(__name__, base, measure_payload(ctx, model=str(files[0]))))
    return rows


def _import_generative():
    """litert_torch.generative's layers import its LoRA module, which takes the TFLite flatbuffer schema from
    tensorflow — not installed, and not used without LoRA. ai-edge-litert ships the same generated schema: it
    stands in under tensorflow's name for these imports, and the names are withdrawn again afterwards so
    nothing else mistakes them for tensorflow."""
    import types

    import ai_edge_litert.schema_py_generated as schema
    import litert_torch  # noqa: F401  (torch and litert_torch's own imports look for tensorflow: done before the shim)

    names = ("tensorflow", "tensorflow.lite", "tensorflow.lite.python")
    shimmed = "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None
    if shimmed:
        for name in names:
            sys.modules[name] = types.ModuleType(name)
        sys.modules["tensorflow.lite.python"].schema_py_generated = schema
        sys.modules["tensorflow.lite.python.schema_py_generated"] = schema
    try:
        from litert_torch.generative.examples.smollm import smollm
        from litert_torch.generative.utilities import converter, export_config, model_builder
    finally:
        if shimmed:
            for name in (*names, "tensorflow.lite.python.schema_py_generated"):
                sys.modules.pop(name, None)
    return smollm, converter, export_config, model_builder


def export(hf_dir: Path, out: Path, quantize: str) -> None:
    smollm, converter, export_config, model_builder = _import_generative()

    hf = json.loads((hf_dir / "config.json").read_text())
    rope = hf.get("rope_parameters") or {}
    if (rope.get("rope_type") or "default") != "default" or not hf.get("tie_word_embeddings", False):
        raise ValueError("the SmolLM example builds a plain-RoPE Llama with a tied head; this checkpoint is not one")
    config = smollm.get_model_config_v2()
    heads = hf["num_attention_heads"]
    config.vocab_size, config.num_layers, config.embedding_dim = hf["vocab_size"], hf["num_hidden_layers"], hf["hidden_size"]
    block = config.block_config(0)
    attn = block.attn_config
    attn.num_heads, attn.num_query_groups = heads, hf["num_key_value_heads"]
    attn.head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta = hf.get("rope_theta") or rope.get("rope_theta", 10000.0)
    attn.rotary_base = int(theta) if float(theta).is_integer() else theta
    block.ff_config.intermediate_size = hf["intermediate_size"]
    for norm in (block.pre_attention_norm_config, block.post_attention_norm_config, config.final_norm_config):
        norm.epsilon = hf["rms_norm_eps"]
    # build_model_v2 with this config instead of the example's fixed one: same class, tensor names and loader.
    model = model_builder.build_decoder_only_model(str(hf_dir), config=config, tensor_names=smollm.TENSOR_NAMES,
                                                   model_class=smollm.SmolLM2, mask_cache_size=KV_CACHE_MAX_LEN)
    converter.convert_to_tflite(model, output_path=str(out), output_name_prefix="smollm2", prefill_seq_len=list(PREFILL_LENGTHS),
                                kv_cache_max_len=KV_CACHE_MAX_LEN, quantize=quantize, config=config,
                                export_config=export_config.ExportConfig())


def _measure(args: dict) -> dict:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from llmship.bench.measure import timing_and_parity

    t0 = time.perf_counter()
    interpreter = Interpreter(model_path=args["model"], num_threads=args["threads"])
    interpreter.allocate_tensors()  # applies the default XNNPACK delegate, before any signature runner exists
    prefill_len = max(PREFILL_LENGTHS)
    prefill, decode = interpreter.get_signature_runner(f"prefill_{prefill_len}"), interpreter.get_signature_runner("decode")
    load_s = time.perf_counter() - t0
    specs = {n: d for n, d in decode.get_input_details().items() if n.startswith("kv_cache")}
    state = {}

    def reset() -> None:
        state.update({n: np.zeros(d["shape"], dtype=d["dtype"]) for n, d in specs.items()})

    def step(token: int, pos: int) -> np.ndarray:
        out = decode(tokens=np.array([[token]], dtype=np.int32), input_pos=np.array([pos], dtype=np.int32), **state)
        logits = out.pop("logits")
        state.update(out)
        return logits.reshape(-1)

    def first_token(prompt: list[int]) -> int:
        head = np.zeros((1, prefill_len), dtype=np.int32)  # the padded tail is rewritten before it is attended
        head[0, :len(prompt) - 1] = prompt[:-1]
        state.update(prefill(tokens=head, input_pos=np.arange(prefill_len, dtype=np.int32), **state))
        return int(np.argmax(step(prompt[-1], len(prompt) - 1)))

    prompt = args["prompt"][:prefill_len + 1]
    times = []
    for _ in range(3):
        reset()
        t0 = time.perf_counter()
        token = first_token(prompt)
        times.append(time.perf_counter() - t0)
    ttft = float(np.median(times))
    pos, step_s = len(prompt), []
    for i in range(WARMUP_STEPS + args["steps"]):
        t0 = time.perf_counter()
        token = int(np.argmax(step(token, pos)))
        if i >= WARMUP_STEPS:
            step_s.append(time.perf_counter() - t0)
        pos += 1
    reset()
    logits = np.stack([step(t, i) for i, t in enumerate(args["eval"])])
    return timing_and_parity({**args, "prompt": prompt}, load_s, ttft, sum(step_s), len(step_s), logits)


def _export(args: dict) -> None:
    export(Path(args["hf_dir"]), Path(args["out"]), args["quantize"])


if __name__ == "__main__":
    from llmship.bench.measure import child_main

    child_main(globals())
