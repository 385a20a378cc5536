"""What the benchmark programs run on: the presets (a model shape and its engines), the checkpoint, ONNX exports and
GGUF files each engine reads, made once from the same weights, and `tools/bench`'s measurement of one engine in a
child process. An ONNX folder's name encodes its non-default export options and a reused folder must match them
(its manifest.json); GGUF files are written by `export.gguf` (F16 / Q8_0 / Q4_0) or, for Q4_K_M, by llama.cpp's own
quantizer from one of those."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from typing import Callable, NamedTuple

from ernie_paddle import __version__
from ernie_paddle import graph_contract as contract
from ernie_paddle.atomic import atomic_path
from ernie_paddle.benchmarking.child import ChildFailed, json_from_child
from ernie_paddle.errors import ExportError, OnnxFolderError
from ernie_paddle.files import MANIFEST
from ernie_paddle.precisions import (BITS, DEFAULT_BLOCK_SIZE, DEFAULT_SCALE_RULE, attention_precision_of,
                                    kv_cache_for)
from ernie_paddle.sysinfo import cpu_isa, cpu_model

ALL_CPU_ENGINES = ["paddle", "ort-portable", "ort-fp32", "ort-int8", "ort-int4", "genai-int4", "hf", "llama-f16",
                   "llama-q8_0", "llama-q4_0", "llama-q4_k_m"]


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
    "21b-a3b": Setup("21b-a3b", None, ["ort-int8", "ort-int4", "genai-int4", "llama-q8_0", "llama-q4_0",
                                       "llama-q4_k_m"]),  # int only
}
SAME_FOLDER = {"genai-int4": "ort-int4"}  # onnxruntime-genai runs the ort-int4 export as written
ORT_PRECISION = {"ort-fp32": "fp32", "ort-int8": "int8", "ort-int4": "int4", "ort-cuda-fp16": "fp16"}
GPU_ENGINES = ("paddle-gpu", "ort-cuda-fp16")  # Paddle bf16 with the fused kernels; ONNX Runtime CUDA fp16
ENGINES = ALL_CPU_ENGINES + list(GPU_ENGINES)


# How each llama.cpp engine's GGUF file is made: written by `export.gguf.write_gguf` in one of its types, or made by
# llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs) from another engine's file.
GGUF_TYPES = {"llama-f16": "F16", "llama-q8_0": "Q8_0", "llama-q4_0": "Q4_0"}  # write_gguf's types
UNQUANTIZED_GGUF = ("F32", "F16")  # quantizing from anything else is requantizing (`allow_requantize`)


class Quantized(NamedTuple):
    """A GGUF made by llama.cpp's quantizer: its file type (`llama_cpp.LLAMA_FTYPE_MOSTLY_<ftype>`) and the engine
    whose file it is quantized from, normally and when the preset's artifacts come straight from random tensors."""

    ftype: str
    source: str
    direct_source: str  # no F16 file there (the full shape's is 44 GB): requantized from this one


LLAMA_QUANTIZED = {"llama-q4_k_m": Quantized("Q4_K_M", "llama-f16", "llama-q4_0")}


class ExportOptions(NamedTuple):
    """The export options of the ONNX engines' folders (`bench --block-size --accuracy-level --kv-cache
    --block-scales --attention-precision`); all but the KV cache apply to the integer precisions only (the float
    exports get accuracy level 0)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = 4  # int8 activations in MatMulNBits/QMoE: the fast CPU kernels
    kv_cache: str = "auto"  # `export(kv_cache=...)`: int8 for the integer precisions, else fp32
    block_scales: str = DEFAULT_SCALE_RULE  # `export.quantize.RoundToNearest`'s rule
    attention_precision: str | None = None  # `export(attention_precision=...)`; None: the weights' precision


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


def machine_meta(threads: int, **settings) -> dict:
    """What every benchmark's JSON records beside its figures: the machine (CPU model, ISA flags, cores, the read
    bandwidth `threads` threads measure), the threads, Python, the release, the run's own `settings` and the time."""
    from ernie_paddle.benchmarking.bandwidth import read_bandwidth

    return {"threads": threads, "machine": platform.machine(), "cpu": cpu_model(), "cpu_isa": cpu_isa(),
            "cpus": os.cpu_count(), "read_gb_per_s": round(read_bandwidth(threads) / 1e9, 1),
            "python": platform.python_version(), "ernie_paddle": __version__, **settings,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_meta(preset: str, cfg, threads: int, **settings) -> dict:
    """`machine_meta` with the preset and the model shape first."""
    shape = ("hidden_size", "num_hidden_layers", "moe_num_experts", "moe_k", "num_attention_heads",
             "num_key_value_heads", "vocab_size")
    return {"preset": preset, "config": {k: getattr(cfg, k) for k in shape}, **machine_meta(threads, **settings)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- preparing artifacts (in the parent process) ---------------------------------------------------------------
def prepare(preset: str, work: str, engines: list[str], seed: int, num_layers: int | None,
            tokenizer_from_shipped: bool = False, *, export_options: ExportOptions = ExportOptions(),
            threads: int = 0):
    """Checkpoint, ONNX exports and GGUF files for the engines, made once and reused from `work`.

    `tokenizer_from_shipped`: a random checkpoint gets the shipped model's tokenizer (servers take text prompts).
    `export_options` make the ONNX folders (a reused one must match them); `threads` run llama.cpp's quantizer (0:
    every core). Returns (path per engine, why an engine's artifact could not be made, config)."""
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
    direct = from_random_tensors(preset, engines)
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
            out = os.path.join(work, folder_name(preset, e, export_options))
            why = _export_folder(e, out, source, export_options)
            if why:
                refused[e] = why
                continue
            paths[e] = out
            if vocab:
                _copy_tokenizer(vocab, out)
        elif e.startswith("llama-"):
            paths[e] = _llama_file(e, work, preset, source, vocab, direct, threads)
    if "hf" in engines:
        paths["hf"] = _pt_checkpoint(ckpt, os.path.join(work, f"{preset}-ckpt-pt"))
    return paths, refused, cfg


def from_random_tensors(preset: str, engines: list[str]) -> bool:
    """Whether `prepare` makes the engines' artifacts straight from random tensors, without a checkpoint: the full
    shape benchmarked in int8/int4 only (its bf16 checkpoint would be 44 GB)."""
    return preset == "21b-a3b" and all(e.startswith(("ort-int", "genai-", "llama-q")) for e in engines)


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


def _flavor_precision(engine: str) -> tuple[str, str]:
    return ("portable", "fp32") if engine == "ort-portable" else ("ort", ORT_PRECISION[engine])


def export_settings(engine: str, options: ExportOptions) -> dict:
    """What the engine's folder made with `options` records in its manifest.json (as `export.pipeline` writes it):
    flavour, precision, block size, accuracy level, block scales and attention precision (None unless
    int8/int4/int2), the KV cache export resolves."""
    flavor, precision = _flavor_precision(engine)
    quantized = precision in BITS
    return {contract.FLAVOR: flavor, contract.PRECISION: precision,
            contract.BLOCK_SIZE: options.block_size if quantized else None,
            "accuracy_level": options.accuracy_level if quantized else None,
            "block_scales": options.block_scales if quantized else None,
            "attention_precision": attention_precision_of(precision, options.attention_precision),
            contract.KV_CACHE: kv_cache_for(options.kv_cache, precision) if flavor == contract.ORT.name else "fp32"}


def folder_name(preset: str, engine: str, options: ExportOptions) -> str:
    """`{preset}-{engine}`, plus a suffix for each export setting that `options` change (`-b128`, `-acc0`,
    `-kvfp32`, `-absmax`, `-attnint8`): the name with default options is the one earlier runs made, so their
    folders are reused."""
    got, default = export_settings(engine, options), export_settings(engine, ExportOptions())
    suffix = {contract.BLOCK_SIZE: "b", "accuracy_level": "acc", contract.KV_CACHE: "kv", "block_scales": "",
              "attention_precision": "attn"}
    return f"{preset}-{engine}" + "".join(f"-{tag}{got[k]}" for k, tag in suffix.items() if got[k] != default[k])


def _before_the_field(field: str, manifest: dict):
    """What a folder exported before manifests recorded `field` had: absmax block scales, and attention at the
    weights' precision (None for float weights, as `export_settings` says)."""
    precision = manifest.get(contract.PRECISION)
    return {"block_scales": "absmax" if precision in BITS else None,
            "attention_precision": attention_precision_of(precision)}.get(field)


def check_folder(out: str, expected: dict) -> None:
    """Refuse a reused ONNX folder whose manifest.json does not record the `expected` settings (OnnxFolderError
    naming the folder and the field)."""
    import json

    try:
        with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise OnnxFolderError(f"{out}: cannot read its {MANIFEST} ({e}); remove the folder or use another --work") \
            from None
    for field, want in expected.items():
        got = manifest[field] if field in manifest else _before_the_field(field, manifest)
        if got != want:
            raise OnnxFolderError(f"{out}: {MANIFEST} records {field} {got!r}, this run asks for {want!r}; remove the "
                                  f"folder or use another --work")


def _export_folder(engine: str, out: str, source, options: ExportOptions = ExportOptions()) -> str | None:
    """Export the engine's ONNX folder with `options` unless it exists (then it must match them); returns why it
    cannot be made (options export refuses, the portable flavour past 2 GiB), or None."""
    from ernie_paddle.export.pipeline import check_options

    flavor, precision = _flavor_precision(engine)
    attention = options.attention_precision if precision in BITS else None  # float engines of the same run: none
    try:
        check_options(flavor, precision, options.block_size, options.kv_cache, attention)
    except ExportError as err:
        return str(err)[:200]
    if os.path.isdir(out):
        check_folder(out, export_settings(engine, options))
        return None
    from ernie_paddle.export.pipeline import export
    from ernie_paddle.export.quantize import RoundToNearest

    directory, cfg, tensors = _random_source(source)
    log(f"bench: exporting {engine} to {out}")
    try:
        export(directory, out, flavor=flavor, precision=precision, verify=False, config=cfg, tensors=tensors,
               block_size=options.block_size, accuracy_level=options.accuracy_level if precision in BITS else 0,
               kv_cache=options.kv_cache, quantizer=RoundToNearest(options.block_scales),
               attention_precision=attention, log=log)
    except ExportError as err:
        return str(err)[:200]
    return None


def gguf_path(work: str, preset: str, engine: str) -> str:
    """The llama.cpp engine's GGUF file in `work`, named by its type: `{preset}-q4_0.gguf`."""
    kind = GGUF_TYPES[engine] if engine in GGUF_TYPES else LLAMA_QUANTIZED[engine].ftype
    return os.path.join(work, f"{preset}-{kind.lower()}.gguf")


def gguf_source(engine: str, direct: bool) -> str | None:
    """What llama.cpp quantizes the engine's GGUF from, as a row records it ("F16", "Q4_0 (requantized)"), or None
    for a file write_gguf writes. `direct`: the artifacts come straight from random tensors (`from_random_tensors`)."""
    if engine not in LLAMA_QUANTIZED:
        return None
    kind = GGUF_TYPES[_quantize_from(engine, direct)]
    return kind if kind in UNQUANTIZED_GGUF else f"{kind} (requantized)"


def _quantize_from(engine: str, direct: bool) -> str:
    q = LLAMA_QUANTIZED[engine]
    return q.direct_source if direct else q.source


def _llama_file(engine: str, work: str, preset: str, source, vocab: str | None, direct: bool, threads: int) -> str:
    """The engine's GGUF file, made unless it exists: written from the weights, or quantized by llama.cpp from its
    source engine's file (made too if missing, and kept for reuse)."""
    out = gguf_path(work, preset, engine)
    if engine in GGUF_TYPES:
        _gguf_file(engine, out, source, vocab)
    elif not os.path.isfile(out):
        src_engine = _quantize_from(engine, direct)
        src = _llama_file(src_engine, work, preset, source, vocab, direct, threads)
        log(f"bench: quantizing {out} with llama.cpp ({LLAMA_QUANTIZED[engine].ftype} from "
            f"{gguf_source(engine, direct)}: {src})")
        llama_quantize(src, out, LLAMA_QUANTIZED[engine].ftype, threads,
                       requantize=GGUF_TYPES[src_engine] not in UNQUANTIZED_GGUF)
    return out


def llama_quantize(src: str, out: str, ftype: str, threads: int = 0, requantize: bool = False) -> None:
    """Quantize the GGUF `src` to `out` (file type `llama_cpp.LLAMA_FTYPE_MOSTLY_<ftype>`) with llama.cpp's own
    quantizer, which picks each tensor's type from `ftype` and the tensor's name and shape; all or nothing.

    `requantize`: `src` is itself quantized (llama.cpp refuses that otherwise). Raises ExportError naming `src`."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads  # <= 0: every core
    params.allow_requantize = requantize
    with atomic_path(out) as tmp:
        status = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params))
        if status != 0:
            raise ExportError(f"{src}: llama.cpp's quantizer could not make {ftype} from it (status {status}; its log "
                              f"above says why)")


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
