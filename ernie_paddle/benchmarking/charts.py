"""Figures for the benchmark programs: matplotlib is an optional extra, so a missing install skips the chart with
one line instead of failing a long run at its end."""

from __future__ import annotations

import sys


def subplots(program: str, *args, **kwargs):
    """`matplotlib.pyplot.subplots(*args, **kwargs)` on the file-only Agg backend, or None (saying so on stderr, in
    `program`'s name) when matplotlib is not installed. Save the figure with `atomic.write_png`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{program}: matplotlib is not installed; no chart written (pip install matplotlib)", file=sys.stderr,
              flush=True)
        return None
    return plt.subplots(*args, **kwargs)
