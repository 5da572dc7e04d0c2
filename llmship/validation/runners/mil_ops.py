"""Numpy kernels for Core ML ML-program (MIL) operations, written from the op specifications in
coremltools.converters.mil.mil.ops.defs (iOS15-iOS18 opsets).

Each kernel is called with the op's inputs by their MIL names (optional inputs left out take the
spec's defaults) and returns the output array, or a tuple for ops with several outputs. Kernels compute
floating point in float32; the executor rounds every output to the dtype the program declares for it
(fp16 in an fp16 program), which is where the precision of the program comes from.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

KERNELS: dict[str, Callable] = {}


def kernel(*names: str):
    def register(fn):
        for name in names or (fn.__name__.rstrip("_"),):
            KERNELS[name] = fn
        return fn

    return register


def f32(x) -> np.ndarray:
    """float16 -> float32 (exact); other dtypes as they are."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _axes(axes, default=None):
    return default if axes is None else tuple(int(a) for a in np.atleast_1d(axes))


# Elementwise binary ops broadcast numpy-style (the MIL spec's rule).
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "floor_div": np.floor_divide, "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
for _name, _fn in _BINARY.items():
    KERNELS[_name] = lambda x, y, _fn=_fn: _fn(f32(x), f32(y))

_UNARY = {
    "sqrt": np.sqrt, "exp": np.exp, "exp2": np.exp2, "sin": np.sin, "cos": np.cos, "tanh": np.tanh,
    "abs": np.abs, "square": np.square, "floor": np.floor, "ceil": np.ceil, "round": np.round, "sign": np.sign,
    "logical_not": np.logical_not, "identity": lambda x: x, "relu": lambda x: np.maximum(x, 0),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "silu": lambda x: x / (1 + np.exp(-x)),
}
for _name, _fn in _UNARY.items():
    KERNELS[_name] = lambda x, _fn=_fn: _fn(f32(x))


@kernel()
def gelu(x, mode="EXACT"):
    x = f32(x)
    if str(mode) == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    if str(mode) == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    from math import erf

    return (0.5 * x * (1 + np.vectorize(erf, otypes=[np.float64])(x / np.sqrt(2)))).astype(np.float32)


@kernel()
def rsqrt(x, epsilon=1e-12):
    return 1 / np.sqrt(f32(x) + epsilon)


@kernel()
def inverse(x, epsilon=1e-4):
    return 1 / (f32(x) + epsilon)


@kernel()
def log(x, epsilon=1e-45):
    return np.log(f32(x) + epsilon)


@kernel()
def clip(x, alpha, beta):
    return np.minimum(np.maximum(f32(x), alpha), beta)


@kernel()
def softmax(x, axis=-1):
    x = f32(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


def _reduce(fn):
    return lambda x, axes=None, keep_dims=False: fn(f32(x), axis=_axes(axes), keepdims=bool(keep_dims))


for _name, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max,
                   "reduce_min": np.min, "reduce_prod": np.prod}.items():
    KERNELS[_name] = _reduce(_fn)


@kernel()
def reduce_argmax(x, axis=-1, keep_dims=False, output_dtype="int32"):
    out = np.argmax(f32(x), axis=int(axis))
    return np.expand_dims(out, int(axis)) if keep_dims else out


_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "uint16": np.uint16,
           "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


@kernel()
def cast(x, dtype):
    return np.asarray(x).astype(_DTYPES[str(dtype)])


@kernel()
def reshape(x, shape):
    # iOS17 rule: a 0 copies the matching dimension of x counted from the right, or 1 if there is none.
    x, shape = np.asarray(x), [int(s) for s in np.atleast_1d(shape)]
    n = len(shape)
    out = [(x.shape[x.ndim - n + i] if x.ndim - n + i >= 0 else 1) if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(out)


@kernel()
def transpose(x, perm):
    return np.transpose(x, [int(p) for p in perm])


@kernel()
def expand_dims(x, axes):
    return np.expand_dims(x, _axes(axes))


@kernel()
def squeeze(x, axes=None):
    return np.squeeze(x, _axes(axes))


@kernel()
def concat(values, axis, interleave=False):
    axis = int(axis)
    values = [np.atleast_1d(v) for v in values]  # scalars join as length-1 vectors (shape building)
    if not interleave:
        return np.concatenate(values, axis=axis)
    # Interleave: one slice of each input in turn along `axis`.
    axis = axis % np.ndim(values[0])
    stacked = np.stack(values, axis=axis + 1)
    shape = list(np.shape(values[0]))
    shape[axis] *= len(values)
    return stacked.reshape(shape)


@kernel()
def stack(values, axis):
    return np.stack(values, axis=int(axis))


@kernel()
def split(x, axis, num_splits=None, split_sizes=None):
    x, axis = np.asarray(x), int(axis)
    if split_sizes is None:
        return tuple(np.split(x, int(num_splits), axis=axis))
    return tuple(np.split(x, np.cumsum(split_sizes)[:-1], axis=axis))


@kernel()
def tile(x, reps):
    return np.tile(x, [int(r) for r in reps])


def _index_slices(shape, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    rank = len(shape)
    stride = [1] * rank if stride is None else stride
    begin_mask = [False] * rank if begin_mask is None else begin_mask
    end_mask = [False] * rank if end_mask is None else end_mask
    squeeze_mask = [False] * rank if squeeze_mask is None else squeeze_mask
    index = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(int(begin[i]))
        else:
            b = None if begin_mask[i] else int(begin[i])
            e = None if end_mask[i] else int(end[i])
            index.append(slice(b, e, int(stride[i])))
    return tuple(index)


@kernel()
def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.asarray(x)
    return x[_index_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)]


@kernel()
def slice_by_size(x, begin, size):
    x = np.asarray(x)
    index = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))
    return x[index]


@kernel()
def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    out = np.array(f32(x), copy=True)
    index = _index_slices(out.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out[index] = f32(update).reshape(out[index].shape)
    return out


@kernel()
def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    x, indices, axis, batch_dims = np.asarray(x), np.asarray(indices).astype(np.int64), int(axis), int(batch_dims)
    axis = axis % x.ndim
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    # Batch dims: gather independently inside each of the leading `batch_dims` dimensions.
    lead = x.shape[:batch_dims]
    xs, ids = x.reshape((-1,) + x.shape[batch_dims:]), indices.reshape((-1,) + indices.shape[batch_dims:])
    out = np.stack([np.take(a, i, axis=axis - batch_dims) for a, i in zip(xs, ids)])
    return out.reshape(lead + out.shape[1:])


@kernel()
def gather_along_axis(x, indices, axis=0, validate_indices=False):
    return np.take_along_axis(np.asarray(x), np.asarray(indices).astype(np.int64), axis=int(axis))


@kernel()
def gather_nd(x, indices, batch_dims=0, validate_indices=False):
    if int(batch_dims) != 0:
        raise NotImplementedError("gather_nd with batch_dims > 0")
    indices = np.asarray(indices).astype(np.int64)
    return np.asarray(x)[tuple(np.moveaxis(indices, -1, 0))]


_SCATTER_UFUNC = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                  "max": np.maximum, "min": np.minimum}


def _scatter_into(out: np.ndarray, index: tuple, updates, mode: str) -> np.ndarray:
    updates = f32(updates)
    if mode == "update":
        out[index] = updates  # with repeated indices the last update wins, as in numpy
    else:
        _SCATTER_UFUNC[mode].at(out, index, updates)
    return out


@kernel()
def scatter(data, indices, updates, axis=0, mode="update", validate_indices=False):
    out = np.array(f32(data), copy=True)
    axis = int(axis) % out.ndim
    index = (slice(None),) * axis + (np.asarray(indices).astype(np.int64),)
    return _scatter_into(out, index, updates, str(mode))


@kernel()
def scatter_along_axis(data, indices, updates, axis=0, mode="update", validate_indices=False):
    out = np.array(f32(data), copy=True)
    indices = np.asarray(indices).astype(np.int64)
    index = list(np.indices(indices.shape, sparse=True))
    index[int(axis) % out.ndim] = indices
    return _scatter_into(out, tuple(index), updates, str(mode))


@kernel()
def scatter_nd(data, indices, updates, mode="add", validate_indices=False):
    out = np.array(f32(data), copy=True)
    index = tuple(np.moveaxis(np.asarray(indices).astype(np.int64), -1, 0))
    return _scatter_into(out, index, updates, str(mode))


@kernel()
def select(cond, a, b):
    return np.where(cond, f32(a), f32(b))


@kernel()
def fill(shape, value=0.0):
    return np.full([int(s) for s in np.atleast_1d(shape)], f32(value))


@kernel()
def fill_like(ref_tensor, value=0.0):
    return np.full(np.shape(ref_tensor), f32(value))


@kernel()
def range_1d(end, start, step):
    return np.arange(f32(start), f32(end), f32(step))


@kernel()
def shape(x):
    return np.array(np.shape(x), dtype=np.int32)


@kernel()
def band_part(x, lower=-1, upper=-1):
    x = f32(x)
    m, n = x.shape[-2:]
    diff = np.arange(m)[:, None] - np.arange(n)[None, :]  # row - column
    keep = ((lower < 0) | (diff <= lower)) & ((upper < 0) | (-diff <= upper))
    return np.where(keep, x, 0)


@kernel()
def cumsum(x, axis=0, exclusive=False, reverse=False):
    x, axis = f32(x), int(axis)
    if reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if exclusive:
        out = out - x
    return np.flip(out, axis) if reverse else out


@kernel()
def linear(x, weight, bias=None):
    x, weight = f32(x), f32(weight)
    rows = x.reshape(-1, x.shape[-1])
    # weight [out, in] @ rows.T: BLAS's matrix-vector path at decode, up to 10x faster than rows @ weight.T.
    out = (weight @ rows.T).T.reshape(x.shape[:-1] + (weight.shape[0],))
    return out if bias is None else out + f32(bias)


@kernel()
def matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = f32(x), f32(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@kernel()
def layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    x = f32(x)
    axes = _axes(axes, tuple(range(x.ndim)))
    out = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + epsilon)
    out = out if gamma is None else out * f32(gamma)
    return out if beta is None else out + f32(beta)


@kernel()
def scaled_dot_product_attention(query, key, value, attn_mask=None):
    q, k, v = f32(query), f32(key), f32(value)
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(np.float32(q.shape[-1]))
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + f32(mask)
    return np.matmul(softmax(scores, axis=-1), v)


# Compile-time decompression ops: all inputs are constants; the executor evaluates them once at load.

@kernel()
def constexpr_blockwise_shift_scale(data, scale, offset=None):
    # output = scale * (data - offset); scale and offset cover blocks of data.shape / scale.shape
    data, scale = np.asarray(data).astype(np.float32), f32(scale)
    reps = [d // s for d, s in zip(data.shape, scale.shape)]
    if offset is not None:
        data = data - _repeat_blocks(np.asarray(offset).astype(np.float32), reps)
    return data * _repeat_blocks(scale, reps)


def _repeat_blocks(a: np.ndarray, reps) -> np.ndarray:
    for axis, r in enumerate(reps):
        if r > 1:
            a = np.repeat(a, r, axis=axis)
    return a


@kernel()
def constexpr_lut_to_dense(indices, lut, vector_axis=None, shape=None):
    if shape is not None:
        raise NotImplementedError("constexpr_lut_to_dense with packed indices (iOS16 form)")
    indices, lut = np.asarray(indices).astype(np.int64), f32(lut)
    rank = indices.ndim
    # lut is [G_0..G_{rank-1}, palette, vector]: table (g_0..) serves a block of indices.shape / G per axis.
    group = np.ix_(*[np.arange(n) // (n // g) for n, g in zip(indices.shape, lut.shape[:rank])])
    values = lut[group + (indices,)]  # indices.shape + [vector]
    if lut.shape[-1] == 1:
        return values[..., 0]
    # Vector palettization: each index expands to `vector` consecutive elements along vector_axis.
    axis = int(vector_axis) % rank
    out_shape = list(indices.shape)
    out_shape[axis] *= lut.shape[-1]
    return np.moveaxis(values, -1, axis + 1).reshape(out_shape)


@kernel()
def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    q = np.asarray(quantized_data).astype(np.float32)
    shape = [1] * q.ndim
    shape[int(axis)] = -1
    zp, sc = (np.asarray(v, dtype=np.float32) for v in (zero_point, f32(scale)))
    zp = zp.reshape(shape) if zp.ndim else zp
    sc = sc.reshape(shape) if sc.ndim else sc
    return (q - zp) * sc


@kernel()
def constexpr_cast(source_val, output_dtype):
    return np.asarray(source_val).astype(_DTYPES[str(output_dtype)])


@kernel()
def constexpr_sparse_to_dense(nonzero_data, mask):
    mask = np.asarray(mask)
    out = np.zeros(mask.shape, dtype=np.float32)
    out[mask != 0] = f32(nonzero_data)
    return out
