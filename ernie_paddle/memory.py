"""Memory planner: weights, KV cache and working memory of an ERNIE-4.5 model at a precision and context.

Weights follow what each runtime actually holds resident. Paddle keeps every tensor in the compute dtype (router
fp32). ONNX Runtime int8/int4/int2 exports hold linear layers (MatMulNBits) and routed experts (QMoE) in MLAS's
prepacked form for `accuracy_level` 4: the packed codes plus about 11 bytes per quantisation block (fp32 scale, block
sum and alignment; fitted to the 21B-A3B widths with blocks of 32, 64 and 128, every measurement within 2%);
the exported fp16 scales are dropped. The fp32 embedding table stays memory-mapped from the external data file:
only the rows of tokens seen become resident. Sizes are reported in GiB, as the benchmark's peak RSS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .config import ErnieConfig
from .layout import PT, tensor_maps

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4", "int2")
BITS = {"int8": 8, "int4": 4, "int2": 2}
PACKED_BLOCK_BYTES = 11.17  # MLAS prepacked MatMulNBits / QMoE, accuracy_level 4: bytes per block beyond codes
ORT_RUNTIME = int(0.7 * 2**30)  # the process: ONNX Runtime, Python, numpy, mapped pages while loading (measured)
GPUS = {"T4": 16, "A10": 24, "L4": 24, "RTX 4090": 24, "A100-40GB": 40, "A100-80GB": 80, "H100": 80, "H200": 141}


@dataclass
class Plan:
    weights: int
    kv_cache: int
    working: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working + self.runtime


def fp32_bytes(cfg: ErnieConfig) -> int:
    """Size of every weight in fp32: what the Paddle CPU model (and the portable flavour) holds."""
    return 4 * sum(int(np.prod(m.shape)) for m in tensor_maps(cfg, PT))


def plan(cfg: ErnieConfig, precision: str, context: int, batch: int = 1, block: int = 32,
         threads: int | None = None) -> Plan:
    """Bytes needed to run `cfg` at `precision` with `batch` sequences of `context` tokens (`block`: the int
    exports' quantisation block size; `threads`: ONNX Runtime's, default this machine's cores)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    weights = 0
    for m in tensor_maps(cfg, PT):
        n = 1
        for s in m.shape:
            n *= s
        name = m.canonical
        if precision in ("fp32", "bf16", "fp16"):
            weights += n * (4 if m.keep_fp32 or precision == "fp32" else 2)
            continue
        if len(m.shape) < 2 or m.keep_fp32:
            weights += 4 * n
            continue
        if name == "embed_tokens.weight":  # memory-mapped Gather table: the rows of the tokens seen
            weights += 4 * m.shape[-1] * min(m.shape[0], batch * context)
            if not cfg.tie_word_embeddings:
                continue
        bits = BITS[precision]
        if bits == 8 and ".mlp.experts." in name:  # int8 QMoE is per output channel (one block per row)
            weights += packed_bytes(n, bits, m.shape[0])  # canonical [in, out]: a block is one K-long row
        else:
            weights += packed_bytes(n, bits, block)  # MatMulNBits / QMoE (and the tied head)
    kv_bytes = 2 if precision in ("bf16", "fp16") else 4
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * batch * kv_bytes
    # prefill activations of one chunk (--prefill-chunk): logits and attention scores. Paddle holds every head's
    # scores at once; ONNX Runtime's CPU GroupQueryAttention one head per thread (measured at 8K and 32K tokens).
    chunk = min(context, 512)
    threads = threads or os.cpu_count() or 1
    heads = cfg.num_attention_heads if precision not in BITS else min(cfg.num_attention_heads, threads)
    working = 4 * batch * chunk * (cfg.vocab_size + heads * context + 8 * cfg.hidden_size)
    runtime = ORT_RUNTIME if precision in BITS else 0
    return Plan(weights, kv, working, runtime)


def packed_bytes(n: int, bits: int, block: int) -> int:
    """Resident bytes of `n` quantised weights once ONNX Runtime has prepacked them (codes + per-block data)."""
    return n * bits // 8 + int(PACKED_BLOCK_BYTES * -(-n // block))


def parse_size(text: str) -> int:
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2)):
        if t.endswith(unit):
            return int(float(t[:-2]) * mult)
    return int(float(t))


def report(cfg: ErnieConfig, precision: str, context: int, batch: int, device_memory: int | None,
           block: int = 32) -> str:
    p = plan(cfg, precision, context, batch, block)
    gb = lambda b: f"{b / 2**30:8.2f} GiB"  # noqa: E731
    head = f"{precision}" + (f" (block {block}, accuracy_level 4)" if precision in BITS else "")
    lines = [f"{head}, context {context}, batch {batch}:",
             f"  weights        {gb(p.weights)}", f"  KV cache       {gb(p.kv_cache)}",
             f"  working        {gb(p.working)}",
             f"  runtime        {gb(p.runtime)}" + ("  (ONNX Runtime process)" if p.runtime else ""),
             f"  total          {gb(p.total)}"]
    if device_memory:
        lines.append(f"  fits {device_memory / 2**30:.0f} GiB: {'yes' if p.total <= device_memory else 'no'}")
    else:
        fits = [name for name, g in GPUS.items() if p.total <= g * 1e9]  # GPU sizes are marketed in GB
        lines.append("  fits: " + (", ".join(fits) if fits else "none of " + ", ".join(GPUS)))
    return "\n".join(lines)
