"""transformers' implementation as the independent oracle for the parity tests (tests only).

A thin view of `ernie_paddle.parity.HFProbe` (eager attention and experts, fp32), which the parity report uses too.
"""

from __future__ import annotations

import numpy as np
import torch  # noqa: F401  (imported here so that tests skip cleanly without the test extra)

from ernie_paddle.parity import HFProbe


class HFOracle(HFProbe):
    def forward(self, ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [T, V] and, per MoE layer, the selected experts [T, k]."""
        t = self.trace(ids)
        return t.logits, t.experts
