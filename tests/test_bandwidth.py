"""The read bandwidth every benchmark JSON records (`benchmarking/bandwidth.py`)."""

from __future__ import annotations

import pytest

from ernie_paddle.benchmarking.bandwidth import read_bandwidth


def test_read_bandwidth_is_a_plausible_memory_speed():
    # any machine that runs the suite reads memory faster than 0.2 GB/s even with another process on its cores, and
    # no CPU socket reads 2 TB/s from DRAM (a figure above that would mean the buffer sat in a cache)
    bandwidth = read_bandwidth(1, buffer_bytes=64 << 20, repeats=2)
    assert 0.2e9 < bandwidth < 2e12


def test_bad_thread_counts_are_refused_by_name():
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        read_bandwidth(0)

