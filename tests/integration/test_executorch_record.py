"""ExecuTorch ships the compression record exactly: the codes and scales in model.pte are the record's, and the
artifact computes what the compressed reference computes (kernel rounding apart), so a converter fault shows."""
from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path

import pytest
import torch

from llmship.compress.plan import EMBEDDING, HEAD

pytestmark = pytest.mark.executorch

CONTEXT, PREFILL = 96, (8, 24)
TINY_UNTIED = "builtin:tiny@untied"


def profile(name: str, **recipe):
    from llmship.targets import check_target, get_profile

    base = get_profile(name)
    target = base.model_copy(update={"max_context": CONTEXT, "prefill_lengths": PREFILL,
                                     "recipe": base.recipe.model_copy(update=recipe)})
    return check_target(target)


# ---------------------------------------------------------------- reading a .pte back

def _xnnpack_graph(blob: bytes) -> dict:
    """An XNNPACK delegate payload (XNNHeader + flatbuffer + inline constants) as a dict, decoded by the flatc
    ExecuTorch bundles against the XNNPACK schema it ships."""
    import importlib.resources

    import executorch.backends.xnnpack.serialization as schema_package
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    header = XNNHeader.from_bytes(blob[:XNNHeader.EXPECTED_LENGTH])
    flatbuffer = blob[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "schema.fbs").write_bytes(importlib.resources.files(schema_package).joinpath("schema.fbs").read_bytes())
        (Path(d) / "graph.bin").write_bytes(flatbuffer)
        _flatc_decompile(d, str(Path(d) / "schema.fbs"), str(Path(d) / "graph.bin"), ["--raw-binary"])
        text = (Path(d) / "graph.json").read_text()
    # flatc writes non-finite floats (output clamps) bare; quote them so the text is JSON
    graph = json.loads(re.sub(r'(?<=[:\s\[,])(-?)(inf|nan)\b', r'"\1\2"', text))
    graph["inline_data"] = blob[header.constant_data_offset:header.constant_data_offset + header.constant_data_size]
    return graph


def _program(pte: bytes):
    """(program, named data {key: bytes}, [XNNPACK graphs]) of a serialized .pte."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    parsed = deserialize_pte_binary(pte)
    program, nd = parsed.program, parsed.named_data
    named = {k: bytes(nd.buffers[e.buffer_index]) for k, e in nd.pte_data.items()} if nd is not None else {}
    graphs = [_xnnpack_graph(bytes(program.backend_delegate_data[d.processed.index].data))
              for plan in program.execution_plan for d in plan.delegates]
    return program, named, graphs


def _unpack_int4(raw: bytes, n: int, k: int, even_high: bool) -> torch.Tensor:
    """Codes of an int4 matrix stored two per byte as code + 8; XNNPACK puts element 2j in the low nibble,
    ExecuTorch's embedding_4bit in the high one."""
    b = torch.frombuffer(bytearray(raw), dtype=torch.uint8)[:n * ((k + 1) // 2)].view(n, (k + 1) // 2)
    lo, hi = (b & 0x0F).to(torch.int16) - 8, (b >> 4).to(torch.int16) - 8
    pairs = (hi, lo) if even_high else (lo, hi)
    return torch.stack(pairs, -1).view(n, -1)[:, :k]


def _floats(raw: bytes, dtype, shape) -> torch.Tensor:
    count = int(torch.tensor(shape).prod())
    return torch.frombuffer(bytearray(raw), dtype=dtype)[:count].float().view(*shape)


def _fully_connected_filters(graph: dict, named: dict):
    """(storage key, datatype, [N, K], weight bytes, scale bytes, quant params) of every fully-connected filter of
    one XNNPACK graph; weights live in the named data (content-addressed, shared by methods) or inline."""
    values = {}
    for xv in graph["xvalues"]:
        u = xv["xvalue_union"]
        values[u.get("tensor_value", u)["id_out"]] = u
    entries = graph["constant_data"]

    def data(i):
        e = entries[i]
        return named[e["named_key"]] if e.get("named_key") else graph["inline_data"][e["offset"]:e["offset"] + e["size"]]

    for node in graph["xnodes"]:
        if node["xnode_union_type"] != "XNNFullyConnected":
            continue
        u = values[node["xnode_union"]["filter_id"]]
        tv, qp = u.get("tensor_value", u), u.get("quant_params", {})
        i = tv["constant_buffer_idx"]
        scale = data(qp["scale_buffer_idx"]) if qp.get("scale_buffer_idx") else None
        yield entries[i].get("named_key") or (id(graph), i), tv["datatype"], tv["dims"], data(i), scale, qp


def pte_linears(pte: bytes) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[list[int]]]:
    """Every distinct quantized fully-connected filter XNNPACK holds, as (codes int16 [N, K], scales fp32 [N, G]),
    and the dims of the fp32 ones."""
    _, named, graphs = _program(pte)
    quantized, fp32, seen = [], [], set()
    for graph in graphs:
        for key, kind, (n, k), raw, scale, qp in _fully_connected_filters(graph, named):
            if key in seen:  # the same weight, read by the other method
                continue
            seen.add(key)
            if kind == "xnn_datatype_fp32":
                fp32.append([n, k])
            elif kind == "xnn_datatype_qbint4":  # group-wise int4, bf16 scales
                codes = _unpack_int4(raw, n, k, even_high=False)
                quantized.append((codes, _floats(scale, torch.bfloat16, (n, k // qp["group_size"]))))
            elif kind == "xnn_datatype_qcint8":  # per-channel int8, fp32 scales
                codes = torch.frombuffer(bytearray(raw), dtype=torch.int8).view(n, k).to(torch.int16)
                quantized.append((codes, _floats(scale, torch.float32, (n, 1))))
            else:
                raise AssertionError(f"unexpected XNNPACK weight type {kind}")
    return quantized, fp32


def pte_embedding(pte: bytes) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(operator, codes int16 [V, D], scales fp32 [V, G]) of the quantized embedding lookup the program runs."""
    program, _, _ = _program(pte)
    plan = program.execution_plan[0]
    for chain in plan.chains:
        for instruction in chain.instructions:
            args = instruction.instr_args
            op = plan.operators[args.op_index].name if hasattr(args, "op_index") else ""
            if "embedding_4bit" not in op and "embedding_byte" not in op:
                continue
            weight, scales = (plan.values[j].val for j in args.args[:2])
            buffer = [bytes(program.constant_buffer[t.data_buffer_idx].storage) for t in (weight, scales)]
            v, d = weight.sizes[0], weight.sizes[1] * (2 if "4bit" in op else 1)
            codes = (_unpack_int4(buffer[0], v, d, even_high=True) if "4bit" in op
                     else torch.frombuffer(bytearray(buffer[0]), dtype=torch.int8)[:v * d].view(v, d).to(torch.int16))
            return op, codes, _floats(buffer[1], torch.float32, tuple(scales.sizes))
    raise AssertionError("the program runs no quantized embedding")


# ---------------------------------------------------------------- the .pte holds the record

def untied_tiny():
    from llmship.models.builtin import TINY_CONFIG, byte_tokenizer, random_weights
    from llmship.models.loaded import LoadedModel
    from llmship.models.spec import spec_from_config

    config = {**TINY_CONFIG, "tie_word_embeddings": False}
    spec = spec_from_config(config)
    return LoadedModel(TINY_UNTIED, config, spec, random_weights(config, seed=3), byte_tokenizer(spec.vocab_size))


READBACK = {
    # tied: int4 groups of 64, down_proj (160 inputs) falls back to int8, a rule puts one v_proj on int8; the tied
    # matrix is int4 with bf16 scales, read by embedding_4bit (fp32 storage) and by XNNPACK's head (bf16 storage)
    "tied-int4": ("builtin:tiny", {"group_size": 64, "embedding": "int4",
                                   "rules": ({"match": r"layers\.1\.self_attn\.v_proj$", "weights": "int8"},)}),
    # untied: int4 groups of 32 including the head, an int8 per-row embedding (embedding_byte), and a rule giving
    # one down_proj groups of 64, which its 160 inputs are no multiple of: int8 fallback
    "untied-int8-embedding": (TINY_UNTIED, {"rules": ({"match": r"layers\.2\.mlp\.down_proj$", "group_size": 64},)}),
}


@pytest.mark.parametrize("case", ["tied-int4", pytest.param("untied-int8-embedding", marks=pytest.mark.full)])
def test_the_pte_holds_the_records_codes_and_scales(tiny, case):
    """Every quantized linear XNNPACK holds, and the embedding table the program looks up, are the record's
    tensors bit for bit: codes, and scales in the dtype the runtime stores (nothing re-rounded, no tensor
    missing or extra, no linear left fp32). The decode method alone: both methods share the same weights."""
    from llmship.config import BuildConfig, Rule
    from llmship.exporters import executorch as et
    from llmship.models import build_decoder
    from llmship.pipeline import compression_record

    source, recipe = READBACK[case]
    loaded = tiny if source == "builtin:tiny" else untied_tiny()
    if "rules" in recipe:
        recipe = {**recipe, "rules": tuple(Rule(**r) for r in recipe["rules"])}
    target = profile("executorch-8da4w", **recipe)
    record, _, _ = compression_record(loaded, target, et, BuildConfig())
    decoder = build_decoder(loaded, CONTEXT, weights=record.dequantized_weights(loaded.weights))
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    pte, _ = et.build_pte(decoder, target, record, methods=("decode",))
    assert all(torch.equal(before[k], v) for k, v in decoder.state_dict().items()), "the export changed the job's decoder"

    tied = loaded.spec.tie_word_embeddings
    expected = {n: t for n, t in record.tensors.items() if n != EMBEDDING}
    if tied:
        expected[HEAD] = record.tensors[EMBEDDING]
    grids = {t.grid.bits for t in expected.values()}
    assert grids == {4, 8} and et.int8_fallbacks(target.recipe, loaded.spec, record), "the case must cover int4, int8, a fallback"
    linears, fp32 = pte_linears(pte)
    assert len(linears) == len(expected), f"{len(linears)} quantized linears in the .pte, the record has {len(expected)}"
    for name, t in expected.items():
        found = [s for c, s in linears if c.shape == t.codes.shape and torch.equal(c, t.codes)]
        assert len(found) == 1, f"{name}: its codes are not in the .pte"
        assert torch.equal(found[0], t.scale), f"{name}: the .pte's scales are not the record's"
    head_dim = loaded.spec.head_dim
    assert all(dims == [head_dim, head_dim] for dims in fp32), f"fp32 linears other than the rope rotation: {fp32}"

    emb = record.tensors[EMBEDDING]
    op, codes, scales = pte_embedding(pte)
    assert ("embedding_4bit" if emb.grid.bits == 4 else "embedding_byte") in op
    assert torch.equal(codes, emb.codes) and torch.equal(scales, emb.scale)


# ---------------------------------------------------------------- conversion at kernel-rounding level

def _export_and_validate(stories, target, out: Path) -> dict:
    from llmship.config import BuildConfig, Evaluation
    from llmship.pipeline import export_artifact
    from llmship.validation.stage import validate_artifact

    export_artifact(stories, target, out)
    config = BuildConfig(model=stories.source, evaluation=Evaluation(tokens=128, latency_runs=4))
    return validate_artifact(out, config, loaded=stories)


def _failed(report: dict) -> set[str]:
    return {g["name"] for g in report["gates"] if not g["passed"]}


@pytest.mark.shared
@pytest.mark.full  # make test's conversion checks on ExecuTorch: 8da4w (test_executorch.py) and the planted fault below
def test_the_int8_artifact_computes_the_compressed_reference(stories, tmp_path):
    """Against the compressed reference (record weights, XNNPACK's activation quantization simulated) the int8
    artifact differs by kernel rounding only: the same top-1 and greedy tokens, a KL well below its parity KL,
    and every gate of the profile (parity and conversion) passes. (8da4w's, 2e-13 against 0.053, is checked on
    the export test_executorch.py makes anyway.) Measured here: 2e-13 against 1e-3. The bound is loose because
    int8's recipe error is so small that one flip shows: kernel rounding can flip an int8 activation code lying on
    a rounding tie, and the KV cache carries it to every later position (llmship validate's 128 tokens: exact up to
    position 25, then KL 3.9e-4 against parity 1.2e-3)."""
    report = _export_and_validate(stories, profile("executorch-int8"), tmp_path / "int8")
    parity, conversion = report["parity"], report["conversion"]
    assert conversion["reference"].startswith("compressed")
    assert conversion["kl_mean"] < 0.5 * parity["kl_mean"], (conversion["kl_mean"], parity["kl_mean"])
    assert conversion["top1_agreement"] >= 0.99 and conversion["greedy_match"] == conversion["greedy_total"]
    assert "conversion_floor_ratio_max" in {g["name"] for g in report["gates"]}
    assert not _failed(report), report["gates"]


FAULTY = "model.layers.0.mlp.gate_proj"  # int4, two groups of 32 per row on stories260K


@pytest.mark.shared
def test_scales_shipped_one_group_off_fail_the_conversion_gate(stories, tmp_path, monkeypatch):
    """Planted converter fault: one projection's torchao tensor is built with its scales rolled by one group.
    The recipe's own parity gates still pass (the fault is small next to int4 rounding), the conversion gate
    does not: it is what catches a converter that ships other weights than the record's."""
    from llmship.exporters import executorch as et

    real = et.torchao_weight

    def rolled(t, activations):
        if t.name == FAULTY:
            t = dataclasses.replace(t, scale=torch.roll(t.scale, 1, dims=1))
        return real(t, activations)

    monkeypatch.setattr(et, "torchao_weight", rolled)
    report = _export_and_validate(stories, profile("executorch-8da4w"), tmp_path / "faulty")
    failed = _failed(report)
    assert "conversion_floor_ratio_max" in failed, report["conversion"]
    assert not failed & {"top1_agreement_min", "kl_mean_max", "ppl_ratio_max", "integrity"}, report["gates"]
