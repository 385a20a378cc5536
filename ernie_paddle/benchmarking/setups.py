"""What the benchmark programs run on: the presets (a model shape and its engines), the checkpoint, ONNX exports and
GGUF files each engine reads, made once from the same weights, and `tools/bench`'s measurement of one engine in a
child process."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from typing import Callable, NamedTuple

from ernie_paddle import __version__
from ernie_paddle.benchmarking.child import ChildFailed, json_from_child
from ernie_paddle.precisions import BITS
from ernie_paddle.sysinfo import cpu_isa, cpu_model

ALL_CPU_ENGINES = ["paddle", "ort-portable", "ort-fp32", "ort-int8", "ort-int4", "genai-int4", "hf", "llama-f16",
                   "llama-q8_0", "llama-q4_0"]


class Setup(NamedTuple):
    """What `--preset NAME` benchmarks: a model shape (a config preset, maybe cut to fewer layers) and its engines,
    on random weights, or on the shipped trained checkpoint (`shipped`)."""

    config_preset: str | None
    layers: int | None
    engines: list[str]
    shipped: bool = False


SETUPS = {
    "tiny": Setup("tiny", None, ALL_CPU_ENGINES),  # a smoke test
    "shipped": Setup(None, None, ["paddle", "ort-fp32", "ort-int4", "genai-int4", "llama-f16", "llama-q4_0"],
                     shipped=True),  # the trained model that ships with the package
    "mid": Setup("21b-a3b", 3, ALL_CPU_ENGINES),  # the 21B-A3B widths, 3 layers: one dense, two MoE
    "21b-a3b": Setup("21b-a3b", None, ["ort-int8", "ort-int4", "genai-int4", "llama-q8_0", "llama-q4_0"]),  # int only
}
SAME_FOLDER = {"genai-int4": "ort-int4"}  # onnxruntime-genai runs the ort-int4 export as written
ORT_PRECISION = {"ort-fp32": "fp32", "ort-int8": "int8", "ort-int4": "int4", "ort-cuda-fp16": "fp16"}
GPU_ENGINES = ("paddle-gpu", "ort-cuda-fp16")  # Paddle bf16 with the fused kernels; ONNX Runtime CUDA fp16
GGUF_TYPES = {"llama-f16": "F16", "llama-q8_0": "Q8_0", "llama-q4_0": "Q4_0"}
ENGINES = ALL_CPU_ENGINES + list(GPU_ENGINES)


def name_list(allowed: list[str] | tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names out of `allowed` (engines, parts of a benchmark), `what` naming
    them in the error."""
    def parse(text: str) -> list[str]:
        names = [x for x in text.split(",") if x]
        unknown = [x for x in names if x not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or repr(text)}; "
                                             f"choose from {', '.join(allowed)}")
        return names
    return parse


def run_meta(preset: str, cfg, threads: int, **settings) -> dict:
    """What a benchmark's JSON records beside its figures: the preset and model shape, the threads, the machine (CPU
    model, ISA flags, cores, read bandwidth with `threads` threads), Python, the release, the run's own `settings`
    and the time."""
    from ernie_paddle.benchmarking.bandwidth import read_bandwidth

    shape = ("hidden_size", "num_hidden_layers", "moe_num_experts", "moe_k", "num_attention_heads",
             "num_key_value_heads", "vocab_size")
    return {"preset": preset, "config": {k: getattr(cfg, k) for k in shape}, "threads": threads,
            "machine": platform.machine(), "cpu": cpu_model(), "cpu_isa": cpu_isa(), "cpus": os.cpu_count(),
            "read_gb_per_s": round(read_bandwidth(threads) / 1e9, 1), "python": platform.python_version(),
            "ernie_paddle": __version__, **settings,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- preparing artifacts (in the parent process) ---------------------------------------------------------------
def prepare(preset: str, work: str, engines: list[str], seed: int, num_layers: int | None,
            tokenizer_from_shipped: bool = False):
    """Checkpoint, ONNX exports and GGUF files for the engines, made once and reused from `work`.

    `tokenizer_from_shipped`: a random checkpoint gets the shipped model's tokenizer (servers take text prompts).
    Returns (path per engine, why an engine's artifact could not be made, config)."""
    from ernie_paddle.checkpoint.folder import make_checkpoint
    from ernie_paddle.config import preset as make_preset

    from ernie_paddle.cli.args import default_model_dir
    from ernie_paddle.config import ErnieConfig

    setup = SETUPS[preset]
    layers = num_layers or setup.layers
    os.makedirs(work, exist_ok=True)
    if setup.shipped:
        ckpt = default_model_dir()
        cfg = ErnieConfig.from_file(ckpt)
    else:
        ckpt = os.path.join(work, f"{preset}-ckpt")
        cfg = make_preset(setup.config_preset, **({"num_hidden_layers": layers} if layers else {}))
    # the full shape is benchmarked in int8/int4 only: its artifacts are made straight from random tensors,
    # without a 44 GB bf16 checkpoint on disk
    direct = preset == "21b-a3b" and all(e.startswith(("ort-int", "genai-", "llama-q")) for e in engines)
    if not direct and not os.path.isdir(ckpt):
        log(f"bench: writing a random {preset} checkpoint to {ckpt}")
        make_checkpoint(cfg, ckpt, layout="paddle", dtype="bfloat16", seed=seed)
    shipped_tokenizer = tokenizer_from_shipped and not setup.shipped
    if shipped_tokenizer and not direct:
        _copy_tokenizer(default_model_dir(), ckpt)
    vocab = default_model_dir() if shipped_tokenizer and direct else None  # no checkpoint: beside each artifact
    source = (None, cfg, seed) if direct else (ckpt, None, None)
    paths = {"paddle": ckpt, "paddle-gpu": ckpt}
    refused: dict[str, str] = {}
    for e in sorted(engines, key=lambda e: e in SAME_FOLDER):  # a folder's own engine first
        if e in SAME_FOLDER:
            if SAME_FOLDER[e] in paths:
                paths[e] = paths[SAME_FOLDER[e]]
            else:
                refused[e] = refused.get(SAME_FOLDER[e], f"needs the {SAME_FOLDER[e]} folder: add it to --engines")
            continue
        if e.startswith("ort-"):
            out = os.path.join(work, f"{preset}-{e}")
            why = _export_folder(e, out, source)
            if why:
                refused[e] = why
                continue
            paths[e] = out
            if vocab:
                _copy_tokenizer(vocab, out)
        elif e.startswith("llama-"):
            paths[e] = os.path.join(work, f"{preset}-{GGUF_TYPES[e].lower()}.gguf")
            _gguf_file(e, paths[e], source, vocab)
    if "hf" in engines:
        paths["hf"] = _pt_checkpoint(ckpt, os.path.join(work, f"{preset}-ckpt-pt"))
    return paths, refused, cfg


def _copy_tokenizer(src: str, dst: str) -> None:
    """The tokenizer files of the folder `src` into `dst`, where missing."""
    from ernie_paddle import files

    for name in (files.SPM_MODEL, files.TOKENIZER_CONFIG):
        if not os.path.isfile(os.path.join(dst, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _random_source(source):
    """(checkpoint dir, config, canonical tensors) from prepare's `source`: a checkpoint, or random tensors."""
    from ernie_paddle.checkpoint.folder import random_tensors

    directory, cfg, seed = source
    return (directory, None, None) if directory else (None, cfg, random_tensors(cfg, seed))


def _export_folder(engine: str, out: str, source) -> str | None:
    """Export the engine's ONNX folder unless it exists; returns why it cannot be made (the portable flavour past
    2 GiB), or None."""
    if os.path.isdir(out):
        return None
    from ernie_paddle.errors import ExportError
    from ernie_paddle.export.pipeline import export

    flavor, precision = ("portable", "fp32") if engine == "ort-portable" else ("ort", ORT_PRECISION[engine])
    directory, cfg, tensors = _random_source(source)
    log(f"bench: exporting {engine}")
    try:
        export(directory, out, flavor=flavor, precision=precision, verify=False, config=cfg, tensors=tensors,
               accuracy_level=4 if precision in BITS else 0, log=log)
    except ExportError as err:
        return str(err)[:200]
    return None


def _gguf_file(engine: str, out: str, source, vocab: str | None = None) -> None:
    """Write the engine's GGUF file unless it exists; from random tensors, its tokenizer is `vocab`'s (a folder with
    tokenizer.model), else placeholders."""
    if os.path.isfile(out):
        return
    from ernie_paddle.export.gguf import write_gguf

    directory, cfg, tensors = _random_source(source)
    log(f"bench: writing {out}")
    write_gguf(directory or vocab, out, GGUF_TYPES[engine], config=cfg, tensors=tensors)  # the tensors if given


def _pt_checkpoint(ckpt: str, pt: str) -> str:
    """The bf16 -PT copy transformers reads, made once."""
    if not os.path.isdir(pt):
        from ernie_paddle.checkpoint.folder import convert

        convert(ckpt, pt, layout="pt", dtype="bfloat16")
    return pt


def measure_in_child(engine: str, path: str, *, prompt_lengths: list[int], batches: list[int], decode_tokens: int,
                     threads: int, seed: int, vocab: int) -> dict:
    """`measure` in a fresh process, so that the peak RSS is this engine's alone; a failure becomes an error row."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    args = ["--run-engine", engine, "--path", path, "--prompt-lengths", ",".join(map(str, prompt_lengths)),
            "--batches", ",".join(map(str, batches)), "--decode-tokens", str(decode_tokens), "--threads",
            str(threads), "--seed", str(seed), "--vocab", str(vocab)]
    try:
        return json_from_child("ernie_paddle.tools.bench", args, env)
    except ChildFailed as e:
        return {"engine": engine, "error": (e.stderr.strip().splitlines() or ["failed"])[-1][:200]}
