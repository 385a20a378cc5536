"""tools/context_compare: ONNX Runtime and llama.cpp side by side at long contexts, ratios from the same run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ernie_paddle.tools.context_compare import Run, main, tables

OURS = Run("ort int4 b64, int8 cache", "ort", "e21b-int4-b64-kvint8")
THEIRS = Run("llama.cpp Q4_0, f16 cache", "llama", "e21b-q4_0.gguf", "f16")


def _row(engine: str, context: int, decode: float, ttft: float, rss: float) -> dict:
    return {"label": engine, "context": context, "decode_tok_s": decode, "ttft_estimate_s": ttft, "peak_rss_gib": rss}


def test_tables_put_each_figure_in_its_cell_and_ratios_favour_us_above_one():
    rows = [_row(OURS.label, 512, 7.5, 30.0, 14.0), _row(THEIRS.label, 512, 6.0, 45.0, 13.0),
            _row(OURS.label, 4096, 4.0, 400.0, 15.0), _row(THEIRS.label, 4096, 5.0, 300.0, 14.0)]
    text = tables(rows, [OURS, THEIRS], [512, 4096, 32768])
    decode, ttft, rss = (part.splitlines() for part in text.strip().split("\n\n")[1::2])
    assert decode[0] == f"| context | {OURS.label} | {THEIRS.label} | {OURS.label} / {THEIRS.label} |"
    assert decode[2] == "| 512 | 7.5 | 6 | 1.25x |"  # decode: ours / theirs
    assert decode[3] == "| 4096 | 4 | 5 | 0.80x |"
    assert decode[4] == "| 32768 | — | — | — |"  # not measured: a dash, never a number
    assert ttft[2] == "| 512 | 30 | 45 | 1.50x |"  # time to first token: theirs / ours (> 1: we are first)
    assert ttft[3] == "| 4096 | 400 | 300 | 0.75x |"
    assert rss[0] == f"| context | {OURS.label} | {THEIRS.label} |"  # memory: no ratio column
    assert rss[2] == "| 512 | 14 | 13 |"


def test_a_failed_run_is_reported_not_tabulated():
    rows = [_row(OURS.label, 512, 7.5, 30.0, 14.0), {"label": THEIRS.label, "context": 512, "error": "boom"}]
    decode = tables(rows, [OURS, THEIRS], [512]).split("\n\n")[1].splitlines()
    assert decode[2] == "| 512 | 7.5 | — | — |"


@pytest.mark.parametrize("argv,message", [
    ([], "give --ort DIR and/or --gguf FILE"),
    (["--ort", "/nonexistent/folder"], "argument --ort: '/nonexistent/folder' is not a folder"),
    (["--gguf", "/nonexistent.gguf"], "argument --gguf: '/nonexistent.gguf' is not a file"),
    (["--ort", ".", "--llama-kv-cache", "f16,q4_0"], "argument --llama-kv-cache: 'q4_0' is not one of f16, q8_0"),
    (["--ort", ".", "--context", "512,0"],
     "argument --context: expected comma-separated positive integers like 128,512, got '512,0'"),
])
def test_arguments_are_refused_by_name(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")


def test_context_compare_runs_two_exports_end_to_end(ckpt_factory, tmp_path):
    """Two ort folders of one checkpoint (fp32 and int8 KV cache): a row per engine and context, the tables, JSON
    and a chart."""
    from ernie_paddle.export.pipeline import export

    d, _ = ckpt_factory("context-compare", max_position_embeddings=512)
    folders = []
    for kv in ("fp32", "int8"):
        folders.append(str(tmp_path / f"int4-{kv}"))
        export(d, folders[-1], precision="int4", verify=False, kv_cache=kv)
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    r = subprocess.run([sys.executable, "-m", "ernie_paddle.tools.context_compare", "--ort", *folders, "--context",
                        "64,128", "--chunk", "32", "--decode", "2", "--json", str(out), "--plot", str(png)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.load(open(out))["results"]
    labels = ["ort int4 b32, fp32 cache", "ort int4 b32, int8 cache"]
    assert [(row["label"], row["context"]) for row in rows] == [(e, n) for n in (64, 128) for e in labels]
    for row in rows:
        assert row["engine"] == "ort" and row["decode_tok_s"] > 0 and row["peak_rss_gib"] > 0
        assert row["ttft_estimate_s"] == pytest.approx(  # the estimate of context_bench's own chunk times
            -(-row["context"] // 32) * (row["first_chunk_s"] + row["last_chunk_s"]) / 2, abs=5e-3)
    assert f"| context | {labels[0]} | {labels[1]} |" in r.stdout  # no llama.cpp run: no ratio columns
    first = rows[0]
    assert f"| 64 | {first['decode_tok_s']:g} | {rows[1]['decode_tok_s']:g} |" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_context_compare_against_llama_cpp_prints_ratios_from_its_own_rows(ckpt_factory, tmp_path):
    """One export and the same weights as a GGUF under llama.cpp: the ratio columns are the rows' own figures."""
    pytest.importorskip("llama_cpp", reason="llama.cpp runs need llama-cpp-python: pip install llama-cpp-python")
    from ernie_paddle.export.gguf import write_gguf
    from ernie_paddle.export.pipeline import export

    d, _ = ckpt_factory("context-compare", max_position_embeddings=512)
    folder, gguf = str(tmp_path / "fp32"), str(tmp_path / "tiny-f32.gguf")
    export(d, folder, precision="fp32", verify=False)
    write_gguf(d, gguf, "F32")
    out = tmp_path / "cmp.json"
    r = subprocess.run([sys.executable, "-m", "ernie_paddle.tools.context_compare", "--ort", folder, "--gguf", gguf,
                        "--llama-kv-cache", "f16", "--context", "128", "--chunk", "32", "--decode", "2", "--json",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ours, theirs = json.load(open(out))["results"]
    assert (ours["label"], theirs["label"]) == ("ort fp32, fp32 cache", "llama.cpp F32, f16 cache")
    assert (ours["engine"], theirs["engine"], theirs["kv_cache"]) == ("ort", "llama", "f16")
    decode = f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x"
    ttft = f"{theirs['ttft_estimate_s'] / ours['ttft_estimate_s']:.2f}x"
    assert f"| 128 | {ours['decode_tok_s']:g} | {theirs['decode_tok_s']:g} | {decode} |" in r.stdout
    assert f"| 128 | {ours['ttft_estimate_s']:g} | {theirs['ttft_estimate_s']:g} | {ttft} |" in r.stdout
