"""Cross-framework parity report: Paddle (the reference) against exported ONNX folders, transformers and llama.cpp.

For each candidate, on the same prompts: per-layer hidden-state max and mean |diff| (where the candidate exposes
them), router agreement per MoE layer (share of tokens whose selected expert set is identical) and how often the
correction bias changed Paddle's choice, logits max |diff|, KL(Paddle || candidate), top-1 agreement, and the
length of the identical greedy continuation. `ernie-paddle parity` prints it, writes JSON and a drift plot.

The steps: each candidate in turn (one in memory at a time) traces the prompts and continues each greedily; then
the Paddle reference traces the prompts and, teacher-forced, each candidate's continuations, which tells how many
of the candidate's tokens Paddle would have chosen itself. The reference is the whole fp32 model when it fits in
memory, otherwise computed layer by layer. Probes are in `parity.probes`, the reference in `paddle.reference`,
the figures, table and plot in `parity.report`.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, ContextManager

import numpy as np

from ernie_paddle.errors import InputError
from ernie_paddle.scoring import shared_prefix
from ernie_paddle.parity.report import Trace, compare_traces


@dataclass
class CandidateRun:
    """What one candidate computed: its traces of the prompts and its greedy continuation of each."""

    name: str
    traces: list[Trace]
    continuations: list[list[int]]


def _check_inputs(onnx_dirs: list[str], use_hf: bool, gguf_files: list[str], streaming: bool) -> None:
    """Refuse what cannot run before any model is loaded."""
    from ernie_paddle.ort.runtime import load_manifest

    for folder in onnx_dirs:
        load_manifest(folder)  # names the folder when it is not an export
    if use_hf:
        if streaming:
            raise InputError("--hf needs the whole fp32 model in memory; it is too large here (drop --hf)")
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise InputError(f"--hf needs {' and '.join(missing)} (pip install -e \".[test]\")")
    for path in gguf_files:
        if not os.path.isfile(path):
            raise InputError(f"--gguf {path}: no such file")
    if gguf_files and importlib.util.find_spec("llama_cpp") is None:
        raise InputError("--gguf needs llama-cpp-python (pip install llama-cpp-python; docs/performance.md "
                         "has the build)")


def _openers(cfg, model_dir: str, onnx_dirs: list[str], use_hf: bool, gguf_files: list[str], n_ctx: int
             ) -> list[tuple[str, Callable[[], ContextManager]]]:
    """(label, opener) of every candidate, in report order: ONNX folders, transformers, GGUF files."""
    from ernie_paddle.parity.probes import open_hf, open_llama, open_onnx

    return ([(folder, partial(open_onnx, folder, cfg)) for folder in onnx_dirs]
            + ([("transformers", partial(open_hf, model_dir))] if use_hf else [])
            + [(path, partial(open_llama, path, cfg, n_ctx)) for path in gguf_files])


def _run_candidate(opener: Callable[[], ContextManager], prompts: list[list[int]], greedy_tokens: int
                   ) -> CandidateRun:
    with opener() as probe:
        return CandidateRun(probe.name, [probe.trace(p) for p in prompts],
                            [probe.greedy(p, greedy_tokens) for p in prompts])


def teacher_forced_match(ref_logits: np.ndarray, prompt_len: int, continuation: list[int]) -> int:
    """How many of `continuation` the reference would have produced greedily (its logits of prompt + continuation)."""
    pred = ref_logits[prompt_len - 1:prompt_len - 1 + len(continuation)].argmax(-1)
    return shared_prefix(pred.tolist(), continuation)


def run(model_dir: str, onnx_dirs: list[str], use_hf: bool, prompts: list[list[int]], greedy_tokens: int = 32,
        log: Callable[[str], None] = lambda s: None, streaming: bool | None = None,
        gguf_files: list[str] | None = None) -> dict:
    """The whole report as a dict (see module docstring). `streaming` (default: when the fp32 model would not fit
    in memory) computes the Paddle reference layer by layer."""
    from ernie_paddle.config import ErnieConfig
    from ernie_paddle.memory import fp32_reference_fits
    from ernie_paddle.paddle.reference import reference_traces

    cfg = ErnieConfig.from_file(model_dir)
    gguf_files = list(gguf_files or [])
    streaming = not fp32_reference_fits(cfg) if streaming is None else streaming
    _check_inputs(onnx_dirs, use_hf, gguf_files, streaming)
    n_ctx = max(len(p) for p in prompts) + greedy_tokens
    runs = []
    for label, opener in _openers(cfg, model_dir, onnx_dirs, use_hf, gguf_files, n_ctx):
        log(f"parity: {label}")
        runs.append(_run_candidate(opener, prompts, greedy_tokens))
        gc.collect()  # the candidate's weights go before the next one loads
    log("parity: Paddle reference" + (", layer by layer" if streaming else ""))
    n = len(prompts)
    seqs = list(prompts) + [p + g for r in runs for p, g in zip(prompts, r.continuations)]
    traces, changed = reference_traces(model_dir, cfg, seqs, streaming)
    ref, forced = traces[:n], traces[n:]
    report = {"model": os.path.abspath(model_dir), "prompts": n, "prompt_tokens": [len(p) for p in prompts],
              "greedy_tokens": greedy_tokens,
              "reference": "paddle fp32, layer by layer" if streaming else "paddle fp32",
              "moe_layers": [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)],
              "bias_changed_choice": [float(np.mean(x)) for x in zip(*changed[:n])], "candidates": []}
    for c, r in enumerate(runs):
        row = {"name": r.name, **compare_traces(ref, r.traces)}
        row["greedy_identical_tokens"] = [teacher_forced_match(forced[c * n + k].logits, len(p), g)
                                          for k, (p, g) in enumerate(zip(prompts, r.continuations))]
        report["candidates"].append(row)
    return report
