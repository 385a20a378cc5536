"""The machine's read bandwidth, measured: decode at batch 1 is bound by the bytes it reads, so every benchmark
records how fast this CPU reads with the threads it ran on."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BUFFER_BYTES = 512 << 20  # far beyond any CPU's last-level cache


def read_bandwidth(threads: int, buffer_bytes: int = BUFFER_BYTES, repeats: int = 5) -> float:
    """Bytes per second that `threads` threads read from memory: the fastest of `repeats` passes in which each
    sums its own slice of one buffer (numpy's reductions run outside the GIL)."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    data = np.ones(buffer_bytes // 8, np.float64)  # written once: every page resident before the timing
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            sums = list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    if sum(sums) != data.size:  # the reads happened
        raise RuntimeError("read_bandwidth: the buffer's sum is wrong")
    return data.nbytes / best

