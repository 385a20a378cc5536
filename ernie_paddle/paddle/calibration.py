"""The layer-input Hessians that GPTQ (`export/gptq.py`) quantises with, collected by running the Paddle model on
calibration text."""

from __future__ import annotations

import numpy as np
import paddle.nn as nn

from ernie_paddle.checkpoint.layout import LM_HEAD_WEIGHT


class HessianCollector:
    """Accumulates 2 X^T X / n for the input of every Linear of a Paddle model (and of the LM head), by the name of
    its weight (the canonical names of `checkpoint.layout`)."""

    def __init__(self, model):
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self._hooks = []
        names = {id(p): name for name, p in model.named_parameters()}
        for layer in model.sublayers():
            if isinstance(layer, nn.Linear):
                self._hooks.append(layer.register_forward_pre_hook(self._hook(names[id(layer.weight)])))
        self._hooks.append(model.norm.register_forward_post_hook(
            lambda layer, inputs, output: self._add(LM_HEAD_WEIGHT, output)))

    def _hook(self, name: str):
        def hook(layer, inputs):
            self._add(name, inputs[0])
        return hook

    def _add(self, name: str, x) -> None:
        a = x.numpy().astype(np.float64)
        a = a.reshape(-1, a.shape[-1])
        if not len(a):
            return
        self.sums[name] = self.sums.get(name, 0) + 2.0 * a.T @ a
        self.counts[name] = self.counts.get(name, 0) + len(a)

    def hessians(self) -> dict[str, np.ndarray]:
        for h in self._hooks:
            h.remove()
        return {k: v / self.counts[k] for k, v in self.sums.items()}



def layer_hessians(model, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Layer-input Hessians from running `model` (Paddle) on token batches [B, T]."""
    collector = HessianCollector(model)
    for ids in batches:
        model(ids)
    return collector.hessians()
