"""A reference executor for Core ML ML programs (.mlpackage), for machines without Apple's runtime.

It reads the saved package back with coremltools (the model spec plus weight.bin, through
coremltools' own milproto loader, the same path coremltools' optimizers use), then runs each function's
ops in order with the numpy kernels of `mil_ops`. What it executes is the shipped file: every weight
comes from the package, not from the PyTorch model.

Semantics kept from Core ML:
- every op's output is rounded to the dtype the program declares for it (an fp16 program is rounded to
  fp16 after each op; kernels accumulate in float32 in between, as fp16 hardware accumulates wider);
- states are fp16 tensors that persist across calls: `read_state` reads one, `coreml_update_state`
  writes one; `make_state()` gives zeroed states, shared by every function of a multifunction package;
- compile-time decompression ops (constexpr_*) are decoded once at load, from their stored constants.

It proves that the serialized program computes the intended function; it cannot show what Apple's
Core ML runtime (its op fusions, fp16 accumulation, ANE or GPU kernels) outputs on a device.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmship.errors import ModelError
from llmship.validation.runners.mil_ops import KERNELS

STATE_OPS = ("read_state", "coreml_update_state")
# Ops that only move or select existing values: their output is already on its dtype's grid, so the
# per-op rounding (two full copies of the tensor) is skipped for them when the dtype is unchanged.
MOVES = frozenset({"reshape", "transpose", "expand_dims", "squeeze", "tile", "slice_by_index", "slice_by_size",
                   "gather", "gather_along_axis", "gather_nd", "concat", "split", "stack", "identity", "select",
                   "scatter", "scatter_nd", "scatter_along_axis", "slice_update", "read_state", "coreml_update_state"})


def load_program(package: Path):
    """The MIL program of a saved .mlpackage (every function), weights read from its weight.bin."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    if not (Path(package) / "Manifest.json").is_file():
        raise ModelError(f"{package} is not a Core ML package (.mlpackage directory with a Manifest.json)")
    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ModelError(f"{package}: not an ML program (a {spec.WhichOneof('Type')} model); the reference executor runs ML programs only")
    return milproto_load(spec, spec.specificationVersion, model.weights_dir)


def _np_dtype(var) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(var.dtype))


def _as_compute(value):
    """Values in the compute representation: fp16 held as float32 (exact); everything else as is."""
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype == np.float16:
        return value.astype(np.float32)
    return value


def _round(value, dtype: np.dtype):
    value = np.asarray(value)
    if dtype == np.float16:
        return value.astype(np.float16).astype(np.float32)
    return value if value.dtype == dtype else value.astype(dtype)


def _holds(value, dtype: np.dtype) -> bool:
    """True when `value` is already in the compute representation of `dtype` (fp16 is held as float32)."""
    have = getattr(value, "dtype", None)
    return have == dtype or (dtype == np.float16 and have == np.float32)


@dataclass
class _Step:
    op_type: str
    name: str
    args: dict  # MIL input name -> env key, or a tuple of env keys for a variadic input
    outputs: tuple[str, ...]
    dtypes: tuple[np.dtype, ...]

    @property
    def moves(self) -> bool:
        return self.op_type in MOVES


class _Function:
    """One function of the program, compiled to a list of steps over an environment of named values."""

    def __init__(self, package: Path, name: str, func, shared: dict):
        self.name = name
        # Plain names, shapes and dtypes only: holding no Var lets the loaded program be freed after compiling.
        self.inputs = {n: _np_dtype(v) for n, v in func.inputs.items() if not _is_state(v)}
        self.state_inputs = {n: _state_shape_dtype(v) for n, v in func.inputs.items() if _is_state(v)}
        self.output_names = [v.name for v in func.outputs]
        self.output_dtypes = [_np_dtype(v) for v in func.outputs]
        self.consts: dict[str, object] = {}
        self.steps: list[_Step] = []
        for op in func.operations:
            if op.blocks:
                raise ModelError(f"{package}: function '{name}' uses control flow op '{op.op_type}' ({op.name}), "
                                 "which the Core ML reference executor does not run")
            if op.op_type == "const":
                self.consts[op.outputs[0].name] = _shared_const(shared, op.outputs[0])
            elif op.op_type.startswith("constexpr_"):
                self._fold(package, op, shared)
            elif op.op_type in KERNELS or op.op_type in STATE_OPS:
                args = {k: tuple(x.name for x in v) if isinstance(v, (list, tuple)) else v.name for k, v in op.inputs.items()}
                self.steps.append(_Step(op.op_type, op.name, args, tuple(o.name for o in op.outputs),
                                        tuple(_np_dtype(o) for o in op.outputs)))
            else:
                raise ModelError(_unknown_op(package, name, op))

    def _fold(self, package: Path, op, shared: dict) -> None:
        """Decompress a constexpr op once; a function whose inputs are the same shared consts reuses it."""
        if op.op_type not in KERNELS:
            raise ModelError(_unknown_op(package, self.name, op))
        key = (op.op_type, tuple((k, id(self.consts[v.name])) for k, v in op.inputs.items()))
        if key not in shared:
            shared[key] = run_op(op, self.consts)[0]
        self.consts[op.outputs[0].name] = shared[key]


def run_op(op, values: dict | None = None) -> tuple:
    """Execute one op on known inputs: from `values` by var name, else each input var's own constant value.
    Outputs come back rounded to the dtypes the program declares for them."""
    def value(var):
        return _as_compute(values[var.name] if values is not None and var.name in values else var.val)

    args = {k: tuple(value(x) for x in v) if isinstance(v, (list, tuple)) else value(v) for k, v in op.inputs.items()}
    out = KERNELS[op.op_type](**args)
    outs = out if len(op.outputs) > 1 else (out,)
    return tuple(_round(o, _np_dtype(var)) for o, var in zip(outs, op.outputs))


def _shared_const(shared: dict, var):
    """A const's compute value, shared with an identical const of another function (save_multifunction
    stores weights once; loaded back, each function has its own copy)."""
    value = var.val
    key = (var.name, np.shape(value), str(getattr(value, "dtype", type(value))))
    if key in shared and np.array_equal(shared[key][0], value):
        return shared[key][1]
    shared[key] = (value, _as_compute(value))
    return shared[key][1]


def _state_shape_dtype(var) -> tuple[tuple[int, ...], np.dtype]:
    from coremltools.converters.mil.mil import types

    wrapped = var.sym_type.wrapped_type()
    return tuple(wrapped.get_shape()), np.dtype(types.nptype_from_builtin(wrapped.get_primitive()))


def _is_state(var) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


def _unknown_op(package: Path, function: str, op) -> str:
    return (f"{package}: function '{function}' uses MIL op '{op.op_type}' ({op.name}), which the Core ML reference "
            f"executor does not implement (it knows {len(KERNELS)} op types; add a kernel to mil_ops.py)")


class MilExecutor:
    """Runs the functions of a saved ML program: predict(function, inputs, state) -> outputs."""

    def __init__(self, package: str | Path, threads: int | None = None):
        self.package = Path(package)
        program, shared = load_program(self.package), {}
        self.functions = {name: _Function(self.package, name, f, shared) for name, f in program.functions.items()}
        del program, shared
        self.threads = threads
        self._limiter = None
        if threads:
            from threadpoolctl import ThreadpoolController

            self._limiter = ThreadpoolController()

    def make_state(self) -> dict[str, np.ndarray]:
        """Zeroed states, one per state input of any function (functions of one package share them)."""
        return {name: np.zeros(shape, dtype) for f in self.functions.values() for name, (shape, dtype) in f.state_inputs.items()}

    def predict(self, function: str, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        if function not in self.functions:
            raise ModelError(f"{self.package} has no function '{function}' (it has {', '.join(self.functions)})")
        f = self.functions[function]
        missing = set(f.inputs) - set(inputs)
        if missing:
            raise ModelError(f"{self.package}:{function}: missing inputs {sorted(missing)}")
        if f.state_inputs and (state is None or set(f.state_inputs) - set(state)):
            raise ModelError(f"{self.package}:{function}: needs states {sorted(f.state_inputs)} (use make_state())")
        if self._limiter is None:
            return self._run(f, inputs, state)
        with self._limiter.limit(limits=self.threads):
            return self._run(f, inputs, state)

    def _run(self, f: _Function, inputs: dict, state: dict | None) -> dict[str, np.ndarray]:
        env = dict(f.consts)
        for name, dtype in f.inputs.items():
            env[name] = _round(_as_compute(np.asarray(inputs[name])), dtype)
        for step in f.steps:
            if step.op_type == "read_state":
                out = _as_compute(state[step.args["input"]])
            elif step.op_type == "coreml_update_state":
                name, out = step.args["state"], env[step.args["value"]]
                state[name] = np.asarray(out).astype(state[name].dtype)
            else:
                args = {k: tuple(env[x] for x in v) if isinstance(v, tuple) else env[v] for k, v in step.args.items()}
                try:
                    out = KERNELS[step.op_type](**args)
                except Exception as exc:
                    raise ModelError(f"{self.package}:{f.name}: op {step.name} ({step.op_type}) failed in the reference "
                                     f"executor: {type(exc).__name__}: {exc}") from exc
            outs = out if len(step.outputs) > 1 else (out,)
            for name, value, dtype in zip(step.outputs, outs, step.dtypes):
                env[name] = value if step.moves and _holds(value, dtype) else _round(value, dtype)
        return {name: np.asarray(env[name]).astype(dtype) for name, dtype in zip(f.output_names, f.output_dtypes)}
