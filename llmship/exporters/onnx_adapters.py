"""Separate LoRA adapters on ONNX Runtime, in its own mechanism: one `.onnx_adapter` file per adapter
(onnxruntime.AdapterFormat), activated per run (RunOptions.add_active_adapter(LoraAdapter), or
onnxruntime-genai's og.Adapters, which reads the same files).

Every linear some adapter touches gets a branch beside its weight, whatever grid the weight is on:

    y = MatMul(x, W)  ->  y + MatMul(MatMul(x, Cast(<module>.lora_A)), Cast(<module>.lora_B))

`<module>.lora_A` [in, rank] and `<module>.lora_B` [rank, out] (fp16 or fp32, adapters.dtype; adapters/branch.py
says what they hold) are graph inputs with a default initializer of rank 0, so the bare base adds zeros, and an
adapter file holds the same names at its own rank, which ONNX Runtime feeds in place of the defaults. The base weights are in model.onnx once;
each adapter file holds only its A and B.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from llmship.adapters.branch import input_names, stored_pair

NUMPY = {"fp16": np.float16, "fp32": np.float32}
DIR = "adapters"
SUFFIX = ".onnx_adapter"
SELECT = ("onnxruntime: adapter = onnxruntime.LoraAdapter(); adapter.Load(file); run_options.add_active_adapter(adapter); "
          "session.run(..., run_options). onnxruntime-genai: adapters = og.Adapters(model); adapters.load(file, name); "
          "generator.set_active_adapter(adapters, name). No adapter active: the bare base.")


def _lora_input(model, name: str, shape: list, dtype: str) -> ir.Value:
    empty = np.zeros([0 if isinstance(d, str) else d for d in shape], dtype=NUMPY[dtype])
    value = ir.Value(name=name, const_value=ir.tensor(empty, name=name), shape=ir.Shape(shape),
                     type=ir.TensorType(ir.DataType.from_numpy(empty.dtype)))
    model.graph.inputs.append(value)
    model.graph.register_initializer(value)  # an initializer that is also an input: ORT's overridable default
    return value


def add_branches(model, adapters, find, dtype: str) -> None:
    """A LoRA branch beside every fp32 MatMul `<module>/MatMul` an adapter touches (before the record's weights
    replace the MatMul: a quantized op keeps the same input and output values)."""
    modules = sorted({m for a in adapters for m in a.lora})
    for i, module in enumerate(modules):
        node = find(model, f"{module}/MatMul")
        if node is None or node.op_type != "MatMul":
            raise RuntimeError(f"the traced graph has no fp32 MatMul for {module}")
        x, y = node.inputs[0], node.outputs[0]
        k, n = node.inputs[1].shape
        uses = list(y.uses())
        a_name, b_name = input_names(module)
        a, b = _lora_input(model, a_name, [k, f"lora_rank_{i}"], dtype), _lora_input(model, b_name, [f"lora_rank_{i}", n], dtype)
        base = f"{module}/lora"
        nodes = [ir.node("Cast", [a], {"to": ir.DataType.FLOAT}, name=f"{base}/CastA"),
                 ir.node("Cast", [b], {"to": ir.DataType.FLOAT}, name=f"{base}/CastB")]
        nodes.append(ir.node("MatMul", [x, nodes[0].outputs[0]], name=f"{base}/MatMulA"))
        nodes.append(ir.node("MatMul", [nodes[2].outputs[0], nodes[1].outputs[0]], name=f"{base}/MatMulB"))
        nodes.append(ir.node("Add", [y, nodes[3].outputs[0]], name=f"{base}/Add"))
        model.graph.insert_after(node, nodes)
        for use in uses:
            use.node.replace_input_with(use.idx, nodes[-1].outputs[0])


def write_adapters(out_dir: Path, adapters, dtype: str) -> dict[str, str]:
    """One .onnx_adapter file per adapter under out_dir/adapters; returns name -> file (relative to out_dir)."""
    import onnxruntime as ort

    (out_dir / DIR).mkdir()
    files = {}
    for adapter in adapters:
        params = {}
        for module, (a, b, scale) in sorted(adapter.lora.items()):
            for name, tensor in zip(input_names(module), stored_pair(a, b, scale, dtype)):
                params[name] = ort.OrtValue.ortvalue_from_numpy(tensor.numpy())
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters(params)
        files[adapter.name] = f"{DIR}/{adapter.name}{SUFFIX}"
        fmt.export_adapter(str(out_dir / files[adapter.name]))
    return files
