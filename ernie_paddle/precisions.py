"""Precision names and quantisation rules: the one place the exporter, the planner and the CLIs read them."""

from __future__ import annotations

from ernie_paddle.errors import InputError

# Exported ONNX folders (`ernie-paddle export --precision`).
EXPORT_PRECISIONS = ("fp32", "fp16", "int8", "int4", "int2")
# What the memory planner models: the exports plus Paddle's bf16 on GPU.
PLAN_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4", "int2")
# Paddle compute / checkpoint dtypes (`--dtype`).
DTYPES = ("float32", "bfloat16", "float16")
# Bits per weight of the integer precisions (MatMulNBits / QMoE).
BITS = {"int8": 8, "int4": 4, "int2": 2}
DEFAULT_BLOCK_SIZE = 32
# The exported KV cache (`export --kv-cache`): fp32/fp16 as the activations, or GroupQueryAttention's int8 cache
# (calibrated per-channel scales, a quarter of fp32's bytes). "auto": int8 for the integer precisions.
KV_CACHES = ("auto", "fp32", "int8")
SCALE_RULES = ("absmax", "mse")  # how a quantisation block's scale is chosen (export/quantize.py)
DEFAULT_SCALE_RULE = "mse"  # what export, bench and GPTQ use unless told (absmax before 0.3.0)


def attention_precision_of(precision: str, attention: str | None = None) -> str | None:
    """The attention projections' precision an export records (`export --attention-precision`): `attention` if
    given, else the weights' own; None for float weights, whose attention is not quantised apart."""
    return (attention or precision) if precision in BITS else None


def float_bytes(precision: str) -> int:
    """Bytes per float value at `precision`: 2 for bf16 and fp16, else 4 (fp32, and the integer exports' float
    tensors: activations, KV cache, norms)."""
    return 2 if precision in ("bf16", "fp16") else 4


def kv_cache_for(kv_cache: str, precision: str) -> str:
    """The cache an export gets: "auto" is int8 for int8/int4/int2 weights, the activations' float otherwise."""
    if kv_cache != "auto":
        return kv_cache
    return "int8" if precision in BITS else "fp32"


def kv_cache_bytes(kv_cache: str, precision: str) -> int:
    """Bytes per cached key or value element: 1 in the int8 cache, the activations' width otherwise."""
    return 1 if kv_cache_for(kv_cache, precision) == "int8" else float_bytes(precision)


def check_block_size(block_size: int, name: str = "") -> None:
    """MatMulNBits takes blocks that are powers of two of at least 16 elements.

    Raises InputError stating the rule, after the argument's `name` when given (argparse names it itself)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"{name} must be a power of two >= 16 (MatMulNBits), got {block_size}".lstrip())


def expert_block(bits: int, block_size: int) -> int | None:
    """Quantisation block of routed-expert weights: int8 QMoE is per output channel (None: one block per row).

    Block-wise int8 QMoE has no exact CPU kernel in ONNX Runtime, so int8 experts are quantised per channel.
    """
    return None if bits == 8 else block_size
