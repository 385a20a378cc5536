"""tools/llama_state (llama.cpp's sequence state, parsed, tiled and loaded back) and context_bench's llama engine,
on a tiny GGUF with head_dim 32 (so that a q8_0 cache, blocks of 32, is possible)."""

from __future__ import annotations

import ctypes
import importlib.util
import io
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("llama.cpp's state needs llama-cpp-python (and gguf to write the model): pip install "
                "llama-cpp-python gguf", allow_module_level=True)

import llama_cpp

from ernie_paddle.export.gguf import write_gguf
from ernie_paddle.benchmarking import llama_state
from ernie_paddle.tools.context_bench import ttft_estimate

# (cache type, flash attention): f16 without flash attention stores V transposed, q8_0 needs flash attention
CACHES = [("f16", False), ("q8_0", True)]


@pytest.fixture(scope="module")
def gguf_path(ckpt_factory, tmp_path_factory):
    d, _ = ckpt_factory("llama-state", hidden_size=128, seed=5)  # 4 heads of 32, 2 KV heads
    path = str(tmp_path_factory.mktemp("llama-state") / "tiny-f32.gguf")
    write_gguf(d, path, "F32")
    return path


def _context(path: str, kv_cache: str, flash_attn: bool, n_ctx: int = 512):
    t = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[kv_cache]
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=64, n_ubatch=64, n_threads=2, logits_all=False,
                           flash_attn=flash_attn, type_k=t, type_v=t, verbose=False)


def _logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def _pos_max(llm) -> int:
    return llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm.ctx), 0)


@pytest.mark.parametrize("kv_cache,flash_attn", CACHES)
def test_a_rebuilt_state_continues_exactly_as_the_real_prefill(gguf_path, kv_cache, flash_attn):
    """Parse a 64-token prefill's state, write it back with the module's writer: the bytes are llama.cpp's own, and a
    fresh context loaded with them decodes the 65th token to bit-identical logits (same cache bytes, same kernels)."""
    ids = [int(t) for t in np.random.default_rng(1).integers(3, 512, 65)]
    real = _context(gguf_path, kv_cache, flash_attn)
    real.eval(ids[:64])
    size = llama_cpp.llama_state_seq_get_size(real.ctx, 0)
    blob = (ctypes.c_uint8 * size)()
    llama_cpp.llama_state_seq_get_data(real.ctx, blob, size, 0)
    state = llama_state.parse(bytes(blob))
    assert state.cells == 64 and state.positions.tolist() == list(range(64)) and len(state.k) == 3
    assert state.v_trans is not flash_attn  # llama.cpp transposes V only without flash attention
    assert {t for t, _ in state.k + state.v} == {llama_cpp.GGML_TYPE_F16 if kv_cache == "f16" else
                                                 llama_cpp.GGML_TYPE_Q8_0}
    body = io.BytesIO()
    llama_state.write_body(state, body)
    assert body.getvalue() == bytes(blob)[8:]  # all but io_magic and seq_id, which the file form replaces
    real.eval(ids[64:])

    fresh = _context(gguf_path, kv_cache, flash_attn)
    llama_state.load(fresh.ctx, state)
    assert _pos_max(fresh) == 63
    fresh.n_tokens = 64
    fresh.eval(ids[64:])
    np.testing.assert_array_equal(_logits(fresh), _logits(real))


@pytest.mark.parametrize("kv_cache,flash_attn", CACHES)
def test_tiling_fills_the_context_and_decoding_goes_on(gguf_path, kv_cache, flash_attn):
    llm = _context(gguf_path, kv_cache, flash_attn)
    llm.eval(list(range(3, 35)))
    llama_state.load(llm.ctx, llama_state.read(llm.ctx), 300)  # 32 cells repeated 9.4 times
    assert _pos_max(llm) == 299
    llm.n_tokens = 300
    llm.eval([7])
    assert _pos_max(llm) == 300 and np.isfinite(_logits(llm)).all()
    # the state read back holds the tiled cells: each layer's rows repeat with period 32
    state = llama_state.read(llm.ctx)
    assert state.cells == 301 and state.positions.tolist() == list(range(301))
    rows = state.k[0][1]
    np.testing.assert_array_equal(rows[32:64], rows[:32])
    np.testing.assert_array_equal(rows[288:300], rows[:12])


def test_a_state_of_another_format_is_refused_naming_what_differs():
    body = io.BytesIO()
    llama_state.write_body(llama_state.SeqState(np.arange(2), False, [(1, np.zeros((2, 4), np.uint8))],
                                                [(1, np.zeros((2, 4), np.uint8))]), body)
    good = struct.pack("<Ii", llama_state.IO_MAGIC, 0) + body.getvalue()
    assert llama_state.parse(good).cells == 2
    with pytest.raises(llama_state.StateFormatError, match=r"^sequence state magic 0x0, expected 0xaf143cd8$"):
        llama_state.parse(b"\0" * 8 + good[8:])
    with pytest.raises(llama_state.StateFormatError, match=r"^sequence state has 2 KV streams, expected 1"):
        llama_state.parse(good[:8] + struct.pack("<I", 2) + good[12:])
    with pytest.raises(llama_state.StateFormatError, match=r"^sequence state has 1 bytes after its KV cache"):
        llama_state.parse(good + b"\0")
    with pytest.raises(llama_state.StateFormatError, match=rf"^sequence state ends at byte {len(good) - 1}, inside "
                                                           "tensor data at 80$"):
        llama_state.parse(good[:-1])
    k_type_at = 12 + 4 + 2 * 12 + 8  # after n_stream, cell_count, two cells, v_trans and n_layer
    with pytest.raises(llama_state.StateFormatError, match=r"^K layer 0: ggml type 2 is not one of \[0, 1, 8\]"):
        llama_state.parse(good[:k_type_at] + struct.pack("<i", 2) + good[k_type_at + 4:])


def _context_bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ernie_paddle.tools.context_bench", *argv], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("kv_cache,flash_attn", CACHES)
def test_context_bench_measures_llama_at_each_context(gguf_path, tmp_path, kv_cache, flash_attn):
    out = tmp_path / "ctx.json"
    r = _context_bench("--engine", "llama", "--model", gguf_path, "--kv-cache", kv_cache, "--context", "128,256",
                       "--chunk", "32", "--decode", "4", "--full", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 4 and "TTFT estimate s" in r.stdout
    data = json.load(open(out))
    assert data["meta"]["engine"] == "llama"
    rows = data["results"]
    assert [row["context"] for row in rows] == [128, 256]
    for row in rows:
        assert (row["engine"], row["kv_cache"], row["flash_attn"], row["chunk"]) == ("llama", kv_cache, flash_attn, 32)
        # times are rounded to the millisecond (load to 10 ms), and a tiny model's load or chunk may round to 0
        for key in ("load_s", "first_chunk_s", "last_chunk_s", "ttft_measured_s"):
            assert row[key] >= 0, key
        assert row["decode_tok_s"] > 0 and row["peak_rss_gib"] > 0
        assert row["ttft_estimate_s"] == pytest.approx(
            ttft_estimate(row["context"], 32, row["first_chunk_s"], row["last_chunk_s"]), abs=5e-3)


@pytest.mark.parametrize("argv,message", [
    (["--kv-cache", "q8_0"], "argument --kv-cache: only for --engine llama (an exported folder's cache is set at "
                             "export)"),
    (["--engine", "llama"], "argument --model: {model} is not a GGUF file (--engine llama)"),
    (["--engine", "llama", "--model-is-gguf", "--context", "2048"],
     "--context 2048 + --decode 16 exceeds max_position_embeddings 2048"),
    (["--engine", "llama", "--model-is-gguf", "--context", "128", "--chunk", "256"],
     "argument --context: 128 is shorter than --chunk 256"),
])
def test_context_bench_refuses_bad_llama_arguments(capsys, tmp_path, gguf_path, argv, message):
    from ernie_paddle.tools.context_bench import main

    model = gguf_path if "--model-is-gguf" in argv else str(tmp_path)
    argv = [a for a in argv if a != "--model-is-gguf"]
    with pytest.raises(SystemExit) as e:
        main(["--model", model, *argv])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and err.endswith(f" error: {message.format(model=model)}"), err


def test_context_bench_names_the_model_llama_cannot_open_with_a_q8_0_cache(ckpt_factory, tmp_path):
    d, _ = ckpt_factory("llama-state-head16", seed=5)  # the tiny preset's head_dim 16: no q8_0 block of 32 fits
    path = str(tmp_path / "head16.gguf")
    write_gguf(d, path, "F32")
    r = _context_bench("--engine", "llama", "--model", path, "--kv-cache", "q8_0", "--context", "64", "--chunk", "32")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert (f"{path}: llama.cpp could not create a context of 80 tokens with a q8_0 KV cache (Failed to create "
            "llama_context; a q8_0 cache needs a head_dim divisible by 32)") in r.stderr
