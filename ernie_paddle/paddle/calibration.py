"""The layer-input Hessians that GPTQ (`export/gptq.py`) quantises with, collected by running the Paddle model on
calibration text: on the whole model in memory (`layer_hessians`), or one decoder layer at a time as the exporter
asks for them (`StreamedHessians`, for models whose fp32 weights do not fit)."""

from __future__ import annotations

import numpy as np
import paddle.nn as nn

from ernie_paddle.checkpoint.layout import LM_HEAD_WEIGHT


class HessianCollector:
    """Accumulates 2 X^T X / n for the input of every Linear of a Paddle model (and of the LM head), by the name of
    its weight (the canonical names of `checkpoint.layout`). `part`: only the Linears inside that sublayer of
    `model` (one decoder layer), without the head."""

    def __init__(self, model, part=None):
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self._hooks = []
        names = {id(p): name for name, p in model.named_parameters()}
        for layer in (part or model).sublayers():
            if isinstance(layer, nn.Linear):
                self._hooks.append(layer.register_forward_pre_hook(self._hook(names[id(layer.weight)])))
        if part is None:
            self._hooks.append(model.norm.register_forward_post_hook(
                lambda layer, inputs, output: self.add(LM_HEAD_WEIGHT, output)))

    def _hook(self, name: str):
        def hook(layer, inputs):
            self.add(name, inputs[0])
        return hook

    def add(self, name: str, x) -> None:
        """Add the rows of `x` [..., K] to the Hessian of the weight `name`."""
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


def calibration_batches(token_ids: np.ndarray, windows: int = 32, length: int = 128, batch: int = 8, seed: int = 0
                        ) -> list[np.ndarray]:
    """`windows` token windows of `length` from random places of `token_ids`, in batches [batch, length]."""
    if len(token_ids) <= length:
        raise ValueError(f"calibration text has {len(token_ids)} tokens; it needs more than {length}")
    starts = np.random.default_rng(seed).integers(0, len(token_ids) - length - 1, windows)
    return [np.stack([token_ids[s:s + length] for s in starts[i:i + batch]]) for i in range(0, windows, batch)]


class StreamedHessians:
    """Layer-input Hessians made one decoder layer at a time, in the order the exporter asks for them (`get`, what
    `export.gptq.GPTQ` reads): the calibration batches' residual stream is carried from layer to layer, each layer
    read from the checkpoint when first asked for and dropped with its Hessians when the next one is, so memory holds
    one fp32 layer and its Hessians. The head's are known only after the last layer: a tied head, quantised with the
    embedding before any layer, gets none (round-to-nearest)."""

    def __init__(self, model_dir: str, cfg, batches: list[np.ndarray]):
        from ernie_paddle.checkpoint.layout import maps_by_role

        self._args = (model_dir, cfg, batches)
        self._layer_of = {m.canonical: m.layer for m in maps_by_role(cfg).values()}
        self._count = cfg.num_hidden_layers
        self._reader = None  # the checkpoint is opened when the first Hessian is asked for
        self.done = 0  # decoder layers the batches have passed through
        self._current: dict[str, np.ndarray] = {}

    def _open(self) -> None:
        import paddle

        from ernie_paddle.paddle.streaming import open_without_layers, streamed_layers

        model_dir, cfg, batches = self._args
        self.model, self._reader = open_without_layers(model_dir, cfg)
        with paddle.no_grad():
            self._passes = [self.model.begin(ids) for ids in batches]
        self._layers = streamed_layers(self.model, model_dir, self._reader)

    def get(self, name: str) -> np.ndarray | None:
        """The Hessian of the input of weight `name`, or None (not a calibrated weight, or a layer already passed)."""
        if self._reader is None:
            self._open()
        layer = self._layer_of.get(name)
        if layer is None:
            return self._head(name)
        if layer < self.done - 1:
            return None
        while self.done <= layer:
            self._advance()
        return self._current.get(name)

    def _advance(self) -> None:
        import paddle

        layer = next(self._layers)
        collector = HessianCollector(self.model, part=layer)
        with paddle.no_grad():
            for p in self._passes:
                p.through(layer)
        self._current = collector.hessians()
        self.done += 1

    def _head(self, name: str) -> np.ndarray | None:
        if name != LM_HEAD_WEIGHT or self.done < self._count:
            return None
        if LM_HEAD_WEIGHT not in self._current:
            import paddle

            collector = HessianCollector(self.model, part=nn.Layer())  # no hooks: the head's input is added here
            with paddle.no_grad():
                for p in self._passes:
                    collector.add(LM_HEAD_WEIGHT, self.model.norm(p.x))
            self._current = collector.hessians()
        return self._current.get(LM_HEAD_WEIGHT)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
