"""Shared fixtures: random checkpoints of several geometries, written by the project in the real format."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ernie_paddle.checkpoint.folder import make_checkpoint
from ernie_paddle.config import ErnieConfig, preset

# The tests' tiny model: config's "tiny" preset with a smaller vocabulary, dense FFN, depth and window (the
# figures the tests state were measured on these). head_dim follows hidden_size / heads unless an override gives it.
TINY_CHANGES = dict(vocab_size=512, intermediate_size=160, num_hidden_layers=3, max_position_embeddings=2048,
                    head_dim=None)


def tiny_config(**overrides) -> ErnieConfig:
    return preset("tiny", **{**TINY_CHANGES, **overrides})


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """`ckpt_factory(name, layout=..., dtype=..., seed=..., max_shard_bytes=..., **config)` -> (dir, config)."""
    made: dict[str, tuple[str, ErnieConfig]] = {}

    def make(name: str, *, layout: str = "paddle", dtype: str = "float32", seed: int = 0,
             max_shard_bytes: int = 1 << 40, **overrides):
        if name not in made:
            cfg = tiny_config(**overrides)
            d = str(tmp_path_factory.mktemp("ckpt") / name)
            make_checkpoint(cfg, d, layout=layout, dtype=dtype, seed=seed, max_shard_bytes=max_shard_bytes)
            made[name] = (d, cfg)
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_factory):
    return ckpt_factory("tiny-default", tie_word_embeddings=False, seed=11)


@pytest.fixture(scope="session")
def tiny_models(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint as the two models the engine drives: {"onnx": its ort fp32 export, "paddle": itself}."""
    from ernie_paddle.export import pipeline
    from ernie_paddle.ort.runtime import OnnxCausalLM
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

    out = str(tmp_path_factory.mktemp("tiny-ort") / "ort")
    pipeline.export(tiny_ckpt[0], out, flavor="ort", precision="fp32", verify=False)
    return {"onnx": OnnxCausalLM(out), "paddle": Ernie4_5_MoeForCausalLM.from_pretrained(tiny_ckpt[0])}


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `ernie-paddle` as users do (through the installed module), capturing output."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ernie_paddle.cli.paddle_cli", *args], capture_output=True, text=True, env=e,
                          timeout=600)


def run_cli_onnx(*args: str) -> subprocess.CompletedProcess:
    """Run `ernie-onnx` as users do (through the installed module), capturing output."""
    return subprocess.run([sys.executable, "-m", "ernie_paddle.cli.onnx_cli", *args], capture_output=True, text=True,
                          timeout=600)


def import_hf_oracle():
    """tests/hf_oracle.py; the calling module is skipped only when torch or transformers is not installed. Any other
    ImportError (one inside the project) fails the tests instead of hiding as a skip blamed on torch."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} (the test extra) not installed", allow_module_level=True)
    import hf_oracle

    return hf_oracle


def prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()
