"""transformers' `Ernie4_5_MoeForCausalLM` / `Ernie4_5ForCausalLM` as the independent oracle (tests only)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM


class HFOracle:
    """An HF model in fp32 with eager attention and eager experts (the parity settings)."""

    def __init__(self, pt_dir: str):
        kwargs = dict(dtype=torch.float32, attn_implementation="eager")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(pt_dir, experts_implementation="eager", **kwargs)
        except (TypeError, ValueError):  # dense models and transformers 4.x have no experts_implementation
            self.model = AutoModelForCausalLM.from_pretrained(pt_dir, **kwargs)
        self.model.eval()
        self._router: list[torch.Tensor] = []
        for name, module in self.model.named_modules():
            if type(module).__name__.endswith("TopKRouter"):
                module.register_forward_hook(lambda m, i, o: self._router.append(o[2]))

    @torch.no_grad()
    def forward(self, ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [T, V] and, per MoE layer, the selected experts [T, k]."""
        self._router.clear()
        logits = self.model(torch.tensor([ids])).logits[0].float().numpy()
        return logits, [r.numpy() for r in self._router]

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int) -> list[int]:
        """n greedy tokens by full forward passes (no cache, no eos stop)."""
        seq = list(ids)
        for _ in range(n):
            seq.append(int(self.model(torch.tensor([seq])).logits[0, -1].argmax()))
        return seq[len(ids):]
