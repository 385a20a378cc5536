"""`ernie-paddle export`: a checkpoint directory in, a verified ONNX model folder out.

The folder is assembled in a temporary directory beside the destination and renamed into place only after
the graph is written and (by default) verified, so a failed or interrupted export leaves nothing behind.
It holds `model.onnx` + `model.onnx.data`, `config.json`, `genai_config.json`, the tokenizer files, and
`manifest.json` (source checkpoint hash, flavour, precision, parity figures, package versions).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Callable


from ernie_paddle.checkpoint import SIDE_FILES, read_canonical
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import ExportError
from ernie_paddle.memory import fp32_bytes
from ernie_paddle.sysinfo import available_memory

from .genai import genai_config
from .verify import FP32_LOGIT_TOL, compare, verification_prompts

FLAVORS = ("ort", "portable")
PRECISIONS = ("fp32", "fp16", "int8", "int4", "int2")
MODEL_FILE = "model.onnx"

Log = Callable[[str], None]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def source_hash(model_dir: str) -> dict:
    """sha256 of config.json and every weight file, and one digest over them all."""
    files = sorted(f for f in os.listdir(model_dir)
                   if f == "config.json" or (f.startswith("model") and f.endswith((".safetensors", ".json"))))
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


def check_options(flavor: str, precision: str, block_size: int) -> None:
    if flavor not in FLAVORS:
        raise ExportError(f"--flavor must be one of {', '.join(FLAVORS)}, got {flavor!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if flavor == "portable" and precision != "fp32":
        raise ExportError(f"the portable flavour (standard ONNX operators) is exported in fp32 only; use "
                          f"--flavor ort for --precision {precision}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"--block-size must be a power of two >= 16 (MatMulNBits), got {block_size}")


def export(model_dir: str | None, out_dir: str, *, flavor: str = "ort", precision: str = "fp32",
           verify: bool = True, block_size: int = 32, accuracy_level: int = 0, strict_config: bool = False,
           log: Log = lambda s: None, config: ErnieConfig | None = None, tensors=None, quantizer=None,
           quantizer_name: str = "rtn") -> dict:
    """Export `model_dir` to `out_dir`; returns the manifest. Raises ExportError when fp32 parity fails.

    `config` + `tensors` (canonical (name, array) pairs, e.g. `checkpoint.random_tensors`) export weights that are
    not in a checkpoint folder (benchmarks of the full shape); the `ort` flavour only, without verification.
    `quantizer` replaces round-to-nearest for int8/int4/int2 (e.g. `export.gptq.GPTQ`), named in the manifest.
    """
    check_options(flavor, precision, block_size)
    if os.path.exists(out_dir):
        raise ExportError(f"{out_dir}: output folder already exists; choose a new one")
    if tensors is not None and (config is None or flavor != "ort"):
        raise ExportError("exporting in-memory tensors needs their config and the ort flavour")
    cfg = config or ErnieConfig.from_file(model_dir, strict=strict_config)
    verify = verify and tensors is None
    t0 = time.time()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        model_path = os.path.join(tmp, MODEL_FILE)
        if flavor == "ort":
            from .graph import GraphBuilder, data_file_for
            from ernie_paddle.checkpoint import TensorStream

            from .ort_graph import ErnieOrtBuilder

            data_path, data_name = data_file_for(model_path)
            g = GraphBuilder(data_path, data_name)
            try:
                pairs = tensors if tensors is not None else ((m.canonical, a) for m, a in read_canonical(model_dir, cfg))
                ErnieOrtBuilder(cfg, g, precision, block_size, accuracy_level, quantizer).build(
                    TensorStream(pairs), progress=lambda s: log(f"export: {s}"))
                g.save(model_path, "ernie4_5", metadata={"flavor": flavor, "precision": precision})
            finally:
                g.close()
            has_position_ids = False
        else:
            from .portable import export_portable

            export_portable(model_dir, cfg, model_path, log=log)
            has_position_ids = True
        external = sorted(f for f in os.listdir(tmp) if f.endswith(".data"))
        if model_dir is None:
            cfg.save(tmp)
        else:
            shutil.copy2(os.path.join(model_dir, "config.json"), os.path.join(tmp, "config.json"))
        for f in SIDE_FILES if model_dir else ():
            if os.path.isfile(os.path.join(model_dir, f)):
                shutil.copy2(os.path.join(model_dir, f), os.path.join(tmp, f))
        provider = "cuda" if precision == "fp16" else "cpu"
        with open(os.path.join(tmp, "genai_config.json"), "w", encoding="utf-8") as f:
            json.dump(genai_config(cfg, MODEL_FILE, has_position_ids, provider), f, indent=2)
        manifest = {
            "format": "ernie-paddle-onnx/1", "flavor": flavor, "precision": precision, "model_file": MODEL_FILE,
            "external_data": external, "block_size": block_size if precision.startswith("int") else None,
            "accuracy_level": accuracy_level if precision.startswith("int") else None,
            "quantization": quantizer_name if precision.startswith("int") else None,
            "padding": "left", "inputs": ["input_ids", "attention_mask"] + (["position_ids"] if has_position_ids else [])
            + ["past_key_values.N.key", "past_key_values.N.value"],
            "outputs": ["logits", "present.N.key", "present.N.value"], "execution_provider": provider,
            "source": ({"path": os.path.abspath(model_dir), **source_hash(model_dir)} if model_dir
                       else {"path": None, "generated": "in-memory tensors (no checkpoint)"}),
            "config": {"model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers,
                       "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size},
            "versions": _versions(), "export_seconds": None, "verification": None,
        }
        _write_manifest(tmp, manifest)
        if verify:
            manifest["verification"] = _verify(model_dir, tmp, cfg, precision, provider, log)
        else:
            manifest["verification"] = {"skipped": "--no-verify"}
        manifest["export_seconds"] = round(time.time() - t0, 2)
        _write_manifest(tmp, manifest)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out_dir)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_manifest(folder: str, manifest: dict) -> None:
    with open(os.path.join(folder, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)


def _verify(model_dir: str, folder: str, cfg: ErnieConfig, precision: str, provider: str, log: Log) -> dict:
    need = fp32_bytes(cfg)
    if need > 0.6 * available_memory():
        log(f"export: skipping verification: the fp32 Paddle reference needs {need / 2**30:.1f} GiB")
        return {"skipped": f"the fp32 Paddle reference needs {need / 2**30:.1f} GiB, more than this machine has"}
    import onnxruntime as ort

    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        provider = "cpu"  # fp16 is meant for CUDA, but ONNX Runtime's CPU kernels run it too
    from ernie_paddle.modeling import Ernie4_5_MoeForCausalLM
    from ernie_paddle.onnx_runtime import OnnxCausalLM

    log("export: verifying against the Paddle model")
    reference = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir, config=cfg)
    candidate = OnnxCausalLM(folder, provider=provider)
    figures = compare(reference, candidate, verification_prompts(cfg.vocab_size))
    figures["reference"] = "paddle fp32"
    figures["execution_provider"] = provider
    log(f"export: max |logit diff| {figures['max_abs_logit_diff']:.2e}, decode {figures['decode_max_abs_logit_diff']:.2e}, "
        f"top-1 agreement {figures['top1_agreement']:.3f}, greedy identical "
        f"{figures['greedy_identical_prompts']}/{figures['prompts']}")
    if precision == "fp32":
        worst = max(figures["max_abs_logit_diff"], figures["decode_max_abs_logit_diff"])
        if worst > FP32_LOGIT_TOL or figures["greedy_identical_prompts"] != figures["prompts"]:
            raise ExportError(f"verification failed: fp32 max |logit diff| {worst:.3e} (limit {FP32_LOGIT_TOL:g}), "
                              f"greedy tokens identical for {figures['greedy_identical_prompts']} of "
                              f"{figures['prompts']} prompts; nothing was written")
        figures["passed"] = True
    return figures
