"""Memory planner: weights, KV cache and working memory of an ERNIE-4.5 model at a precision and context.

Weights follow what each runtime actually holds resident. Paddle keeps every tensor in the compute dtype (router
fp32). ONNX Runtime int8/int4/int2 exports hold linear layers (MatMulNBits) and routed experts (QMoE) in MLAS's
prepacked form for `accuracy_level` 4: the packed codes plus about 11 bytes per quantisation block (fp32 scale, block
sum and alignment); the exported fp16 scales are dropped. The fp32 embedding table stays memory-mapped from the
external data file: only the rows of tokens seen become resident. Which tensor is which comes from the layout
table's roles. Sizes are reported in GiB, as the benchmark's peak RSS.

The two fitted constants, and the measurements they were fitted to, are stated in tests/test_memory.py, which checks
the planner against measurements held out of the fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import InputError
from ernie_paddle.generation import GenerationConfig
from ernie_paddle.checkpoint.layout import PT, Role, TensorMap, tensor_maps
from ernie_paddle.precisions import (BITS, DEFAULT_BLOCK_SIZE, PLAN_PRECISIONS, check_block_size, expert_block, float_bytes,
                         kv_cache_bytes, kv_cache_for)
from ernie_paddle.serving.prefix_cache import BLOCK_TOKENS, bytes_per_token
from ernie_paddle.sizes import parse_size as _parse_size

# MLAS prepacked MatMulNBits / QMoE, accuracy_level 4: bytes per block beyond the codes. Least squares over the four
# weight-only measurements of tests/test_memory.py (FIT_WEIGHTS).
PACKED_BLOCK_BYTES = 11.20
# The ONNX Runtime process beyond the planned tensors (runtime, Python, numpy, pages mapped while loading), set from
# the one measured peak of tests/test_memory.py's FIT_PEAK (which implies 0.62 GiB; the test allows 0.1 GiB).
ORT_RUNTIME = int(0.7 * 2**30)
# Memory of common GPUs as sold, in decimal GB (1 GB = 1e9 bytes, as sizes.parse_size reads "16GB").
GPUS = {name: _parse_size(size) for name, size in (
    ("T4", "16GB"), ("A10", "24GB"), ("L4", "24GB"), ("RTX 4090", "24GB"), ("A100-40GB", "40GB"),
    ("A100-80GB", "80GB"), ("H100", "80GB"), ("H200", "141GB"))}
GIB = 2**30


@dataclass
class MemoryPlan:
    """Bytes one process needs, by what holds them."""

    weights: int
    kv_cache: int
    working: int
    runtime: int
    prefix_cache: int = 0  # the server's pool of computed prefixes (`serve --prefix-cache-memory`)
    prefix_tokens: int = 0  # the tokens of prefix it holds

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working + self.runtime + self.prefix_cache


def prefix_cache_tokens(max_bytes: int, token_bytes: int) -> int:
    """Tokens of prefix a pool of `max_bytes` holds at `token_bytes` a token: whole blocks only, as it evicts."""
    return max_bytes // (token_bytes * BLOCK_TOKENS) * BLOCK_TOKENS


def prefix_itemsize(kv_dtype: str) -> int:
    """Bytes an element of the prefix pool takes for a cache of `kv_dtype` (a numpy name, or Paddle's bfloat16,
    which the pool keeps widened to float32: numpy has no bfloat16)."""
    return np.dtype("float32" if kv_dtype in ("bfloat16", "bf16") else kv_dtype).itemsize


def fp32_bytes(cfg: ErnieConfig) -> int:
    """Size of every weight in fp32: what the Paddle CPU model (and the portable flavour) holds."""
    return 4 * sum(int(np.prod(m.shape)) for m in tensor_maps(cfg, PT))


# The whole fp32 Paddle model is loaded as a reference (export verification, the parity report) only within this
# share of the available memory: the rest is for the candidate compared with it.
FP32_REFERENCE_SHARE = 0.5


def fp32_reference_fits(cfg: ErnieConfig) -> bool:
    """Whether the whole fp32 Paddle model fits as a reference here (unknown available memory: assume it does)."""
    from ernie_paddle.sysinfo import available_memory

    available = available_memory()
    return available is None or fp32_bytes(cfg) <= FP32_REFERENCE_SHARE * available


def check_plan_args(precision: str, context: int, batch: int, block: int) -> None:
    """Raise InputError naming the argument the planner cannot take."""
    if precision not in PLAN_PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PLAN_PRECISIONS)}, got {precision!r}")
    for flag, value in (("--context", context), ("--batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value!r}")
    check_block_size(block, "--block-size")


def plan_memory(cfg: ErnieConfig, precision: str, context: int, batch: int = 1, block: int = DEFAULT_BLOCK_SIZE,
                threads: int | None = None, kv_cache: str = "auto", prefix_cache_memory: int = 0) -> MemoryPlan:
    """Bytes needed to run `cfg` at `precision` with `batch` sequences of `context` tokens (`block`: the int
    exports' quantisation block size; `threads`: ONNX Runtime's, default this machine's cores; `kv_cache`: the
    export's cache, as `export --kv-cache` chooses it; `prefix_cache_memory`: a server's prefix pool, 0 for none)."""
    check_plan_args(precision, context, batch, block)
    if not isinstance(prefix_cache_memory, int) or prefix_cache_memory < 0:
        raise InputError(f"--prefix-cache-memory must be a size >= 0, got {prefix_cache_memory!r}")
    weights = sum(_weight_bytes(cfg, m, precision, batch * context, block) for m in tensor_maps(cfg, PT))
    kv_bytes = kv_cache_bytes(kv_cache, precision)
    kv = bytes_per_token(cfg, kv_bytes) * context * batch
    # prefill activations of one chunk (--prefill-chunk): logits and attention scores. Paddle holds every head's
    # scores at once. ONNX Runtime's CPU GroupQueryAttention takes its flash path and holds no score matrix
    # (tools/attention_bench: +14 MB at 512 x 8K), but the process still grows with context beyond the cache; a head
    # per thread is the allowance the 8K run shaped, and it holds within 4% from 512 to 32K tokens for both caches
    # (tests/test_memory.py).
    chunk = min(context, GenerationConfig.prefill_chunk)
    threads = threads or os.cpu_count() or 1
    heads = cfg.num_attention_heads if precision not in BITS else min(cfg.num_attention_heads, threads)
    working = 4 * batch * chunk * (cfg.vocab_size + heads * context + 8 * cfg.hidden_size)
    runtime = ORT_RUNTIME if precision in BITS else 0
    # the pool holds host copies: the export's cache elements (int8 codes, fp16, fp32), Paddle's bf16 widened
    itemsize = prefix_itemsize("bf16") if precision == "bf16" else kv_bytes
    prefix_tokens = prefix_cache_tokens(prefix_cache_memory, bytes_per_token(cfg, itemsize))
    return MemoryPlan(weights, kv, working, runtime, prefix_cache_memory, prefix_tokens)


def _weight_bytes(cfg: ErnieConfig, m: TensorMap, precision: str, tokens: int, block: int) -> int:
    """Resident bytes of one canonical tensor at `precision` when `tokens` tokens have been seen."""
    n = int(np.prod(m.shape))
    if precision not in BITS:  # Paddle / float exports: the compute dtype, the router island in fp32
        return n * (4 if m.keep_fp32 else float_bytes(precision))
    bits = BITS[precision]
    if m.role is Role.EMBEDDING:  # memory-mapped Gather table: the rows of the tokens seen (+ a tied quantised head)
        rows = 4 * m.shape[-1] * min(m.shape[0], tokens)
        return rows + (packed_bytes(n, bits, block) if cfg.tie_word_embeddings else 0)
    if not m.role.quantised:  # norms, router, correction bias
        return 4 * n
    if m.role.routed_expert:  # QMoE; canonical [in, out]: a block of None is one K-long row (per channel)
        return packed_bytes(n, bits, expert_block(bits, block) or m.shape[0])
    return packed_bytes(n, bits, block)  # MatMulNBits


def packed_bytes(n: int, bits: int, block: int) -> int:
    """Resident bytes of `n` quantised weights once ONNX Runtime has prepacked them (codes + per-block data)."""
    return n * bits // 8 + int(PACKED_BLOCK_BYTES * -(-n // block))


def report(cfg: ErnieConfig, precision: str, context: int, batch: int, device_memory: int | None,
           block: int = DEFAULT_BLOCK_SIZE, kv_cache: str = "auto", prefix_cache_memory: int = 0) -> str:
    """The plan as the `memory` command prints it, and whether it fits `device_memory` bytes (else which GPUs)."""
    p = plan_memory(cfg, precision, context, batch, block, kv_cache=kv_cache, prefix_cache_memory=prefix_cache_memory)
    gb = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    head = f"{precision}" + (f" (block {block}, accuracy_level 4)" if precision in BITS else "")
    lines = [f"{head}, context {context}, batch {batch}:",
             f"  weights        {gb(p.weights)}",
             f"  KV cache       {gb(p.kv_cache)}  ({kv_cache_for(kv_cache, precision)})",
             f"  working        {gb(p.working)}",
             f"  runtime        {gb(p.runtime)}" + ("  (ONNX Runtime process)" if p.runtime else ""),
             f"  prefix cache   {gb(p.prefix_cache)}  "
             + (f"({p.prefix_tokens} tokens of prefix, serve --prefix-cache-memory)" if p.prefix_cache else "(off)"),
             f"  total          {gb(p.total)}"]
    if device_memory:
        lines.append(f"  fits {device_memory / 1e9:.4g} GB ({device_memory / GIB:.4g} GiB): "
                     f"{'yes' if p.total <= device_memory else 'no'}")
    else:
        fits = [name for name, size in GPUS.items() if p.total <= size]
        lines.append("  fits: " + (", ".join(fits) if fits else "none of " + ", ".join(GPUS))
                     + "  (GPU memory as sold: 1 GB = 1e9 bytes)")
    return "\n".join(lines)
