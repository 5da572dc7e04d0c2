"""Conformance of the Core ML reference executor's op kernels.

Each op is built with coremltools' MIL builder on constant inputs, which makes coremltools run the op's own
`value_inference` (its reference semantics); the kernel must reproduce that value, rounded to the op's
declared dtype. Ops without a value_inference (constexpr decompression, scatter, silu, ...) are checked
against an independent numpy/torch computation. The last tests run whole saved programs: state threaded
across calls, and a clear error for an op the executor does not know.
"""
from __future__ import annotations

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, types  # noqa: E402

from llmship.errors import ModelError  # noqa: E402
from llmship.validation.runners.mil_executor import MilExecutor, run_op  # noqa: E402
from llmship.validation.runners.mil_ops import KERNELS  # noqa: E402

pytestmark = pytest.mark.coreml
rng = np.random.default_rng(0)


def rand(*shape, lo=-2.0, hi=2.0, dtype=np.float32):
    return rng.uniform(lo, hi, size=shape).astype(dtype)


def build(make):
    """Build op(s) inside an iOS18 function; returns the output var(s)."""
    with Function({}, opset_version=ct.target.iOS18):
        return make()


def check_against_value_inference(make, rtol=1e-5, atol=1e-6):
    out = build(make)
    outs = out if isinstance(out, (list, tuple)) else (out,)
    assert all(v.val is not None for v in outs), f"{outs[0].op.op_type}: coremltools computed no value"
    got = run_op(outs[0].op)
    for var, value in zip(outs, got):
        expected = np.asarray(var.val)
        assert value.shape == expected.shape, (outs[0].op.op_type, value.shape, expected.shape)
        np.testing.assert_allclose(value.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol,
                                   err_msg=outs[0].op.op_type)
    return outs[0].op.op_type


B1, B2 = rand(2, 3, 4), rand(3, 1)
POS1, POS2 = rand(2, 3, 4, lo=0.5, hi=3), rand(3, 1, lo=0.5, hi=3)
BOOL1, BOOL2 = rng.random((2, 3)) > 0.5, rng.random((2, 3)) > 0.5
BINARY = ["add", "sub", "mul", "real_div", "maximum", "minimum", "equal", "not_equal", "less", "less_equal",
          "greater", "greater_equal"]
UNARY = ["sqrt", "exp", "exp2", "sin", "cos", "tanh", "abs", "square", "floor", "ceil", "round", "sign", "relu",
         "sigmoid", "identity", "rsqrt", "inverse", "log"]

CASES = {
    **{f"{name}": (lambda name=name: getattr(mb, name)(x=B1, y=B2)) for name in BINARY},
    "pow": lambda: mb.pow(x=POS1, y=POS2),
    "floor_div": lambda: mb.floor_div(x=POS1 * 3, y=POS2),
    "mod": lambda: mb.mod(x=POS1 * 3, y=POS2),
    **{f"{name}": (lambda name=name: getattr(mb, name)(x=BOOL1, y=BOOL2)) for name in ("logical_and", "logical_or", "logical_xor")},
    "logical_not": lambda: mb.logical_not(x=BOOL1),
    **{f"{name}": (lambda name=name: getattr(mb, name)(x=POS1 if name in ("sqrt", "rsqrt", "inverse", "log") else B1 + 0.1))
       for name in UNARY},
    "clip": lambda: mb.clip(x=B1, alpha=-0.5, beta=0.7),
    "softmax": lambda: mb.softmax(x=B1, axis=1),
    **{f"{name}": (lambda name=name: getattr(mb, name)(x=B1, axes=[0, 2], keep_dims=True))
       for name in ("reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod")},
    "reduce_mean_all": lambda: mb.reduce_mean(x=B1),
    "reduce_argmax": lambda: mb.reduce_argmax(x=B1, axis=-1),
    "cast_to_fp16": lambda: mb.cast(x=B1 * 1000, dtype="fp16"),
    "cast_to_int32": lambda: mb.cast(x=B1 * 10, dtype="int32"),
    "reshape": lambda: mb.reshape(x=B1, shape=[4, -1]),
    "reshape_zero": lambda: mb.reshape(x=rand(2, 5), shape=[1, 0, -1, 0]),
    "transpose": lambda: mb.transpose(x=B1, perm=[2, 0, 1]),
    "expand_dims": lambda: mb.expand_dims(x=B1, axes=[0, -1]),
    "squeeze": lambda: mb.squeeze(x=rand(1, 3, 1, 2), axes=[0]),
    "squeeze_all": lambda: mb.squeeze(x=rand(1, 3, 1, 2)),
    "concat": lambda: mb.concat(values=[B1, rand(2, 1, 4)], axis=1),
    "concat_scalars": lambda: mb.concat(values=[np.int32(3), np.int32(4)], axis=0),
    "stack": lambda: mb.stack(values=[B1, B1 * 2], axis=1),
    "split_num": lambda: mb.split(x=rand(2, 6), num_splits=3, axis=1),
    "split_sizes": lambda: mb.split(x=rand(2, 6), split_sizes=[1, 5], axis=1),
    "tile": lambda: mb.tile(x=B1, reps=[1, 2, 3]),
    "slice_by_index": lambda: mb.slice_by_index(x=rand(4, 5, 6), begin=[1, 0, 5], end=[3, 4, 0], stride=[1, 2, -2],
                                                begin_mask=[False, True, False], end_mask=[False, False, True]),
    "slice_by_index_squeeze": lambda: mb.slice_by_index(x=rand(4, 5, 6), begin=[1, 0, -3], end=[2, 5, 6],
                                                        squeeze_mask=[True, False, False]),
    "slice_by_size": lambda: mb.slice_by_size(x=rand(4, 5, 6), begin=[1, 0, 2], size=[2, -1, 3]),
    "slice_update": lambda: mb.slice_update(x=rand(4, 5, 6), update=rand(2, 5, 2), begin=[1, 0, 2], end=[3, 5, 6],
                                            stride=[1, 1, 2]),
    "gather": lambda: mb.gather(x=rand(7, 3, 2), indices=np.array([[6, 0], [2, 2]], np.int32), axis=0),
    "gather_axis1_uint16": lambda: mb.gather(x=rand(3, 9), indices=np.array([8, 1, 4], np.uint16), axis=1),
    "gather_batch_dims": lambda: mb.gather(x=rand(2, 5, 3), indices=np.array([[4, 0], [1, 1]], np.int32), axis=1, batch_dims=1),
    "gather_along_axis": lambda: mb.gather_along_axis(x=rand(3, 4), indices=np.array([[0, 3], [1, 1], [2, 0]], np.int32), axis=1),
    "scatter_along_axis": lambda: mb.scatter_along_axis(data=rand(3, 4), indices=np.array([[0, 3], [1, 2], [2, 0]], np.int32),
                                                        updates=rand(3, 2), axis=1, mode="update"),
    "select": lambda: mb.select(cond=rng.random((2, 3, 4)) > 0.5, a=B1, b=np.float32(-1.0)),
    "fill": lambda: mb.fill(shape=np.array([2, 3], np.int32), value=1.5),
    "fill_like": lambda: mb.fill_like(ref_tensor=B1, value=2.0),
    "range_1d": lambda: mb.range_1d(end=np.int32(9), start=np.int32(2), step=np.int32(3)),
    "shape": lambda: mb.shape(x=B1),
    "band_part": lambda: mb.band_part(x=rand(2, 4, 5), lower=1, upper=0),
    "cumsum": lambda: mb.cumsum(x=B1, axis=1),
    "cumsum_reverse": lambda: mb.cumsum(x=B1, axis=2, reverse=True),
    "linear": lambda: mb.linear(x=rand(2, 3, 8), weight=rand(5, 8), bias=rand(5)),
    "matmul": lambda: mb.matmul(x=rand(2, 3, 8), y=rand(2, 4, 8), transpose_y=True),
    "layer_norm": lambda: mb.layer_norm(x=B1, axes=[-1], gamma=rand(4), beta=rand(4), epsilon=1e-5),
    "sdpa_float_mask": lambda: mb.scaled_dot_product_attention(query=rand(1, 2, 3, 8), key=rand(1, 2, 5, 8), value=rand(1, 2, 5, 4),
                                                               attn_mask=np.where(rng.random((3, 5)) > 0.3, 0, -np.inf).astype(np.float32)),
    "sdpa_bool_mask": lambda: mb.scaled_dot_product_attention(query=rand(1, 2, 3, 8), key=rand(1, 2, 5, 8), value=rand(1, 2, 5, 4),
                                                              attn_mask=np.tril(np.ones((3, 5), bool), 2)),
    "sdpa_no_mask": lambda: mb.scaled_dot_product_attention(query=rand(1, 3, 8), key=rand(1, 5, 8), value=rand(1, 5, 4)),
    "add_fp16": lambda: mb.add(x=rand(2, 3, dtype=np.float16), y=np.float16(0.1)),
    "linear_fp16": lambda: mb.linear(x=rand(2, 8, dtype=np.float16), weight=rand(5, 8, dtype=np.float16)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_coremltools_value_inference(case):
    # fp16 outputs: coremltools computes in fp16/fp32 too, so allow one fp16 rounding step.
    fp16 = case.endswith("fp16")
    check_against_value_inference(CASES[case], rtol=2e-3 if fp16 else 1e-5, atol=2e-3 if fp16 else 1e-6)


def test_every_kernel_is_covered_by_a_conformance_test():
    outs = [build(make) for make in CASES.values()]
    tested = {(out[0] if isinstance(out, (list, tuple)) else out).op.op_type for out in outs}
    independent = {"silu", "gelu", "scatter", "scatter_nd", "gather_nd", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense",
                   "constexpr_affine_dequantize", "constexpr_cast", "constexpr_sparse_to_dense"}
    assert set(KERNELS) - tested - independent == set()


# Ops without a coremltools value_inference: checked against an independent computation.

def test_silu_matches_torch():
    torch = pytest.importorskip("torch")
    x = rand(3, 7)
    got = run_op(build(lambda: mb.silu(x=x)).op)[0]
    np.testing.assert_allclose(got, torch.nn.functional.silu(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode,approximate", [("EXACT", "none"), ("TANH_APPROXIMATION", "tanh")])
def test_gelu_matches_torch(mode, approximate):
    torch = pytest.importorskip("torch")
    x = 3 * rand(3, 7)
    got = run_op(build(lambda: mb.gelu(x=x, mode=mode)).op)[0]
    want = torch.nn.functional.gelu(torch.from_numpy(x), approximate=approximate).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    other = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh" if approximate == "none" else "none").numpy()
    assert np.abs(got - other).max() > 1e-4  # the two modes differ by more than the tolerance: the mode is honoured


def test_scatter_is_torch_index_copy():
    torch = pytest.importorskip("torch")
    data, updates, idx = rand(1, 2, 6, 3), rand(1, 2, 2, 3), np.array([4, 1], np.int32)
    got = run_op(build(lambda: mb.scatter(data=data, indices=idx, updates=updates, axis=2, mode="update")).op)[0]
    want = torch.from_numpy(data).index_copy(2, torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(updates)).numpy()
    np.testing.assert_array_equal(got, want)


def test_concat_interleave_follows_the_spec_example():
    # coremltools 9's concat.value_inference ignores `interleave`; the op docstring's example is the spec.
    a = np.arange(1, 7, dtype=np.float32).reshape(3, 2)
    got = run_op(build(lambda: mb.concat(values=[a, a + 6], axis=0, interleave=True)).op)[0]
    np.testing.assert_array_equal(got, [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]])


def test_cumsum_exclusive_and_reverse_against_loops():
    # coremltools 9's cumsum.value_inference fails for exclusive=True.
    x = rand(2, 5)
    with Function({"x": mb.placeholder(shape=(2, 5))}, opset_version=ct.target.iOS18) as f:
        var = mb.cumsum(x=f.inputs["x"], axis=1, exclusive=True, reverse=True)
    got = run_op(var.op, {"x": x})[0]
    want = np.array([[x[r, c + 1:].sum() for c in range(5)] for r in range(2)], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_scatter_along_axis_add_against_loops():
    # coremltools 9's scatter_along_axis.value_inference ignores `mode` (always update).
    data, idx, upd = rand(3, 4), np.array([[0, 0], [1, 2], [3, 0]], np.int32), rand(3, 2)
    got = run_op(build(lambda: mb.scatter_along_axis(data=data, indices=idx, updates=upd, axis=1, mode="add")).op)[0]
    want = data.copy()
    for r in range(3):
        for k in range(2):
            want[r, idx[r, k]] += upd[r, k]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_scatter_add_accumulates_repeated_indices():
    data, updates = np.zeros((4, 2), np.float32), np.ones((3, 2), np.float32)
    got = run_op(build(lambda: mb.scatter(data=data, indices=np.array([1, 1, 3], np.int32), updates=updates, mode="add")).op)[0]
    np.testing.assert_array_equal(got, [[0, 0], [2, 2], [0, 0], [1, 1]])


def test_scatter_nd_and_gather_nd_against_loops():
    data, idx, upd = rand(3, 4, 2), np.array([[0, 1], [2, 3]], np.int32), rand(2, 2)
    got = run_op(build(lambda: mb.scatter_nd(data=data, indices=idx, updates=upd, mode="update")).op)[0]
    want = data.copy()
    for (i, j), u in zip(idx, upd):
        want[i, j] = u
    np.testing.assert_array_equal(got, want)
    gathered = run_op(build(lambda: mb.gather_nd(x=data, indices=idx)).op)[0]
    np.testing.assert_array_equal(gathered, np.stack([data[i, j] for i, j in idx]))


def test_blockwise_shift_scale_int4_blocks():
    # Independent: quantize a [4, 64] weight per block of 32 and dequantize with explicit loops.
    q = rng.integers(-8, 8, size=(4, 64)).astype(np.int8)
    scale = rand(4, 2, lo=0.01, hi=0.1).astype(np.float16)
    offset = rng.integers(-2, 3, size=(4, 2)).astype(np.int8)
    var = build(lambda: mb.constexpr_blockwise_shift_scale(data=q.astype(types.np_int4_dtype), scale=scale, offset=offset.astype(types.np_int4_dtype)))
    got = run_op(var.op)[0]
    want = np.empty((4, 64), np.float32)
    for r in range(4):
        for c in range(64):
            want[r, c] = np.float32(scale[r, c // 32]) * (q[r, c] - offset[r, c // 32])
    assert got.dtype == np.float32 and var.dtype == types.fp16  # fp16 values, held as float32
    np.testing.assert_allclose(got, want.astype(np.float16).astype(np.float32), rtol=0, atol=0)


def test_blockwise_shift_scale_int8_per_channel_without_offset():
    q, scale = rng.integers(-127, 128, size=(3, 5)).astype(np.int8), rand(3, 1, lo=0.01, hi=0.1)
    got = run_op(build(lambda: mb.constexpr_blockwise_shift_scale(data=q, scale=scale)).op)[0]
    np.testing.assert_allclose(got, q * scale, rtol=1e-6)


def test_lut_to_dense_docstring_example():
    # Case 1 of the op's docstring: 2-bit indices, two tables over the first axis.
    indices = np.array([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3], np.uint8).reshape(6, 2)
    lut = np.array([1.0, 5.0, 9.0, 13.0, 2.0, 10.0, 18.0, 26.0], np.float16).reshape(2, 1, 4, 1)
    got = run_op(build(lambda: mb.constexpr_lut_to_dense(indices=indices.astype(types.np_uint2_dtype), lut=lut)).op)[0]
    np.testing.assert_array_equal(got, [[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]])


def test_lut_to_dense_grouped_channels_and_vectors():
    indices = rng.integers(0, 16, size=(8, 6)).astype(np.uint8)
    lut = rand(4, 1, 16, 1, dtype=np.float16)  # 4 tables, each for 2 output channels
    got = run_op(build(lambda: mb.constexpr_lut_to_dense(indices=indices.astype(types.np_uint4_dtype), lut=lut)).op)[0]
    want = np.array([[lut[r // 2, 0, indices[r, c], 0] for c in range(6)] for r in range(8)], np.float32)
    np.testing.assert_array_equal(got, want)
    vec_idx = rng.integers(0, 2, size=(2, 2, 2)).astype(np.uint8)
    vec_lut = rand(1, 1, 1, 2, 3, dtype=np.float16)
    got = run_op(build(lambda: mb.constexpr_lut_to_dense(indices=vec_idx.astype(types.np_uint1_dtype), lut=vec_lut,
                                                         vector_axis=np.int32(1))).op)[0]
    want = np.zeros((2, 6, 2), np.float32)
    for i in range(2):
        for j in range(2):
            for k in range(2):
                want[i, 3 * j:3 * j + 3, k] = vec_lut[0, 0, 0, vec_idx[i, j, k]]
    np.testing.assert_array_equal(got, want)


def test_affine_dequantize_cast_and_sparse():
    q, zp, scale = rng.integers(0, 256, size=(3, 4)).astype(np.uint8), np.array([1, 2, 3], np.uint8), rand(3, lo=0.1, hi=1)
    got = run_op(build(lambda: mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=scale, axis=0)).op)[0]
    np.testing.assert_allclose(got, (q.astype(np.float32) - zp[:, None]) * scale[:, None], rtol=1e-6)
    half = rand(2, 3, dtype=np.float16)
    with Function({}, opset_version=ct.target.iOS16):
        var = mb.constexpr_cast(source_val=half, output_dtype="fp32")
    assert set(var.op.inputs) == {"source_val", "output_dtype"}
    np.testing.assert_array_equal(run_op(var.op)[0], half.astype(np.float32))
    mask = rng.random((3, 4)) > 0.5
    nonzero = rand(int(mask.sum()), dtype=np.float16)
    got = run_op(build(lambda: mb.constexpr_sparse_to_dense(nonzero_data=nonzero, mask=mask.astype(types.np_uint1_dtype))).op)[0]
    want = np.zeros((3, 4), np.float32)
    want[mask] = nonzero
    np.testing.assert_array_equal(got, want)


# Whole saved programs.

def _save(prog, path):
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, skip_model_load=True,
                       compute_precision=ct.precision.FLOAT32)
    model.save(str(path))
    return path


def test_state_threads_across_calls_and_resets(tmp_path):
    @mb.program(input_specs=[mb.StateTensorSpec((2, 3), dtype=types.fp16), mb.TensorSpec((2, 3), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(acc, x):
        total = mb.add(x=mb.read_state(input=acc), y=x)
        mb.coreml_update_state(state=acc, value=total)
        return mb.mul(x=total, y=np.float16(2.0), name="out")

    ex = MilExecutor(_save(prog, tmp_path / "acc.mlpackage"))
    state = ex.make_state()
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == {"acc": ((2, 3), np.float16)}
    xs = [rand(2, 3, dtype=np.float16) for _ in range(3)]
    for i, x in enumerate(xs):
        out = ex.predict("main", {"x": x}, state)["out"]
        total = np.sum([v.astype(np.float32) for v in xs[:i + 1]], axis=0)
        np.testing.assert_allclose(out, 2 * total, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(ex.predict("main", {"x": xs[0]}, ex.make_state())["out"], 2 * xs[0].astype(np.float32), rtol=1e-3)


def test_unknown_op_is_a_model_error_naming_it(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((2, 3))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.erf(x=x)

    assert "erf" not in KERNELS
    with pytest.raises(ModelError, match="'erf'"):
        MilExecutor(_save(prog, tmp_path / "erf.mlpackage"))
