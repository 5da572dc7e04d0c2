"""The machine's memory bandwidth, measured in the same run as the benchmark (decode is memory-bound:
tokens/s cannot exceed bandwidth / bytes of weights read per token)."""
from __future__ import annotations

import os
import time

import numpy as np


def measure_bandwidth(mb: int = 512, repeats: int = 5) -> dict:
    """Best-of-N read (sum over a buffer) and copy (src -> dst) bandwidth in GB/s, one thread each."""
    n = mb * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    read, copy = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        read.append(src.nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copy.append(2 * src.nbytes / (time.perf_counter() - t0) / 1e9)  # a copy reads and writes every byte
    return {"cores": os.cpu_count(), "read_gb_s": max(read), "copy_gb_s": max(copy), "buffer_mb": mb}
