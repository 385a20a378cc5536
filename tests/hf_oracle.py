"""transformers' implementation as the independent oracle for the parity tests (tests only).

A thin view of `ernie_paddle.parity.probes.HFProbe` (eager attention and experts, fp32), which the parity report
uses too, with one convention pinned: the rotary inverse frequencies. transformers computes them with torch's fp32
`pow`, which lands an ulp away from the nearest fp32 value at a few indices, at different ones on different
installs; at position 131071 one ulp of a high frequency turns the angle by ~1e-3 rad. The oracle takes the
project's table (`rope.inv_freq`, correctly rounded), so the tests compare implementations rather than libm builds;
`test_long_context.py` checks that transformers' own table is within one ulp of it.
"""

from __future__ import annotations

import numpy as np
import torch

from ernie_paddle import rope
from ernie_paddle.parity.probes import HFProbe


class HFOracle(HFProbe):
    def __init__(self, pt_dir: str):
        super().__init__(pt_dir)
        theta = self.model.config.rope_parameters["rope_theta"]
        for module in self.model.modules():
            if hasattr(module, "inv_freq"):
                table = torch.from_numpy(rope.inv_freq(2 * module.inv_freq.numel(), theta).copy())
                self.own_inv_freq = module.inv_freq.clone()
                module.inv_freq.copy_(table)
                module.original_inv_freq = table.clone()

    def forward(self, ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [T, V] and, per MoE layer, the selected experts [T, k]."""
        t = self.trace(ids)
        return t.logits, t.experts
