"""Palettization: each group of output channels shares a 2^bits-entry lookup table fitted by k-means.

The clustering is coremltools' own (`_get_kmeans_lookup_table_and_weight`, what its palettizer's
mode="kmeans" runs, on the weights in fp16 as a Core ML program holds them), so the tables are the ones Core
ML's toolchain would choose; the record keeps them, and the exporter ships them as they are.
"""
from __future__ import annotations

import numpy as np
import torch


def kmeans(w: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor, None]:
    """(codes [N, K] int16, tables [N / group, 2^bits] float32 (fp16-exact), None) for a palette grid."""
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    n, k = w.shape
    rows = grid.group_size
    if n % rows:
        raise ValueError(f"{n} output channels are not a whole number of palette groups of {rows}")
    values = w.detach().float().numpy().astype(np.float16)
    codes = np.empty((n, k), dtype=np.int16)
    tables = np.empty((n // rows, 2 ** grid.bits), dtype=np.float32)
    for g in range(n // rows):
        group = values[g * rows:(g + 1) * rows]
        lut, indices = _get_kmeans_lookup_table_and_weight(grid.bits, group)
        tables[g] = np.asarray(lut, dtype=np.float16).reshape(-1).astype(np.float32)
        codes[g * rows:(g + 1) * rows] = np.asarray(indices).reshape(rows, k)
    return torch.from_numpy(codes), torch.from_numpy(tables), None
