"""A checkpoint folder's identity, cheap enough to compute at every load: what a saved KV state of the Paddle model
must match. A full digest of tens of GB would take minutes, so each weight file contributes its name, its size and
evenly spaced samples of its bytes (its header included), enough to tell two trainings or seeds apart."""

from __future__ import annotations

import hashlib
import os

from ernie_paddle import files

SAMPLES = 16  # windows read from each weight file
WINDOW = 1 << 16  # bytes per window


def fingerprint(folder: str) -> str:
    """16 hex digits over config.json and samples of every weight file of `folder`."""
    h = hashlib.sha256()
    names = sorted(f for f in os.listdir(folder) if f == files.CONFIG or files.is_weight_file(f))
    for name in names:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        h.update(f"{name}:{size}\n".encode())
        with open(path, "rb") as f:
            for offset in sorted({max(0, min(size - WINDOW, i * size // SAMPLES)) for i in range(SAMPLES)}):
                f.seek(offset)
                h.update(f.read(WINDOW))
    return h.hexdigest()[:16]
