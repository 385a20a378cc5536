"""`ernie-paddle export`: a checkpoint directory in, a verified ONNX model folder out.

The folder is assembled in a hidden temporary folder beside the destination (`atomic.atomic_dir`) and renamed into
place only after the graph is written and (by default) verified; a failure, Ctrl-C or SIGTERM removes it, so an
export that does not finish leaves nothing behind.
It holds `model.onnx` + `model.onnx.data`, `config.json`, `genai_config.json`, the tokenizer files (with a
`tokenizer.json` for onnxruntime-genai), and
`manifest.json` (source checkpoint hash, flavour, precision, parity figures, package versions).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

from ernie_paddle import graph_contract as contract
from ernie_paddle.atomic import atomic_dir, check_new_dir, write_json
from ernie_paddle.checkpoint.folder import TensorStream, copy_side_files, read_canonical
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import ExportError
from ernie_paddle.files import CONFIG, GENAI_CONFIG, MANIFEST, ONNX_MODEL, is_weight_file
from ernie_paddle.memory import fp32_bytes, fp32_reference_fits
from ernie_paddle.precisions import (BITS, DEFAULT_BLOCK_SIZE, EXPORT_PRECISIONS, KV_CACHES, attention_precision_of,
                                    check_block_size, kv_cache_for)

from ernie_paddle.export.genai import genai_config
from ernie_paddle.export.quantize import rtn
from ernie_paddle.export.tokenizer_json import write_tokenizer_files
from ernie_paddle.export.verify import FP32_LOGIT_TOL, compare, verification_prompts

FLAVORS = tuple(contract.FLAVORS)  # --flavor's choices

Log = Callable[[str], None]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def source_hash(model_dir: str) -> dict:
    """sha256 of config.json and every weight file, and one digest over them all."""
    files = sorted(f for f in os.listdir(model_dir) if f == CONFIG or is_weight_file(f))
    per_file = {f: _sha256(os.path.join(model_dir, f)) for f in files}
    total = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in per_file.items()).encode()).hexdigest()
    return {"sha256": total, "files": per_file}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ernie-paddle", "paddlepaddle", "paddlepaddle-gpu", "onnx", "onnxruntime", "onnxruntime-gpu",
                "paddle2onnx", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def check_options(flavor: str, precision: str, block_size: int, kv_cache: str = "fp32",
                  attention_precision: str | None = None) -> None:
    """Refuse an unknown flavour, precision or KV cache, or a combination that does not exist (ExportError), or a
    bad block size (InputError)."""
    if attention_precision is not None and (attention_precision not in BITS or precision not in BITS
                                            or flavor != contract.ORT.name):
        raise ExportError(f"--attention-precision {attention_precision}: the attention projections of an ort "
                          f"export with int8/int4/int2 weights take one of {', '.join(BITS)}; got --flavor "
                          f"{flavor} --precision {precision}")
    if kv_cache not in KV_CACHES:
        raise ExportError(f"--kv-cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
    if kv_cache == "int8" and flavor != contract.ORT.name:
        raise ExportError("--kv-cache int8 is GroupQueryAttention's quantised cache: the ort flavour only")
    if flavor not in FLAVORS:
        raise ExportError(f"--flavor must be one of {', '.join(FLAVORS)}, got {flavor!r}")
    if precision not in EXPORT_PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(EXPORT_PRECISIONS)}, got {precision!r}")
    if flavor == contract.PORTABLE.name and precision != "fp32":
        raise ExportError(f"the portable flavour (standard ONNX operators) is exported in fp32 only; use "
                          f"--flavor ort for --precision {precision}")
    check_block_size(block_size, "--block-size")


@dataclass(frozen=True)
class Options:
    """What to export: flavour, precision and the integer precisions' quantisation settings."""

    flavor: str = "ort"
    precision: str = "fp32"
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = 0
    quantizer: Callable = rtn  # a quantiser of `export.quantize` / `export.gptq`: named in the manifest, with its rule
    kv_cache: str = "fp32"  # or "int8": GroupQueryAttention's quantised cache, calibrated scales
    attention_precision: str | None = None  # the attention projections' own precision (None: `precision`)

    @property
    def quantized(self) -> bool:
        return self.precision in BITS

    @property
    def graph(self) -> contract.Flavor:
        """What the flavour's graph promises its runner (cache sharing, positions)."""
        return contract.FLAVORS[self.flavor]

    @property
    def provider(self) -> str:
        """The execution provider the folder is meant for: fp16 is for CUDA, everything else for the CPU."""
        return "cuda" if self.precision == "fp16" else "cpu"


def export(model_dir: str | None, out_dir: str, *, flavor: str = "ort", precision: str = "fp32",
           verify: bool = True, block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = 0,
           strict_config: bool = False, log: Log = lambda s: None, config: ErnieConfig | None = None,
           tensors=None, quantizer=None, kv_cache: str = "auto", attention_precision: str | None = None) -> dict:
    """Export `model_dir` to `out_dir`; returns the manifest. Raises ExportError when fp32 parity fails.

    `config` + `tensors` (canonical (name, array) pairs, e.g. `checkpoint.random_tensors`) export weights that are
    not in a checkpoint folder (benchmarks of the full shape); the `ort` flavour only, without verification.
    `quantizer` replaces round-to-nearest with absmax scales for int8/int4/int2 (`export.quantize.RoundToNearest`
    with another rule, `export.gptq.GPTQ`); the manifest records its `name` and `rule`. `attention_precision`
    (int8/int4/int2) quantises the self-attention projections apart from the other weights.
    """
    check_options(flavor, precision, block_size, kv_cache, attention_precision)
    check_new_dir(out_dir, ExportError)  # before any work starts
    if tensors is not None and (config is None or flavor != contract.ORT.name):
        raise ExportError("exporting in-memory tensors needs their config and the ort flavour")
    opts = Options(flavor, precision, block_size, accuracy_level, quantizer or rtn,
                   kv_cache_for(kv_cache, precision) if flavor == contract.ORT.name else "fp32", attention_precision)
    cfg = config or ErnieConfig.from_file(model_dir, strict=strict_config)
    t0 = time.time()
    with atomic_dir(out_dir, prefix=".tmp-export-", error=ExportError) as tmp:
        if tensors is None:
            tensors = ((m.canonical, a) for m, a in read_canonical(model_dir, cfg))
            skipped = None if verify else "--no-verify"
        else:
            skipped = "in-memory tensors: there is no checkpoint to load the Paddle reference from"
        write_graph(tmp, model_dir, cfg, opts, tensors, log)
        copy_checkpoint_files(model_dir, cfg, tmp)
        write_json(os.path.join(tmp, GENAI_CONFIG),
                   genai_config(cfg, ONNX_MODEL, opts.graph.has_position_ids, opts.provider,
                                eos_token_ids=_stop_ids(tmp), share_buffer=opts.graph.shares_kv_buffer))
        manifest = _manifest(tmp, model_dir, cfg, opts)
        write_json(os.path.join(tmp, MANIFEST), manifest)  # the runtime reads it during verification
        manifest["verification"] = {"skipped": skipped} if skipped else _verify(model_dir, tmp, cfg, opts, log)
        manifest["export_seconds"] = round(time.time() - t0, 2)
        write_json(os.path.join(tmp, MANIFEST), manifest)
    return manifest


def write_graph(folder: str, model_dir: str | None, cfg: ErnieConfig, opts: Options, tensors, log: Log) -> None:
    """Write `model.onnx` + its external data into `folder`, with the inputs and outputs `opts.graph` names.

    `tensors`: canonical (name, array) pairs in checkpoint order (the `ort` flavour streams them; the portable
    flavour loads the Paddle model from `model_dir` instead).
    """
    model_path = os.path.join(folder, ONNX_MODEL)
    if opts.flavor == contract.PORTABLE.name:
        from ernie_paddle.paddle.portable_export import export_portable

        export_portable(model_dir, cfg, model_path, log=log)
        return
    from ernie_paddle.export.graph import GraphBuilder, data_file_for
    from ernie_paddle.export.ort_graph import ErnieOrtBuilder

    g = GraphBuilder(*data_file_for(model_path))
    try:
        ErnieOrtBuilder(cfg, g, opts.precision, opts.block_size, opts.accuracy_level, opts.quantizer,
                        opts.attention_precision).build(
            TensorStream(tensors), progress=lambda s: log(f"export: {s}"))
        g.save(model_path, "ernie4_5", metadata={contract.FLAVOR: opts.flavor, contract.PRECISION: opts.precision})
    finally:
        g.close()
    if opts.kv_cache == "int8":
        from ernie_paddle.export.kv_cache import calibrate, calibration_ids, quantize_cache

        log("export: calibrating the int8 KV cache")
        scales = calibrate(model_path, cfg, calibration_ids(model_dir, cfg.vocab_size))
        quantize_cache(model_path, scales, model_path)


def copy_checkpoint_files(model_dir: str | None, cfg: ErnieConfig, folder: str) -> None:
    """config.json (as the checkpoint has it, or written from `cfg`), the tokenizer files present, and the
    tokenizer.json onnxruntime-genai needs (converted from tokenizer.model unless the checkpoint has one)."""
    if model_dir is None:
        cfg.save(folder)
        return
    shutil.copy2(os.path.join(model_dir, CONFIG), os.path.join(folder, CONFIG))
    copy_side_files(model_dir, folder)
    write_tokenizer_files(model_dir, folder)  # tokenizer.json + a tokenizer class onnxruntime-genai reads


def _stop_ids(folder: str) -> list[int]:
    """The ids the folder's tokenizer ends a generation with (none without a tokenizer)."""
    from ernie_paddle.text.tokenizer import ErnieTokenizer, has_tokenizer

    if not has_tokenizer(folder):
        return []
    return ErnieTokenizer(folder).stop_ids()


def _manifest(folder: str, model_dir: str | None, cfg: ErnieConfig, opts: Options) -> dict:
    """What the folder holds and where it came from; `verification` and `export_seconds` are filled in last."""
    quantized = opts.quantized
    return {
        contract.FORMAT: contract.FORMAT_VERSION, contract.FLAVOR: opts.flavor, contract.PRECISION: opts.precision,
        contract.MODEL_FILE: ONNX_MODEL,
        contract.EXTERNAL_DATA: sorted(f for f in os.listdir(folder) if f.endswith(".data")),
        contract.BLOCK_SIZE: opts.block_size if quantized else None,
        "accuracy_level": opts.accuracy_level if quantized else None,
        "quantization": opts.quantizer.name if quantized else None,
        "block_scales": opts.quantizer.rule if quantized else None,
        "attention_precision": attention_precision_of(opts.precision, opts.attention_precision),
        contract.KV_CACHE: opts.kv_cache,
        "padding": "right", **contract.manifest_io(opts.graph), "execution_provider": opts.provider,
        "source": ({"path": os.path.abspath(model_dir), **source_hash(model_dir)} if model_dir
                   else {"path": None, "generated": "in-memory tensors (no checkpoint)"}),
        "config": {"model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers,
                   "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size},
        "versions": _versions(), "export_seconds": None, "verification": None,
    }


def _verify(model_dir: str, folder: str, cfg: ErnieConfig, opts: Options, log: Log) -> dict:
    """Parity figures of the folder against the fp32 Paddle model; an fp32 export that misses them is refused."""
    need = fp32_bytes(cfg)
    if not fp32_reference_fits(cfg):
        log(f"export: skipping verification: the fp32 Paddle reference needs {need / 2**30:.1f} GiB")
        return {"skipped": f"the fp32 Paddle reference needs {need / 2**30:.1f} GiB, more than this machine has"}
    import onnxruntime as ort

    provider = opts.provider
    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        provider = "cpu"  # fp16 is meant for CUDA, but ONNX Runtime's CPU kernels run it too
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM
    from ernie_paddle.ort.runtime import OnnxCausalLM

    log("export: verifying against the Paddle model")
    reference = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir, config=cfg)
    candidate = OnnxCausalLM(folder, provider=provider)
    figures = compare(reference, candidate, verification_prompts(cfg.vocab_size))
    figures["reference"] = "paddle fp32"
    figures["execution_provider"] = provider
    log(f"export: max |logit diff| {figures['max_abs_logit_diff']:.2e}, "
        f"decode {figures['decode_max_abs_logit_diff']:.2e}, top-1 agreement {figures['top1_agreement']:.3f}, "
        f"greedy identical {figures['greedy_identical_prompts']}/{figures['prompts']}")
    if opts.precision == "fp32":
        worst = max(figures["max_abs_logit_diff"], figures["decode_max_abs_logit_diff"])
        if worst > FP32_LOGIT_TOL or figures["greedy_identical_prompts"] != figures["prompts"]:
            raise ExportError(f"verification failed: fp32 max |logit diff| {worst:.3e} (limit {FP32_LOGIT_TOL:g}), "
                              f"greedy tokens identical for {figures['greedy_identical_prompts']} of "
                              f"{figures['prompts']} prompts; nothing was written")
        figures["passed"] = True
    return figures
