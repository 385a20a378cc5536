"""The Paddle model one decoder layer at a time: the embedding, final norm and head stay in memory, each decoder layer
is read from the checkpoint (and checked) only when it is needed and dropped after, so work that passes activations
layer by layer (the parity report's reference, GPTQ calibration) runs on the full 21B-A3B where its fp32 weights do
not fit."""

from __future__ import annotations

import itertools
from typing import Iterator


def open_without_layers(model_dir: str, cfg):
    """(model, reader): the model with its embedding, final norm and head filled from `model_dir` and every decoder
    layer an empty placeholder, and the open checkpoint reader that `streamed_layers` reads them from (close it)."""
    from ernie_paddle.checkpoint.folder import open_checkpoint
    from ernie_paddle.checkpoint.layout import iter_canonical
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM
    from ernie_paddle.paddle.weights import fill_parameters

    model = Ernie4_5_MoeForCausalLM(cfg, with_layers=False)
    reader = open_checkpoint(model_dir)
    try:
        fill_parameters(model, iter_canonical(cfg, reader, skip=lambda m: m.layer is not None), model_dir)
    except BaseException:
        reader.close()
        raise
    return model, reader


def streamed_layers(model, model_dir: str, reader) -> Iterator:
    """Each decoder layer of `model` (built without them) in turn: built in its place, filled from the checkpoint
    (checked as `load_weights` checks), and dropped once the next one is needed."""
    import paddle.nn as nn

    from ernie_paddle.checkpoint.layout import iter_canonical
    from ernie_paddle.paddle.weights import fill_parameters

    tensors = iter_canonical(model.config, reader, skip=lambda m: m.layer is None)
    for i, pairs in itertools.groupby(tensors, key=lambda pair: pair[0].layer):  # the layout keeps a layer together
        model.layers[i] = model.decoder_layer(i)
        fill_parameters(model, pairs, model_dir, f"decoder layer {i}", part=model.layers[i])
        yield model.layers[i]
        model.layers[i] = nn.Layer()
